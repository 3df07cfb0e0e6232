"""The README's set-up is what CI runs: two commands, the second one verbatim in .ci/run."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def setup_commands() -> list[str]:
  readme = (ROOT / "README.md").read_text(encoding="utf-8")
  section = re.search(r"^## Set-up\n(.*?)^## ", readme, re.S | re.M)
  assert section, "README.md has no '## Set-up' section"
  block = re.search(r"```bash\n(.*?)```", section.group(1), re.S)
  assert block, "README.md's Set-up section has no bash block"
  return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_has_two_setup_commands():
  install, test = setup_commands()
  assert install == 'pip install -e ".[test]"'
  assert test.split()[0] == "pytest"


def test_ci_runs_the_readme_test_command_verbatim():
  _, test = setup_commands()
  ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")]
  assert test in ci, f".ci/run does not run the README's test command {test!r}"
  installs = [line for line in ci if "pip install -e" in line]
  assert installs and re.search(r'-e "\.\[test(,[a-z0-9]+)*\]"', installs[0]), installs
  assert ci.index(installs[0]) < ci.index(test)

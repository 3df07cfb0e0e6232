"""How every entry point starts and ends (spine_jax/cli.py): `--help` exits 0; a usage error is one line and
exit 1, without absl's usage dump; Ctrl-C is one line and exit 130. The bad inputs themselves are
tests/test_bad_inputs.py."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(module, *args, cwd=ROOT):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", f"spine_jax.{module}", *map(str, args)], capture_output=True,
                        text=True, cwd=cwd, timeout=300, env=env)


@pytest.mark.parametrize("module", ["predict", "evaluate", "convert", "train"])
def test_help_exits_zero(module):
  run = _run(module, "--help")
  assert run.returncode == 0 and f"python -m spine_jax.{module}" in run.stdout


def _cli_run(body: str):
  """cli.run of a main whose body is `body`, in a fresh process (absl parses flags once per process)."""
  code = f"from absl import app\nfrom spine_jax import cli\ndef main(argv):\n  {body}\ncli.run(main, 'spine_jax.x')\n"
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_ctrl_c_is_one_line_and_status_130():
  run = _cli_run("raise KeyboardInterrupt")
  assert run.returncode == 130 and "Traceback" not in run.stderr
  err = run.stderr.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("interrupted:")


def test_usage_error_is_one_line_without_usage_text():
  run = _cli_run("raise app.UsageError('semantic needs --checkpoint')")
  assert run.returncode == 1 and run.stderr.startswith("error: semantic needs --checkpoint\n")
  assert len(run.stderr.strip().splitlines()) == 2

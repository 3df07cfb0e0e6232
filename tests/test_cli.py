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


def test_compilation_cache_is_used_and_reused(tmp_path):
  """`use_compilation_cache` points JAX's persistent cache at the folder (made if absent), and a second
  process reads what the first wrote; '' turns it off; a cache set before (a test session's) is kept."""
  folder = tmp_path / "made" / "xla"
  code = ("import sys, jax, jax.numpy as jnp\nfrom spine_jax import cli\n"
          "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
          "print(cli.use_compilation_cache(sys.argv[1]))\njax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()\n")
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env["JAX_PLATFORMS"] = "cpu"
  first = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, env=env, timeout=120)
  assert first.returncode == 0 and first.stdout.strip() == str(folder), first.stderr
  entries = sorted(p.name for p in folder.iterdir())
  assert entries, "nothing was cached"
  again = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, env=env, timeout=120)
  assert again.returncode == 0 and sorted(p.name for p in folder.iterdir()) == entries  # read, not recompiled
  off = subprocess.run([sys.executable, "-c", code, ""], capture_output=True, text=True, env=env, timeout=120)
  assert off.returncode == 0 and off.stdout.strip() == "None"
  from spine_jax import cli
  import jax
  before = jax.config.jax_compilation_cache_dir
  assert cli.use_compilation_cache(str(tmp_path / "other")) == before and not (tmp_path / "other").exists()


def test_compilation_cache_default_folder(monkeypatch, tmp_path):
  from spine_jax import cli
  monkeypatch.setenv(cli.CACHE_ENV, str(tmp_path / "c"))
  assert cli.default_compilation_cache() == str(tmp_path / "c")
  monkeypatch.delenv(cli.CACHE_ENV)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert cli.default_compilation_cache() == str(tmp_path / "spine_jax" / "xla")

"""The package installed as a user installs it (`pip install .`, not editable) into a fresh virtualenv
works from any folder: the entry points start and a tiny SPINEPS model folder converts.

An editable install or `python -m pytest` in the source tree would hide a package that reads files
outside itself (such as `configs/`): here neither the source tree nor this environment's packages are
on the path. pip reaches the same package index as the README's install command.
"""
import os
import pathlib
import shutil
import subprocess
import venv

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Generated or machine-local content that a user's copy of the project would not hold.
_NOT_SOURCE = shutil.ignore_patterns(".git", ".jax_cache", ".pytest_cache", "__pycache__", "*.egg-info", "build",
                                     "runs", "workdir*", ".whl", ".gl", ".spineps-env")


def _run(args, cwd, timeout=600):
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
  env["JAX_PLATFORMS"] = "cpu"
  return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """A fresh virtualenv holding a regular install of a copy of the source tree (with the torch extra,
  which reading .ckpt files needs); returns (python, an empty folder outside both)."""
  pytest.importorskip("torch", reason="the tiny model folder is written with torch (pip install -e '.[torch]')",
                      exc_type=ImportError)
  root = tmp_path_factory.mktemp("install")
  source = root / "source"
  shutil.copytree(ROOT, source, ignore=_NOT_SOURCE)
  venv.EnvBuilder(with_pip=True, clear=True).create(root / "venv")
  python = root / "venv" / "bin" / "python"
  done = _run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", f"{source}[torch]"],
              cwd=root, timeout=1500)
  assert done.returncode == 0, f"pip install . failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
  shutil.rmtree(source)  # nothing may still read the source tree
  elsewhere = root / "elsewhere"
  elsewhere.mkdir()
  return python, elsewhere


def test_package_is_the_installed_copy(installed):
  python, elsewhere = installed
  run = _run([python, "-c", "import spine_jax, importlib.util as u; print(spine_jax.__file__); "
              "print(u.find_spec('configs'))"], cwd=elsewhere)
  assert run.returncode == 0, run.stderr
  where, configs = run.stdout.split()
  assert pathlib.Path(where).is_relative_to(python.parents[1]) and configs == "None", run.stdout


@pytest.mark.parametrize("command", ["convert", "predict", "train"])
def test_entry_point_help(installed, command):
  python, elsewhere = installed
  run = _run([python, "-m", f"spine_jax.{command}", "--help"], cwd=elsewhere)
  assert run.returncode == 0, run.stderr
  assert f"python -m spine_jax.{command}" in run.stdout


def test_tiny_spineps_conversion(installed):
  from tests.conversion import spineps_folders
  unet3d = spineps_folders.load_unet3d()
  if unet3d is None:
    pytest.skip("needs spineps for its Unet3D (pip install --no-deps spineps==2.1.3)")
  python, elsewhere = installed
  folder = spineps_folders.write_instance_folder(elsewhere / "models", spineps_folders.torch_unet3d(unet3d))
  run = _run([python, "-m", "spine_jax.convert", "spineps", f"--instance_folder={folder}", "--output=converted"],
             cwd=elsewhere)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "Traceback" not in run.stderr
  assert (elsewhere / "converted" / "instance" / "bundle.json").is_file()

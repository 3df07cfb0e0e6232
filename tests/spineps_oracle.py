"""The one way tests call SPINEPS 2.1.3 itself: the test of a step is SPINEPS' own function on the same input.

SPINEPS lives in a virtualenv of its own (antspyx, which it pins, needs numpy < 2.4 and scipy < 1.16), made
by `bash scripts/spineps_env.sh` at .spineps-env/ in the repository root, or wherever SPINEPS_ENV points.
Each call runs tests/spineps_worker.py under that environment's Python in a subprocess: arrays go there and
back as .npz files in a temporary folder, the other keyword arguments as JSON.

    reason = spineps_oracle.available()
    if reason:
      pytest.skip(reason)
    out = spineps_oracle.call("worker.rescale", {"arr": arr, "affine": affine}, voxel_spacing=[1, 1, 1])

A call costs the other Python's start-up plus its imports: about 0.1 s bare, under a second with TPTBox,
several seconds once `spineps` (torch, Lightning, monai) is imported.
"""
from __future__ import annotations

import functools
import json
import os
import pathlib
import subprocess
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV_DIR = pathlib.Path(os.environ.get("SPINEPS_ENV", ROOT / ".spineps-env"))
ENV_PYTHON = ENV_DIR / "bin" / "python"
WORKER = pathlib.Path(__file__).resolve().with_name("spineps_worker.py")
VERSIONS = {"spineps": "2.1.3", "tptbox": "1.1.0"}
# Variables of this environment that must not reach the other Python's.
_DROP = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
  """This process's environment for the other Python: thread settings (OMP_NUM_THREADS and the like) are
  inherited, not forced; the citation reminder is off."""
  env = {k: v for k, v in os.environ.items() if k not in _DROP}
  env["SPINEPS_NO_CITATION_REMINDER"] = "1"
  env.update(extra or {})
  return env


@functools.lru_cache(maxsize=1)
def available() -> str | None:
  """None when the SPINEPS environment is usable, else why not (for pytest.skip)."""
  if not ENV_PYTHON.exists():
    return f"no SPINEPS reference environment at {ENV_DIR} (bash scripts/spineps_env.sh makes it; SPINEPS_ENV moves it)"
  probe = f"import importlib.metadata as m, json; print(json.dumps({{n: m.version(n) for n in {sorted(VERSIONS)!r}}}))"
  try:
    run = subprocess.run([str(ENV_PYTHON), "-I", "-c", probe], capture_output=True, text=True, env=_env(), timeout=60,
                         check=False)
  except (OSError, subprocess.TimeoutExpired) as error:
    return f"the SPINEPS environment's Python {ENV_PYTHON} does not run: {error}"
  if run.returncode != 0:
    return f"the SPINEPS environment at {ENV_DIR} is incomplete: {run.stderr.strip()[-500:]}"
  found = json.loads(run.stdout)
  if found != VERSIONS:
    return f"the SPINEPS environment at {ENV_DIR} holds {found}, not {VERSIONS} (rerun bash scripts/spineps_env.sh)"
  return None


def _jsonable(value):
  if isinstance(value, (np.ndarray, np.generic)):
    return value.tolist()
  raise TypeError(f"keyword argument value {value!r} is not JSON (pass arrays in `arrays`)")


def call(function: str, arrays: dict[str, np.ndarray], _timeout: float = 900, **kwargs) -> dict[str, np.ndarray]:
  """Calls FUNCTION (a dotted name in spineps or TPTBox, or "worker.NAME", an adapter in
  tests/spineps_worker.py) in the SPINEPS environment with the arrays and kwargs as keyword arguments.

  Returns its outputs as arrays: a dict result keeps its keys; a tuple becomes out0, out1, ...; anything
  else is "out"; a TPTBox NII comes back as its array plus "<key>_affine". Raises RuntimeError with the tail
  of the worker's traceback when the function fails there."""
  reason = available()
  if reason:
    raise RuntimeError(reason)
  with tempfile.TemporaryDirectory(prefix="spineps_oracle_") as tmp:
    work = pathlib.Path(tmp)
    np.savez(work / "in.npz", **{k: np.asarray(v) for k, v in arrays.items()})
    (work / "kwargs.json").write_text(json.dumps(kwargs, default=_jsonable))
    # cwd: the temporary folder, so that nothing the other side writes (or finds on '') is the repository's.
    run = subprocess.run([str(ENV_PYTHON), "-I", str(WORKER), str(work), function], cwd=work, env=_env(),
                         capture_output=True, text=True, timeout=_timeout, check=False)
    error = work / "error.txt"
    if error.exists():
      raise RuntimeError(f"SPINEPS worker: {function} failed:\n{error.read_text()[-3000:]}")
    if run.returncode != 0 or not (work / "out.npz").exists():
      raise RuntimeError(f"SPINEPS worker: {function} exited with {run.returncode}:\n"
                         f"{run.stdout[-1500:]}\n{run.stderr[-3000:]}")
    with np.load(work / "out.npz", allow_pickle=False) as data:
      return {key: data[key] for key in data.files}


def run_cli(args: list[str], env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None,
            timeout: float = 3600) -> subprocess.CompletedProcess:
  """Runs the environment's `spineps` command (`spineps sample -i ... -ms MODEL_FOLDER ...`) with the
  citation reminder off and ENV's variables added (SPINEPS_SEGMENTOR_MODELS, say); does not check the
  exit status. Keep it offline: pass model folders as paths and `--no-crop`."""
  reason = available()
  if reason:
    raise RuntimeError(reason)
  return subprocess.run([str(ENV_DIR / "bin" / "spineps"), *map(str, args)], env=_env(env), cwd=cwd,
                        capture_output=True, text=True, timeout=timeout, check=False)

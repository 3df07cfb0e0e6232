"""Reading PyTorch files safely: tensors and plain data only, unless the user says they trust the file.

``torch.load(weights_only=True)`` rebuilds tensors, containers and numbers but runs no code from
the file. nnU-Net checkpoints also hold numpy scalars (in their training log), which are data:
those are allowed too. Anything else (a class, a function) is refused with a message naming it;
``trust_pickle=True`` (``--trust_pickle``) loads it with full pickle, which can run code.

torch is imported here only, and only when a file is read: the package never needs it otherwise.
"""
from __future__ import annotations

import json
import pathlib
import re
from typing import Any, Mapping

import numpy as np

from spine_jax.conversion.errors import ConversionError

TRUST_FLAG = "--trust_pickle"


def read_json(path: pathlib.Path, missing_hint: str = "") -> dict[str, Any]:
  """A model folder's JSON file (plans.json, dataset.json, inference_config.json) as a dict, or a
  ConversionError naming the file: missing (with `missing_hint`), unreadable, or not an object."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConversionError(f"{path}: no such file{f' ({missing_hint})' if missing_hint else ''}")
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    raise ConversionError(f"{path}: not readable JSON: {e}") from None
  if not isinstance(data, dict):
    raise ConversionError(f"{path}: expected a JSON object, found {type(data).__name__}")
  return data


def import_torch(path):
  try:
    import torch
  except ImportError as e:
    raise ConversionError(f"{path}: reading PyTorch files needs torch (pip install -e '.[torch]')") from e
  return torch


def _numpy_scalar_globals() -> list:
  """numpy's scalar and dtype rebuilders, under numpy 2's and numpy 1's module names."""
  scalar = np._core.multiarray.scalar
  allowed = [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype]
  for name in ("Float16DType", "Float32DType", "Float64DType", "Int8DType", "Int16DType", "Int32DType",
               "Int64DType", "UInt8DType", "UInt16DType", "UInt32DType", "UInt64DType", "BoolDType"):
    allowed.append(getattr(np.dtypes, name))
  return allowed


def _refused_global(message: str) -> str:
  """The class or function a weights-only load refused, as torch's message names it."""
  for pattern in (r"GLOBAL ([\w.]+)", r"got <class '([\w.]+)'>", r"Unsupported global: ([\w.]+)"):
    found = re.search(pattern, message)
    if found:
      return found.group(1)
  return "an object that is not a tensor or plain data"


class PickledObject:
  """An object of a class a file names, read without importing that class or running any of its code: the
  class's dotted name (``pickled_class``), the arguments the file builds it from (``pickled_args``) and its
  pickled state as attributes (a dataclass's or Namespace's fields), or as ``pickled_state``."""
  pickled_class = ""

  def __new__(cls, *args, **kwargs):  # pickle's NEWOBJ and REDUCE both come here
    obj = super().__new__(cls)
    obj.pickled_args = args
    return obj

  def __init__(self, *args, **kwargs):
    pass

  def __setstate__(self, state):
    if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
      state = {**(state[0] or {}), **(state[1] or {})}  # (dict, slots)
    if isinstance(state, dict):
      self.__dict__.update(state)
    else:
      self.pickled_state = state

  def __repr__(self) -> str:
    return f"<{self.pickled_class} from the file>"


def _stand_ins(torch, path) -> list[tuple[type, str]]:
  """A PickledObject subclass for every class or function the file names that torch does not allow."""
  names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
  return [(type(name.rpartition(".")[2], (PickledObject,), {"pickled_class": name}), name) for name in sorted(names)]


def load(path, *, trust_pickle: bool = False, stand_ins: bool = False) -> Any:
  """The object a ``torch.save`` file holds, tensors on the CPU.

  ``stand_ins``: objects of classes the file names (a Lightning checkpoint's hyper-parameters: SPINEPS'
  ``ARGS_MODEL``, an ``argparse.Namespace``) become ``PickledObject`` records instead of being refused; their
  modules are not imported and nothing of them runs, so no ``--trust_pickle`` is needed.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConversionError(f"{path}: no such file")
  torch = import_torch(path)
  try:
    if trust_pickle:
      return torch.load(path, map_location="cpu", weights_only=False)
    with torch.serialization.safe_globals(_numpy_scalar_globals()):
      if not stand_ins:
        return torch.load(path, map_location="cpu", weights_only=True)
      with torch.serialization.safe_globals(_stand_ins(torch, path)):
        return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError... for bad files
    message = str(e)
    if not trust_pickle and "Weights only load failed" in message:
      raise ConversionError(
          f"{path}: holds {_refused_global(message)}, not only tensors and plain data; loading it "
          f"would run code from the file. If you trust its source, pass {TRUST_FLAG}") from None
    raise ConversionError(f"{path}: not a readable PyTorch file (truncated or corrupt?): "
                          f"{type(e).__name__}: {message.splitlines()[0] if message else ''}") from None


def is_tensor(value) -> bool:
  return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def to_numpy(value) -> np.ndarray:
  """A tensor as numpy; half precision widens to float32 (numpy has no bfloat16)."""
  value = value.detach().cpu()
  if value.is_floating_point() and value.dtype.itemsize < 4:
    value = value.float()
  return value.numpy()


def state_dict_arrays(obj, path, where: str = "the file") -> dict[str, np.ndarray]:
  """A state dict (name -> tensor) as numpy arrays; anything else is an error naming the entry."""
  if not isinstance(obj, Mapping):
    raise ConversionError(f"{path}: {where} is a {type(obj).__name__}, not a state dict (name -> tensor)")
  out = {}
  for key, value in obj.items():
    if not is_tensor(value):
      raise ConversionError(f"{path}: {where}: entry {key!r} is a {type(value).__name__}, not a tensor")
    out[str(key)] = to_numpy(value)
  if not out:
    raise ConversionError(f"{path}: {where} is an empty state dict")
  return out


def strip_common_prefix(arrays: dict[str, np.ndarray], prefixes=("module.", "_orig_mod.")) -> dict[str, np.ndarray]:
  """Drop a wrapper prefix that every key has (DataParallel's ``module.``, torch.compile's ``_orig_mod.``)."""
  changed = True
  while changed:
    changed = False
    for prefix in prefixes:
      if arrays and all(k.startswith(prefix) for k in arrays):
        arrays = {k[len(prefix):]: v for k, v in arrays.items()}
        changed = True
  return arrays

"""What is particular to SPINEPS' model folders: inference_config.json and TPTBox's label names.

A SPINEPS semantic model is an nnU-Net v2 folder with an ``inference_config.json`` beside
plans.json; ``nnunet.convert_folder`` reads it through ``read_inference_config`` for the label
mapping (network output value -> SPINEPS id), the orientation the network expects and the
sliding-window step. Labels there are TPTBox ``Location`` names (``Arcus_Vertebrae`` = 41 ...),
vertebra names (``S1`` = 26, the sacrum) or ids. The instance model's folder holds one too
(``modeltype: 'unet'``), read by ``spineps.py``, and so does the labelling model's (``modeltype:
'classifier'``), read by ``spineps_labeling.py``.
"""
from __future__ import annotations

import pathlib
from typing import Any

from spine_jax.conversion import torch_files
from spine_jax.conversion.errors import ConversionError
from spine_jax.data import spine_labels

INFERENCE_CONFIG = "inference_config.json"

# TPTBox Location names of the semantic structures. Vertebra_Corpus (50) and Vertebra_Corpus_border
# (49) both denote the vertebral body in SPINEPS' label mapping, so both become 49 here.
LOCATION_IDS = {
    "Arcus_Vertebrae": 41, "Spinosus_Process": 42, "Costal_Process_Left": 43, "Costal_Process_Right": 44,
    "Superior_Articular_Left": 45, "Superior_Articular_Right": 46, "Inferior_Articular_Left": 47,
    "Inferior_Articular_Right": 48, "Vertebra_Corpus_border": 49, "Vertebra_Corpus": 49, "Spinal_Cord": 60,
    "Spinal_Canal": 61, "Endplate": 62, "Vertebra_Disc": 100, "S1": 26, "Sacrum": 26, "Unknown": 0,
    "background": 0,
}
_ALIASES = {"vertebral_body": 49, "corpus": 49, "disc": 100, "ivd": 100, "spinous": 42, "arcus": 41,
            "canal": 61, "cord": 60}


def _folded(name: str) -> str:
  return name.strip().lower().replace(" ", "_").replace("-", "_")


_BY_NAME = {_folded(k): v for k, v in LOCATION_IDS.items()}
_BY_NAME.update({_folded(v): k for k, v in spine_labels.STRUCTURE_NAMES.items()})
_BY_NAME.update(_ALIASES)


def id_for_name(name) -> int | None:
  """The SPINEPS semantic id a label name (TPTBox, spine_jax or a plain id) stands for, else None."""
  if isinstance(name, int) or (isinstance(name, str) and name.strip().isdigit()):
    value = int(name)
    value = spine_labels.CORPUS if value == spine_labels.CORPUS_INNER else value
    return value if value in spine_labels.SEMANTIC_IDS else None
  return _BY_NAME.get(_folded(str(name)))


def read_inference_config(folder, modeltype: str = "nnunet") -> dict[str, Any] | None:
  """SPINEPS' inference_config.json of a model folder as a dict, or None when there is none; its
  ``modeltype`` must be ``modeltype`` (``nnunet``: the semantic model, ``unet``: the instance one,
  ``classifier``: the labelling one)."""
  path = pathlib.Path(folder) / INFERENCE_CONFIG
  if not path.exists():
    return None
  config = torch_files.read_json(path)
  found = str(config.get("modeltype", "nnunet")).lower()
  if found != modeltype:
    if found == "unet":
      hint = ("this is SPINEPS' instance model (Unet3D): convert it with python -m spine_jax.convert spineps "
              "--instance_folder=...")
    elif found == "nnunet":
      hint = ("this is SPINEPS' semantic model (nnU-Net): convert it with python -m spine_jax.convert spineps "
              "--semantic_folder=... (or convert nnunet --input=...)")
    elif found == "classifier":
      hint = ("this is SPINEPS' labelling model (classifier): convert it with python -m spine_jax.convert spineps "
              "--labeling_folder=...")
    else:
      hint = "only SPINEPS' semantic (nnunet), instance (unet) and labelling (classifier) models convert"
    raise ConversionError(f"{path}: modeltype {config.get('modeltype')!r}, expected {modeltype!r}: {hint}")
  return config


def network_label_ids(config: dict[str, Any], folder) -> dict[int, int]:
  """inference_config 'labels' as {network output value: SPINEPS id}; unknown names are an error."""
  path = pathlib.Path(folder) / INFERENCE_CONFIG
  labels = config.get("labels")
  if not isinstance(labels, dict) or not labels:
    raise ConversionError(f"{path}: field 'labels' missing or empty (expected {{network value: label name}})")
  out = {}
  for key, name in labels.items():
    if not str(key).strip().isdigit():
      raise ConversionError(f"{path}: labels key {key!r} is not a network output value (an integer)")
    value = id_for_name(name)
    if value is None:
      raise ConversionError(f"{path}: labels[{key!r}] = {name!r} is not a SPINEPS semantic structure "
                            f"(ids {sorted(spine_labels.SEMANTIC_IDS[1:])})")
    out[int(key)] = value
  return out


def positive_numbers(value, n, what, source, kind=float) -> tuple:
  """``value`` as ``n`` positive numbers of ``kind``, or a ConversionError naming ``source`` and ``what``."""
  try:
    out = tuple(kind(v) for v in value)
  except (TypeError, ValueError):
    out = ()
  if len(out) != n or any(v <= 0 for v in out):
    raise ConversionError(f"{source}: {what} {value!r} is not {n} positive numbers")
  return out


def resolution_bounds(config: dict[str, Any], folder) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
  """inference_config's ``resolution_range`` as (lowest, highest) spacing per axis (mm, in the
  model_expected_orientation's axes), None when absent. SPINEPS takes either one spacing (both bounds) or a
  (min, max) pair, into which seg_model.py `calc_recommended_resampling_zoom` clamps the input's spacing."""
  if "resolution_range" not in config:
    return None
  source = pathlib.Path(folder) / INFERENCE_CONFIG
  value = config["resolution_range"]
  if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (list, tuple)) for v in value):
    low, high = (positive_numbers(v, 3, "resolution_range", source) for v in value)
    if any(lo > hi for lo, hi in zip(low, high)):
      raise ConversionError(f"{source}: resolution_range {value!r}: a minimum above its maximum")
    return low, high
  spacing = positive_numbers(value, 3, "resolution_range", source)
  return spacing, spacing


def valid_axcodes(codes) -> bool:
  """Three axis codes naming each of the L/R, A/P and S/I axes once."""
  codes = tuple(codes)
  return len(codes) == 3 and all(sum(c in pair for c in codes) == 1 for pair in ("LR", "AP", "SI"))


def orientation(config: dict[str, Any], folder) -> tuple[str, ...] | None:
  """The axis codes the network expects its input in (SPINEPS: P, I, R), if given."""
  codes = config.get("model_expected_orientation")
  if codes is None:
    return None
  codes = tuple(str(c).upper() for c in codes)
  if not valid_axcodes(codes):
    raise ConversionError(f"{pathlib.Path(folder) / INFERENCE_CONFIG}: model_expected_orientation {codes} is "
                          f"not three axis codes naming each of L/R, A/P and S/I once")
  return codes


# ------------------------------------------------------------------------------------ model folders
# SPINEPS reads a model from the folder holding its inference_config.json (found recursively, and it
# must be the only one); so do we.


def model_folder(folder, what: str) -> pathlib.Path:
  """The folder holding the one inference_config.json at or under ``folder``."""
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise ConversionError(f"{folder}: not a folder (expected SPINEPS' {what} model folder)")
  if (folder / INFERENCE_CONFIG).is_file():
    return folder
  found = sorted(folder.rglob(INFERENCE_CONFIG))
  if len(found) != 1:
    raise ConversionError(f"{folder}: expected one {INFERENCE_CONFIG} in SPINEPS' {what} model folder, found "
                          f"{len(found)}{': ' + ', '.join(map(str, found)) if found else ''}")
  return found[0].parent

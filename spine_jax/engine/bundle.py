"""Model bundles: what inference needs of a model, and nothing else.

A bundle is a folder with two files:
- `bundle.json`: `format`, `version`, `task`, `step` (the training step, 0 for a conversion) and
  `config`, the inference part of the model's config: the architecture (`model`), how scans become
  network inputs (`data.preprocess`, `data.patch`, `data.patch_size`, `data.cutout`, `data.slices`,
  `data.in_channels`; the labelling patch's `data.zoom`, `data.zoom_range`, `data.crop_margin_mm`,
  `data.corpus_masked`, `data.rotate`),
  the sliding window and mirroring (`inference`), post-processing (`postprocess`), the per-vertebra
  decisions (`eval`) and where converted weights came from (`converted_from`). No optimiser, no
  training data, no schedule.
- `params.npz`: the variables (`params/...`, `batch_stats/...`), one array per leaf, keys joined by '/'.

Training writes one into its work directory at the end of a run (`bundle/`); the converters write
them directly; `inference.restore` loads a bundle, or a training checkpoint (which needs the
optimiser rebuilt), whichever is newer.
"""
from __future__ import annotations

import json
import pathlib
import shutil
import tempfile
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from spine_jax.data import nifti
from spine_jax.engine import checkpoints
from spine_jax.engine import mesh as mesh_lib
from spine_jax.engine import networks
from spine_jax.engine import state as state_lib

FORMAT = "spine_jax model bundle"
VERSION = 1
SPEC_FILE = "bundle.json"
PARAMS_FILE = "params.npz"
BUNDLE_DIR = "bundle"  # inside a training work directory
CONFIG_FIELDS = ("task", "model", "inference", "postprocess", "eval", "converted_from")
DATA_FIELDS = ("preprocess", "patch", "patch_size", "cutout", "slices", "in_channels",
               "zoom", "zoom_range", "crop_margin_mm", "corpus_masked", "rotate")  # the last five: the labelling patch


def inference_config(config) -> ml_collections.ConfigDict:
  """The inference part of a model's config (see the module docstring)."""
  full = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  out = {k: full[k] for k in CONFIG_FIELDS if k in full}
  data = full.get("data") or {}
  out["data"] = {k: data[k] for k in DATA_FIELDS if k in data}
  return ml_collections.ConfigDict(out)


def _spec_path(path) -> pathlib.Path | None:
  """The bundle.json of a bundle folder or of a work directory's bundle/, else None."""
  path = pathlib.Path(path)
  for folder in (path, path / BUNDLE_DIR):
    if (folder / SPEC_FILE).is_file():
      return folder / SPEC_FILE
  return None


def find_bundle(path) -> tuple[pathlib.Path, int] | None:
  """(bundle folder, its step) at `path` or in its `bundle/`, else None."""
  spec = _spec_path(path)
  if spec is None:
    return None
  return spec.parent, int(_read_spec(spec).get("step", 0))


def _read_spec(spec: pathlib.Path) -> dict:
  try:
    data = json.loads(spec.read_text())
  except (OSError, ValueError) as e:
    raise checkpoints.CheckpointError(f"model bundle {spec.parent}: {spec.name} is not readable JSON ({e})") from None
  if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("config"), dict):
    raise checkpoints.CheckpointError(f"model bundle {spec.parent}: {spec.name} is not a spine_jax model bundle")
  if int(data.get("version", 0)) > VERSION:
    raise checkpoints.CheckpointError(f"model bundle {spec.parent}: version {data['version']} is newer than this "
                                      f"spine_jax reads ({VERSION}); update spine_jax")
  return data


def write_bundle(directory, config, variables: Mapping[str, Any], *, step: int = 0,
                 extra_files: Mapping[str, str] | None = None) -> pathlib.Path:
  """Write a bundle folder at `directory` all at once (a temporary folder beside it, then renamed,
  replacing an older bundle there only when the new one is complete)."""
  directory = pathlib.Path(directory).absolute()
  directory.parent.mkdir(parents=True, exist_ok=True)
  cfg = inference_config(config)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
  try:
    flat = traverse_util.flatten_dict(jax.device_get(dict(variables)), sep="/")
    with open(tmp / PARAMS_FILE, "wb") as f:
      np.savez(f, **{k: np.asarray(v) for k, v in flat.items()})
    spec = {"format": FORMAT, "version": VERSION, "task": cfg.get("task"), "step": int(step),
            "config": json.loads(cfg.to_json_best_effort())}
    (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    for name, text in (extra_files or {}).items():
      (tmp / name).write_text(text)
    nifti.replace_directory(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return directory


def load_bundle(folder, mesh=None) -> tuple[state_lib.InferenceState, ml_collections.ConfigDict]:
  """(inference state replicated over `mesh`, config) of a bundle folder; the model is rebuilt from
  the bundle's config by the one network builder, and every variable is checked against it."""
  spec_path = _spec_path(folder)
  if spec_path is None:
    raise checkpoints.CheckpointError(f"{folder}: no {SPEC_FILE} (not a spine_jax model bundle)")
  root = spec_path.parent
  config = checkpoints.stored_config(_read_spec(spec_path)["config"])
  mesh = mesh or mesh_lib.make_mesh()
  model, abstract = networks.abstract_variables(config, mesh)
  expected = traverse_util.flatten_dict(abstract, sep="/")
  try:
    with np.load(root / PARAMS_FILE, allow_pickle=False) as stored:
      arrays = {k: stored[k] for k in stored.files}
  except (OSError, ValueError) as e:
    raise checkpoints.CheckpointError(f"model bundle {root}: {PARAMS_FILE} cannot be read ({e})") from None
  missing = sorted(set(expected) - set(arrays))
  extra = sorted(set(arrays) - set(expected))
  wrong = sorted(k for k in set(expected) & set(arrays) if tuple(arrays[k].shape) != tuple(expected[k].shape))
  if missing or extra or wrong:
    raise checkpoints.CheckpointError(
        f"model bundle {root}: {PARAMS_FILE} does not fit the model its {SPEC_FILE} describes (missing "
        f"{missing[:3]}, unexpected {extra[:3]}, wrong shape {wrong[:3]})")
  variables = traverse_util.unflatten_dict(
      {tuple(k.split("/")): np.asarray(v, expected[k].dtype) for k, v in arrays.items()})
  variables = jax.device_put(variables, mesh_lib.replicated(mesh))
  return state_lib.InferenceState(apply_fn=networks.apply_fn(config, model), params=variables["params"],
                                  batch_stats=variables.get("batch_stats", {})), config

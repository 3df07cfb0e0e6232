"""SPINEPS' labelling model (lab_model.py `VertLabelingClassifier`, network pl_densenet.py `PLClassifier`) converted.

  python -m spine_jax.convert spineps --labeling_folder=DIR --output=OUT      (writes OUT/labeling)

The folder holds SPINEPS' ``inference_config.json`` (``modeltype: 'classifier'``) and a Lightning checkpoint;
the bundle (task ``labeling``, network ``models/labeling.py``) gives the same logits per head.

What is read from where:

* the checkpoint: the last of ``**/*val_f1=*valf1-weights.ckpt`` under the folder in sorted order, as
  ``VertLabelingClassifier.load`` picks it (``search_path(...)[-1]``). Read with torch's weights-only
  loader; the classes of its hyper-parameters (``ARGS_MODEL``) become inert records
  (``torch_files.PickledObject``): nothing is imported or run, no --trust_pickle is needed.
* architecture, from the weights: the trunk ``net.features.*`` (MONAI DenseNet; it must be DenseNet-121 or
  -169, SPINEPS' two, with one input channel) and the heads ``classification_heads.<group>.0`` (and ``.2``
  after the hidden Linear + ReLU of ``classification_linear``), in the file's (ModuleDict) order. The
  hyper-parameters must agree where they say: ``opt.backbone``, ``opt.classification_linear``,
  ``opt.classification_conv`` (a Conv3d head never runs: PLClassifier applies it to the pooled vector) and
  ``group_2_n_channel``. ``opt.dropout`` never reaches SPINEPS' network (MONAI's ``dropout_prob`` stays 0),
  so ``model.dropout`` is 0.
* ``opt.final_size`` (default 152 x 168 x 32, ``DEFAULT_CLASSIFIER_INPUT_SIZE``): the patch, P, I, R voxels
  (even: SPINEPS' cut loses a voxel of an odd size); ``opt.ds_name``: patches rotated to the spine axis only
  when it contains 'v4corpus' (lab_model.py load).
* inference_config.json: ``model_expected_orientation`` (P, I, R: phase 3 here crops and rescales in PIR; only
  PIR converts) and ``resolution_range`` (one spacing, or (min, max) into which each axis of the scan's
  spacing is clamped: seg_model.py ``calc_recommended_resampling_zoom``); ``log_name``, ``modality`` and
  ``acquisition`` are kept for the way back.

The bundle's config, in the fields phase 3 reads (``inference/phase3/naming.py`` ``spec_of``, the training
sampler's ``data`` fields):

* ``model``: ``backbone``, ``heads`` ((group, classes) pairs in SPINEPS' order), ``head_hidden``, ``dropout``
  (0), ``dtype`` (``models/labeling.py``);
* ``data.patch_size``: ``final_size``, (P, I, R) voxels, the network's input;
* ``data.zoom``: the model's spacing (mm, P, I, R) for a single ``resolution_range``; for a (min, max) range
  its lower bound, and ``data.zoom_range`` = ((min), (max)): the scan's spacing clamped into it per axis is the
  spacing SPINEPS rescales to (a phase 3 that reads ``zoom_range`` does the same);
* ``data.crop_margin_mm`` (phase_labeling.py's 128 mm), ``data.corpus_masked`` (True: SPINEPS passes the
  semantic mask), ``data.rotate`` ('v4corpus' in ds_name);
* ``inference``: the level path's settings, ``naming.default_inference_config()`` (SPINEPS' defaults);
  ``convert_pair`` sets ``disable_c1`` from the semantic model's ``has_c1`` as seg_run.py does;
* ``converted_from``: folder, checkpoint, ds_name, log_name, modality, acquisition.
"""
from __future__ import annotations

import json
import pathlib
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from spine_jax.conversion import densenet as densenet_conversion
from spine_jax.conversion import layout
from spine_jax.conversion import torch_files
from spine_jax.conversion.errors import ConversionError, refuse_existing
from spine_jax.conversion.spineps_folder import INFERENCE_CONFIG, model_folder, orientation, positive_numbers
from spine_jax.conversion.spineps_folder import read_inference_config, resolution_bounds
from spine_jax.data import labeling_patches
from spine_jax.data import level_classes
from spine_jax.data import spatial
from spine_jax.engine import bundle
from spine_jax.inference.phase3 import naming
from spine_jax.models import densenet
from spine_jax.models import labeling

CHECKPOINT_PATTERN = "**/*val_f1=*valf1-weights.ckpt"  # lab_model.py VertLabelingClassifier.load
ROTATED_DATASET_MARK = "v4corpus"  # lab_model.py load: patch_rotation = "v4corpus" in ds_name
# SPINEPS' MODEL enum names of our backbones.
SPINEPS_BACKBONE_NAMES = {"densenet121": "DENSENET121", "densenet169": "DENSENET169"}
_HEAD_KEY = re.compile(r"^classification_heads\.([^.]+)\.(\d+)\.(weight|bias)$")


def find_labeling_checkpoint(folder) -> pathlib.Path:
  """The checkpoint SPINEPS loads from a labelling folder: the last ``*val_f1=*valf1-weights.ckpt`` in sorted order."""
  found = sorted(pathlib.Path(folder).glob(CHECKPOINT_PATTERN))
  if not found:
    raise ConversionError(f"{folder}: no {CHECKPOINT_PATTERN} (SPINEPS' labelling model folder holds its Lightning "
                          f"checkpoint under that name)")
  return found[-1]


def read_labeling_checkpoint(path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(state dict as arrays, hyper-parameters) of a PLClassifier Lightning checkpoint; nothing of it runs."""
  checkpoint = torch_files.load(path, stand_ins=True)
  if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
    found = sorted(map(str, checkpoint)) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
    raise ConversionError(f"{path}: no 'state_dict' entry (found {found}); not a Lightning checkpoint")
  arrays = torch_files.strip_common_prefix(torch_files.state_dict_arrays(checkpoint["state_dict"], path, "state_dict"))
  hparams = checkpoint.get("hyper_parameters")
  return arrays, dict(hparams) if isinstance(hparams, Mapping) else {}


def _opt_field(opt, name: str, default=None):
  return opt.get(name, default) if isinstance(opt, Mapping) else getattr(opt, name, default)


def _backbone_name(value) -> str | None:
  """SPINEPS' MODEL name of ``opt.backbone``: a string, or an enum member read as a record (its value the
  MONAI class, or a ResNet's depth)."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, torch_files.PickledObject) and value.pickled_args:
    arg = value.pickled_args[0]
    if isinstance(arg, type) and issubclass(arg, torch_files.PickledObject):
      return arg.pickled_class.rpartition(".")[2].upper()
    if isinstance(arg, int):
      return f"RESNET{arg}"
  return repr(value)


def _heads(arrays: Mapping[str, np.ndarray], features: int, path) -> tuple[tuple[tuple[str, int], ...], bool]:
  """((group, classes) in the file's order, hidden layer or not) of the ``classification_heads`` tensors."""
  layers: dict[str, dict[int, dict[str, np.ndarray]]] = {}
  for key, value in arrays.items():
    match = _HEAD_KEY.match(key)
    if match is None:
      continue
    layers.setdefault(match.group(1), {}).setdefault(int(match.group(2)), {})[match.group(3)] = value
  if not layers:
    raise ConversionError(f"{path}: no classification_heads.* tensors: not a SPINEPS PLClassifier checkpoint")
  heads, hidden_flags = [], set()
  for name, modules in layers.items():
    if any(np.ndim(m.get("weight")) != 2 for m in modules.values()):
      raise ConversionError(f"{path}: classification_heads.{name} holds a non-Linear layer (classification_conv: "
                            f"a Conv3d on the pooled vector, which PLClassifier cannot run); only Linear heads convert")
    hidden = sorted(modules) == [0, 2]
    if sorted(modules) not in ([0], [0, 2]) or any(set(m) != {"weight", "bias"} for m in modules.values()):
      raise ConversionError(f"{path}: classification_heads.{name} has layers {sorted(modules)}; PLClassifier's heads "
                            f"are Linear (0) or Linear, ReLU, Linear (0, 2)")
    width = features // 2 if hidden else features
    if hidden:
      layout.check_shape(path, f"classification_heads.{name}.0.weight", modules[0]["weight"].shape, (width, features))
    last = modules[2 if hidden else 0]["weight"]
    layout.check_shape(path, f"classification_heads.{name}.{2 if hidden else 0}.weight", last.shape,
                       (last.shape[0], width))
    heads.append((name, int(last.shape[0])))
    hidden_flags.add(hidden)
  if len(hidden_flags) != 1:
    raise ConversionError(f"{path}: some heads have a hidden layer and some not; PLClassifier builds them alike")
  try:
    return labeling.normalise_heads(heads), hidden_flags.pop()
  except ValueError as e:
    raise ConversionError(f"{path}: {e}") from None


def plclassifier_architecture(arrays: Mapping[str, np.ndarray], hparams: Mapping[str, Any], path) -> dict[str, Any]:
  """The labelling network the checkpoint describes: backbone, heads, head_hidden, final_size, ds_name;
  the weights decide, the hyper-parameters must agree."""
  unknown = sorted(k for k in arrays if not k.startswith("net.features.") and not _HEAD_KEY.match(k))
  if unknown:
    more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
    raise ConversionError(f"{path}: unexpected keys {unknown[:5]}{more}: a PLClassifier holds net.features.* (its "
                          f"DenseNet) and classification_heads.* only (a ResNet backbone does not convert)")
  _, trunk = densenet_conversion.canonical_keys({k[len("net."):]: v for k, v in arrays.items() if k.startswith("net.")})
  if not trunk:
    raise ConversionError(f"{path}: no net.features.* tensors: not a SPINEPS PLClassifier checkpoint")
  fields = densenet_conversion.infer_architecture(trunk, path)
  backbone = densenet_conversion.preset_name(fields)
  if backbone not in SPINEPS_BACKBONE_NAMES or fields["spatial_dims"] != 3 or fields["in_channels"] != 1:
    raise ConversionError(f"{path}: the trunk is a {densenet_conversion.describe(fields)}; SPINEPS' labelling model "
                          f"is a 3D DenseNet-121 or -169 with 1 input channel")
  opt = hparams.get("opt")
  said = _backbone_name(_opt_field(opt, "backbone"))
  if said is not None and said.upper() != SPINEPS_BACKBONE_NAMES[backbone]:
    raise ConversionError(f"{path}: hyper_parameters opt.backbone is {said!r} but the weights are a {backbone}")
  if _opt_field(opt, "classification_conv"):
    raise ConversionError(f"{path}: opt.classification_conv is set: a Conv3d head on the pooled vector, which "
                          f"PLClassifier cannot run; only Linear heads convert")
  features = densenet.num_features(fields["growth_rate"], fields["block_config"], fields["num_init_features"])
  heads, hidden = _heads(arrays, features, path)
  linear = _opt_field(opt, "classification_linear")
  if linear is not None and bool(linear) != hidden:
    raise ConversionError(f"{path}: opt.classification_linear is {linear} but the heads "
                          f"{'have' if hidden else 'have no'} hidden layer")
  groups = hparams.get("group_2_n_channel")
  if groups is not None and [(str(k), int(v)) for k, v in dict(groups).items()] != list(heads):
    raise ConversionError(f"{path}: hyper_parameters group_2_n_channel {dict(groups)} differs from the heads in the "
                          f"weights {dict(heads)}")
  size = _opt_field(opt, "final_size")
  final_size = (labeling_patches.DEFAULT_PATCH_SIZE if size is None
                else positive_numbers(size, 3, "opt.final_size", path, int))
  try:
    labeling_patches.check_size(final_size, "opt.final_size")
    level_classes.check_heads(heads)
  except ValueError as e:  # HeadError is one
    raise ConversionError(f"{path}: {e}") from None
  smallest = labeling.smallest_patch(backbone)
  if min(final_size) < smallest:
    raise ConversionError(f"{path}: opt.final_size {final_size} is below the {smallest} voxels per axis that a "
                          f"{backbone} pools down to one voxel")
  ds_name = str(_opt_field(opt, "ds_name", "") or "")
  return dict(backbone=backbone, heads=heads, head_hidden=hidden, final_size=tuple(final_size), ds_name=ds_name,
              opt_dropout=_opt_field(opt, "dropout"))


def labeling_config(arch: Mapping[str, Any], config: Mapping[str, Any], folder, provenance: Mapping[str, Any]):
  """A labelling bundle's config (the module docstring's fields) from the checkpoint's architecture and
  inference_config.json."""
  source = pathlib.Path(folder) / INFERENCE_CONFIG
  codes = orientation(config, folder)
  bounds = resolution_bounds(config, folder)
  if codes is None or bounds is None:
    raise ConversionError(f"{source}: needs model_expected_orientation and resolution_range (the labelling phase "
                          f"crops and rescales the scan by them)")
  if codes != tuple(spatial.PIR):
    raise ConversionError(f"{source}: model_expected_orientation {''.join(codes)}: phase 3 here crops and rescales "
                          f"the scan in P, I, R; only PIR converts")
  c = ml_collections.ConfigDict()
  c.task = "labeling"
  c.model = labeling.default_model_config()
  c.model.update(backbone=arch["backbone"], heads=tuple(arch["heads"]), head_hidden=arch["head_hidden"], dropout=0.0)
  c.data = ml_collections.ConfigDict(dict(
      patch_size=tuple(arch["final_size"]), zoom=bounds[0], crop_margin_mm=labeling_patches.LABELING_CROP_MARGIN_MM,
      corpus_masked=True, rotate=ROTATED_DATASET_MARK in arch["ds_name"]))
  if bounds[0] != bounds[1]:
    c.data.zoom_range = bounds
  c.inference = naming.default_inference_config()
  c.converted_from = ml_collections.ConfigDict(dict(provenance))
  for field in ("log_name", "modality", "acquisition"):
    if field in config:
      value = config[field]
      c.converted_from[field] = tuple(value) if isinstance(value, list) else value
  return c


def _trunk_torch_key(path: tuple[str, ...]) -> str:
  """Our trunk variable (collection, *path) -> its key in PLClassifier's state dict (MONAI's ``.layers.``)."""
  return "net." + re.sub(r"(denselayer\d+)\.", r"\1.layers.", densenet_conversion.torch_key(path))


def _head_torch_prefix(name: str, layer: str, hidden: bool) -> str:
  return f"classification_heads.{name}.{2 if hidden and layer == 'out' else 0}"


def labeling_variables(arrays: Mapping[str, np.ndarray], arch: Mapping[str, Any], path) -> dict[str, Any]:
  """``{'params', 'batch_stats'}`` of the labelling network from a PLClassifier state dict, float32."""
  _, trunk_arrays = densenet_conversion.canonical_keys({k[len("net."):]: v for k, v in arrays.items()
                                                        if k.startswith("net.")})
  fields = densenet_conversion.infer_architecture(trunk_arrays, path)
  trunk = densenet_conversion.to_variables(trunk_arrays, densenet_conversion.trunk_template(fields), path)
  params = {"features": trunk["params"]}
  for name, _ in arch["heads"]:
    layers = ("hidden", "out") if arch["head_hidden"] else ("out",)
    params[f"head_{name}"] = {
        layer: {"kernel": np.asarray(arrays[f"{_head_torch_prefix(name, layer, arch['head_hidden'])}.weight"]).T,
                "bias": np.asarray(arrays[f"{_head_torch_prefix(name, layer, arch['head_hidden'])}.bias"])}
        for layer in layers}
  params = jax.tree.map(lambda v: np.ascontiguousarray(v, np.float32), params)
  return {"params": params, "batch_stats": {"features": trunk["batch_stats"]}}


def check_variables(variables: Mapping[str, Any], config, source) -> None:
  """Every variable of the network ``config.model`` describes, at its shape, and no other."""
  model = labeling.build_labeling_model(config.model)
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *config.data.patch_size, 1)),
                                               train=False))
  want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(dict(template), sep="/").items()}
  have = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(dict(variables), sep="/").items()}
  if want != have:
    wrong = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    raise ConversionError(f"{source}: the weights do not fit the labelling network they describe: {wrong[:5]}")


def labeling_state_dict(variables: Mapping[str, Any], model_cfg) -> dict[str, np.ndarray]:
  """PLClassifier's state dict of our labelling network's variables (the inverse of `labeling_variables`)."""
  hidden = bool(model_cfg.head_hidden)
  out: dict[str, np.ndarray] = {}
  for collection in ("params", "batch_stats"):
    tree = dict(variables.get(collection) or {})
    for path, value in traverse_util.flatten_dict(dict(tree.get("features") or {})).items():
      value = np.asarray(value, np.float32)
      key = _trunk_torch_key((collection, *path))
      out[key] = np.ascontiguousarray(layout.conv_from_flax(value) if path[-1] == "kernel" else value)
      if key.endswith(".running_var"):  # torch's BatchNorm counts its updates; its state dict has the entry
        out[key[:-len("running_var")] + "num_batches_tracked"] = np.zeros((), np.int64)
  for name, _ in labeling.normalise_heads(model_cfg.heads):
    for layer, dense in dict(variables["params"][f"head_{name}"]).items():
      prefix = _head_torch_prefix(name, layer, hidden)
      out[f"{prefix}.weight"] = np.ascontiguousarray(np.asarray(dense["kernel"], np.float32).T)
      out[f"{prefix}.bias"] = np.asarray(dense["bias"], np.float32)
  return out


_READ_FIELDS = ("modeltype", "model_expected_orientation", "resolution_range", "log_name", "modality", "acquisition")


def prepare_labeling(folder) -> tuple[ml_collections.ConfigDict, dict[str, Any], dict[str, Any]]:
  """(config, variables, summary) of SPINEPS' labelling model folder; reads and checks, writes nothing."""
  folder = model_folder(folder, "labelling")
  config = read_inference_config(folder, modeltype="classifier")
  checkpoint = find_labeling_checkpoint(folder)
  arrays, hparams = read_labeling_checkpoint(checkpoint)
  arch = plclassifier_architecture(arrays, hparams, checkpoint)
  provenance = dict(folder=str(folder.absolute()), checkpoint=str(checkpoint.absolute()), ds_name=arch["ds_name"],
                    inference_config_fields=sorted(k for k in config if k in _READ_FIELDS))
  cfg = labeling_config(arch, config, folder, provenance)
  variables = labeling_variables(arrays, arch, checkpoint)
  check_variables(variables, cfg, checkpoint)
  summary = {**provenance, "backbone": arch["backbone"], "heads": [list(h) for h in arch["heads"]],
             "head_hidden": arch["head_hidden"], "patch_size": list(cfg.data.patch_size), "rotate": cfg.data.rotate,
             "zoom": list(cfg.data.zoom), "zoom_range": [list(b) for b in cfg.data.get("zoom_range", ())] or None,
             "num_parameters": int(sum(np.size(v) for v in jax.tree.leaves(variables["params"]))),
             "unused_opt_dropout": arch["opt_dropout"]}
  return cfg, variables, summary


def write_labeling_bundle(output, config, variables, summary: Mapping[str, Any]) -> pathlib.Path:
  return bundle.write_bundle(output, config, variables, extra_files={"conversion.json": json.dumps(summary, indent=2)})


def convert_labeling_folder(folder, output, *, overwrite: bool = False) -> dict[str, Any]:
  """SPINEPS' labelling model folder -> a labelling model bundle at ``output``, complete or not at all."""
  output = pathlib.Path(output).absolute()
  refuse_existing(output, overwrite)
  cfg, variables, summary = prepare_labeling(folder)
  summary["output"] = str(output)
  refuse_existing(output, overwrite)  # again: it may have appeared while converting
  write_labeling_bundle(output, cfg, variables, summary)
  return summary

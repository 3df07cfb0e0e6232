"""SPINEPS' model pair converted: the instance network, and the semantic and instance folders together.

(How SPINEPS' model folders are read, inference_config.json and TPTBox's label names, is
``spineps_folder.py``, which the nnU-Net converter shares.)

The instance network (``modeltype: 'unet'``: ``inference_config.json`` and a Lightning
``*weights*.ckpt`` whose ``state_dict`` keys are prefixed ``network.``) converts with
``convert_instance_folder`` into an instance model bundle (``models/instance_unet.py``), and
``convert_pair`` converts a semantic and an instance folder into ``OUTPUT/semantic`` and
``OUTPUT/instance`` for ``python -m spine_jax.predict spine``, and a labelling folder (``spineps_labeling.py``)
into ``OUTPUT/labeling`` beside them.

What the instance conversion takes from where:

* architecture: from the weights (``init_conv.weight`` gives ``dim``, input channels and the
  initial kernel; ``downs.{i}.0.block1.proj.weight`` the widths, hence ``dim_mults``;
  ``final_conv.weight`` the classes). SPINEPS records none of it in inference_config.json.
  GroupNorm groups are Unet3D's default, 8. Input channels must be 10 and classes 4 (the
  one-hot encoding and outputs phase 2 here uses).
* inference_config.json: ``modeltype`` (must be ``unet``), ``model_expected_orientation``
  (must be P, I, R), ``resolution_range`` (the spacing, P, I, R; a (min, max) range: the semantic
  model's spacing clamped into it when the pair converts together, as SPINEPS rescales phase 1's
  mask for phase 2 (seg_model.py `calc_recommended_resampling_zoom`); alone, the finer bound),
  ``cutout_size``, ``corpus_size_cleaning`` (-> ``inference.min_body_voxels``),
  ``vert_size_threshold`` (-> ``inference.min_instance_voxels``) and ``mapping`` (must relabel
  41..48 -> 1..8 and 49 -> 9 as ``inference/phase2/cutouts.py`` does). Other fields are ignored.
* everything else: ``spineps_instance_config`` (SPINEPS 1.x scale).
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

from spine_jax.conversion import layout
from spine_jax.conversion import torch_files
from spine_jax.conversion.errors import ConversionError, refuse_existing
from spine_jax.conversion.spineps_folder import INFERENCE_CONFIG, model_folder, orientation, positive_numbers
from spine_jax.conversion.spineps_folder import read_inference_config, resolution_bounds
from spine_jax.data import instance_cutouts
from spine_jax.data import nifti
from spine_jax.data import spatial
from spine_jax.engine import bundle
from spine_jax.inference.phase2 import common as phase2_common
from spine_jax.models import instance_unet

def find_lightning_checkpoint(folder) -> pathlib.Path:
  """The one ``*weights*.ckpt`` under ``folder`` (as SPINEPS looks for it), else the one ``*.ckpt``."""
  folder = pathlib.Path(folder)
  for pattern in ("*weights*.ckpt", "*.ckpt"):
    found = sorted(p for p in folder.rglob(pattern) if p.is_file())
    if len(found) == 1:
      return found[0]
    if len(found) > 1:
      raise ConversionError(f"{folder}: more than one {pattern} ({', '.join(str(p) for p in found)}); keep one")
  raise ConversionError(f"{folder}: no Lightning checkpoint (*weights*.ckpt or *.ckpt) in SPINEPS' instance "
                        f"model folder")


def lightning_network_arrays(path, *, trust_pickle: bool = False) -> dict[str, np.ndarray]:
  """The Unet3D state dict of a Lightning checkpoint, without the ``network.`` prefix."""
  checkpoint = torch_files.load(path, trust_pickle=trust_pickle)
  if isinstance(checkpoint, Mapping) and "state_dict" in checkpoint:
    arrays = torch_files.state_dict_arrays(checkpoint["state_dict"], path, "state_dict")
  elif isinstance(checkpoint, Mapping) and checkpoint and all(torch_files.is_tensor(v) for v in checkpoint.values()):
    arrays = torch_files.state_dict_arrays(checkpoint, path)
  else:
    found = sorted(map(str, checkpoint)) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
    raise ConversionError(f"{path}: no 'state_dict' entry (found {found}); not a Lightning checkpoint")
  arrays = torch_files.strip_common_prefix(arrays)
  if any(k.startswith("network.") for k in arrays):  # the LightningModule's other tensors are not the network
    arrays = {k[len("network."):]: v for k, v in arrays.items() if k.startswith("network.")}
  return arrays


def _shape(arrays, key, ndim, path) -> tuple[int, ...]:
  if key not in arrays:
    raise ConversionError(f"{path}: missing {key} (a SPINEPS Unet3D state dict has it)")
  shape = tuple(np.shape(arrays[key]))
  if len(shape) != ndim:
    raise ConversionError(f"{path}: {key} has shape {shape}, expected {ndim} dimensions")
  return shape


def unet3d_architecture(arrays: Mapping[str, np.ndarray], path) -> dict[str, Any]:
  """``default_instance_unet_config`` fields that the Unet3D weights imply (dim, dim_mults, ...)."""
  dim, channels, k = _shape(arrays, "init_conv.weight", 5, path)[:3]
  widths, level = [], 0
  while f"downs.{level}.0.block1.proj.weight" in arrays:
    widths.append(_shape(arrays, f"downs.{level}.0.block1.proj.weight", 5, path)[0])
    level += 1
  if not widths:
    raise ConversionError(f"{path}: missing downs.0.0.block1.proj.weight (a SPINEPS Unet3D state dict has it)")
  if any(w % dim for w in widths):
    raise ConversionError(f"{path}: widths {widths} are not multiples of init_conv's {dim} channels (dim)")
  num_classes = _shape(arrays, "final_conv.weight", 5, path)[0]
  if channels != 10 or num_classes != 4:
    raise ConversionError(f"{path}: a Unet3D with {channels} input channels and {num_classes} outputs; phase 2 "
                          f"here feeds 10 one-hot channels and reads 4 classes (SPINEPS' multi-channel network)")
  if any(w % 8 for w in (dim, *widths)):
    raise ConversionError(f"{path}: widths {(dim, *widths)} are not divisible by Unet3D's 8 GroupNorm groups")
  return dict(dim=int(dim), dim_mults=tuple(int(w // dim) for w in widths), in_channels=int(channels),
              num_classes=int(num_classes), groups=8, init_kernel=int(k))


SPINEPS_FIRST_VERTEBRA, SPINEPS_FIRST_VERTEBRA_WITH_C1 = 2, 1


def spineps_instance_config() -> ml_collections.ConfigDict:
  """SPINEPS' instance model as a bundle describes it: the network at SPINEPS 1.x scale (widths
  16..128, 5.4 M parameters), the reference spacing in PIR, 248 x 304 x 64 cutouts and phase 2's
  settings. No training field: the converter takes the architecture and phase-2 settings from
  the model folder; `configs/instance.py` adds what training needs.
  """
  c = ml_collections.ConfigDict()
  c.task = "instance"
  c.model = instance_unet.default_instance_unet_config()
  c.data = ml_collections.ConfigDict()
  c.data.preprocess = ml_collections.ConfigDict(dict(
      axcodes=spatial.PIR, spacing=spatial.REFERENCE_SPACING, image_order=3,
      max_intensity=spatial.SPINEPS_MAX_INTENSITY, max_voxels=spatial.DEFAULT_MAX_VOXELS))
  c.data.cutout = instance_cutouts.default_cutout_config()
  # Phase 2 as inference and evaluation run it (inference/phase2), with the training cutout size:
  # one size for both (changing either field moves the other).
  c.inference = phase2_common.default_instance_config()
  c.inference.cutout_size = c.data.cutout.get_ref("cutout_size")
  return c


def instance_config(arch: Mapping[str, Any], config: Mapping[str, Any], folder, provenance: Mapping[str, Any]):
  """An instance bundle's config: `spineps_instance_config`, the weights' architecture and the
  inference_config.json fields listed in the module docstring."""
  source = pathlib.Path(folder) / INFERENCE_CONFIG
  bounds = None
  c = spineps_instance_config()
  c.model.update(dict(arch))
  c.data.preprocess.grid = spatial.SPINEPS_GRID  # SPINEPS resamples with TPTBox's grid
  # Without a labelling model SPINEPS numbers the top vertebra 2 (C2: its MRI models have no C1), or 1 when
  # the semantic model says has_c1 (seg_run.py vertebra_instance_labeling_offset; convert_pair reads it).
  c.inference.first_vertebra = SPINEPS_FIRST_VERTEBRA
  c.inference.postprocess_mode = phase2_common.SPINEPS_MODE  # SPINEPS' joint clean-up (phase2/joint_postprocess.py)
  c.inference.phase2_mode = phase2_common.SPINEPS_MODE  # SPINEPS' own centres and merge (phase2/spineps_instances.py)
  codes = orientation(config, folder)
  if codes is not None and codes != tuple(spatial.PIR):
    raise ConversionError(f"{source}: model_expected_orientation {''.join(codes)}: phase 2 here cuts out of "
                          f"P, I, R volumes; only PIR converts")
  resolution = resolution_bounds(config, folder)
  if resolution is not None:
    low, high = resolution
    if low != high:
      bounds = dict(low=low, high=high)
    c.data.preprocess.spacing = low  # until the semantic model's spacing is known (`clamp_to_range`)
  if "cutout_size" in config:
    size = positive_numbers(config["cutout_size"], 3, "cutout_size", source, int)
    divisor = 2 ** (len(arch["dim_mults"]) - 1)
    if any(n % divisor for n in size):
      raise ConversionError(f"{source}: cutout_size {size} is not divisible by {divisor} (2 ** (levels - 1))")
    c.data.cutout.cutout_size = size
  for field, ours in (("corpus_size_cleaning", "min_body_voxels"), ("vert_size_threshold", "min_instance_voxels")):
    if field in config:
      try:
        c.inference[ours] = int(config[field])
      except (TypeError, ValueError):
        raise ConversionError(f"{source}: {field} {config[field]!r} is not a number") from None
  mapping = config.get("mapping")
  if mapping is not None:
    try:
      mapping = {int(k): int(v) for k, v in dict(mapping).items()}
    except (TypeError, ValueError):
      raise ConversionError(f"{source}: mapping {config['mapping']!r} is not {{SPINEPS id: class}}") from None
    expected = {label: i + 1 for i, label in enumerate(phase2_common.VERTEBRA_LABELS)}
    wrong = {k: mapping.get(k) for k, v in expected.items() if mapping.get(k) != v}
    if wrong:
      raise ConversionError(f"{source}: mapping sends {wrong}; phase 2 here encodes {expected} "
                            f"(inference/phase2/cutouts.py relabel_for_instance)")
  c.converted_from = ml_collections.ConfigDict(dict(provenance))
  if bounds is not None:  # a (min, max) resolution_range, for `clamp_to_range`
    c.converted_from.resolution_range = ml_collections.ConfigDict(bounds)
  instance_unet.build_instance_unet(c.model).check_input((1, *c.data.cutout.cutout_size, c.model.in_channels))
  return c


def clamp_to_range(config, semantic_spacing) -> None:
  """The instance model's spacing for a semantic model of `semantic_spacing` (P, I, R mm), for an instance
  resolution_range given as (min, max): each axis clamped into it, as SPINEPS' seg_model.py
  `calc_recommended_resampling_zoom` does with phase 1's mask."""
  bounds = (config.get("converted_from") or {}).get("resolution_range")
  if bounds is None:
    return
  config.data.preprocess.spacing = tuple(float(min(max(s, lo), hi))
                                         for s, lo, hi in zip(semantic_spacing, bounds.low, bounds.high))


def instance_params(arrays: Mapping[str, np.ndarray], model_cfg, path) -> dict[str, Any]:
  """Flax params of the instance U-Net ``model_cfg`` from a Unet3D state dict; every key used, shapes checked."""
  import jax
  import jax.numpy as jnp
  from flax import traverse_util

  from spine_jax.models import instance_unet

  model = instance_unet.build_instance_unet(model_cfg)
  shape = (1, *(model.divisor,) * 3, int(model_cfg["in_channels"]))
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))["params"]
  used = set()
  for p, leaf in traverse_util.flatten_dict(template).items():
    key = instance_unet.pytorch_key(p)
    expected = tuple(leaf.shape)
    if len(expected) == 5:
      expected = ((expected[-2], expected[-1], *expected[:3]) if p[0].endswith("transpconv")
                  else layout.conv_from_flax_shape(expected))
    if key not in arrays:
      raise ConversionError(f"{path}: missing network.{key} (the network needs a tensor of shape {expected})")
    layout.check_shape(path, f"network.{key}", np.shape(arrays[key]), expected)
    used.add(key)
  unexpected = sorted(k for k in arrays if k not in used)
  if unexpected:
    more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
    raise ConversionError(f"{path}: unexpected keys {['network.' + k for k in unexpected[:5]]}{more}: not part of "
                          f"the Unet3D the weights describe")
  params = instance_unet.params_from_pytorch(arrays, template)
  return jax.tree.map(lambda v: np.asarray(v, np.float32), params)


def write_instance_bundle(output, config, params, *, extra_files: Mapping[str, str] | None = None):
  """The instance model as a model bundle (step 0) at ``output``."""
  return bundle.write_bundle(output, config, {"params": params}, extra_files=extra_files)


def prepare_instance(folder, *, trust_pickle: bool = False):
  """(config, params, summary) of SPINEPS' instance model folder; reads and checks, writes nothing."""
  folder = model_folder(folder, "instance")
  config = read_inference_config(folder, modeltype="unet")
  checkpoint = find_lightning_checkpoint(folder)
  arrays = lightning_network_arrays(checkpoint, trust_pickle=trust_pickle)
  arch = unet3d_architecture(arrays, checkpoint)
  provenance = dict(folder=str(folder.absolute()), checkpoint=str(checkpoint.absolute()),
                    inference_config_fields=sorted(k for k in config if k in _READ_FIELDS))
  cfg = instance_config(arch, config, folder, provenance)
  params = instance_params(arrays, cfg.model, checkpoint)
  summary = {**provenance, "dim": arch["dim"], "dim_mults": list(arch["dim_mults"]),
             "spacing": list(cfg.data.preprocess.spacing), "cutout_size": list(cfg.data.cutout.cutout_size),
             "num_parameters": int(sum(np.size(v) for v in jax.tree.leaves(params)))}
  return cfg, params, summary


_READ_FIELDS = ("modeltype", "model_expected_orientation", "resolution_range", "cutout_size",
                "corpus_size_cleaning", "vert_size_threshold", "mapping")


def _publish(tmp: pathlib.Path, output: pathlib.Path, overwrite: bool) -> None:
  refuse_existing(output, overwrite)  # again: it may have appeared while converting
  nifti.replace_directory(tmp, output)


def convert_instance_folder(folder, output, *, trust_pickle: bool = False, overwrite: bool = False) -> dict[str, Any]:
  """SPINEPS' instance model folder -> an instance model bundle at ``output``, complete or not at all."""
  output = pathlib.Path(output).absolute()
  refuse_existing(output, overwrite)
  cfg, params, summary = prepare_instance(folder, trust_pickle=trust_pickle)
  summary["output"] = str(output)
  refuse_existing(output, overwrite)  # again: it may have appeared while converting
  write_instance_bundle(output, cfg, params, extra_files={"conversion.json": json.dumps(summary, indent=2)})
  return summary


def convert_pair(output, *, semantic_folder=None, instance_folder=None, labeling_folder=None,
                 trust_pickle: bool = False, overwrite: bool = False, spineps_defects: bool = False,
                 **nnunet_kwargs) -> dict[str, Any]:
  """SPINEPS' semantic, instance and/or labelling model folders -> ``output/semantic``, ``output/instance`` and
  ``output/labeling`` (``spineps_labeling.py``): one model set.

  `spineps_defects` keeps the SPINEPS behaviours that the default corrects, to reproduce its masks: the
  float16 window weights of the semantic sliding window, the end of the instance phase on an empty couple
  and the level path's reading of --enforce-12-thoracic on the 26-class axis.

  All are converted in a temporary folder beside ``output`` that is renamed into place only when
  every conversion succeeded.
  """
  from spine_jax.conversion import nnunet
  from spine_jax.conversion import spineps_labeling

  if semantic_folder is None and instance_folder is None and labeling_folder is None:
    raise ConversionError("give --semantic_folder, --instance_folder and/or --labeling_folder")
  output = pathlib.Path(output).absolute()
  refuse_existing(output, overwrite)
  prepared = prepare_instance(instance_folder, trust_pickle=trust_pickle) if instance_folder is not None else None
  labeling_model = spineps_labeling.prepare_labeling(labeling_folder) if labeling_folder is not None else None
  if labeling_model is not None and spineps_defects:
    labeling_model[0].inference.spineps_defects = True
  if prepared is not None and spineps_defects:
    prepared[0].inference.abort_on_empty_couple = True
  output.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
  summary: dict[str, Any] = {"output": str(output)}
  try:
    if semantic_folder is not None:
      folder = model_folder(semantic_folder, "semantic")
      semantic_config = read_inference_config(folder, modeltype="nnunet")  # a swapped pair fails here, naming the fix
      if semantic_config and semantic_config.get("has_c1"):
        if prepared is not None:
          prepared[0].inference.first_vertebra = SPINEPS_FIRST_VERTEBRA_WITH_C1
        if labeling_model is not None:  # seg_run.py: the path may start at C1 (disable_c1 = not has_c1)
          labeling_model[0].inference.disable_c1 = False
      summary["semantic"] = nnunet.convert_folder(folder, tmp / "semantic", trust_pickle=trust_pickle,
                                                  spineps_defects=spineps_defects, **nnunet_kwargs)
      summary["semantic"]["output"] = str(output / "semantic")
      if prepared is not None:
        clamp_to_range(prepared[0], summary["semantic"]["spacing"])
    if prepared is not None:
      cfg, params, inst = prepared
      inst["output"] = str(output / "instance")
      write_instance_bundle(tmp / "instance", cfg, params, extra_files={"conversion.json": json.dumps(inst, indent=2)})
      summary["instance"] = inst
    if labeling_model is not None:
      cfg, variables, lab = labeling_model
      lab["output"] = str(output / "labeling")
      spineps_labeling.write_labeling_bundle(tmp / "labeling", cfg, variables, lab)
      summary["labeling"] = lab
    _publish(tmp, output, overwrite)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return summary

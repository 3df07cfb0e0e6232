"""spine_jax's semantic and instance models -> SPINEPS 2.1.3 model folders: `convert spineps` backwards.

  python -m spine_jax.convert export_spineps --semantic_checkpoint=RUN --instance_checkpoint=RUN \
      [--labeling_checkpoint=RUN] --output=DIR

writes DIR/semantic, an nnU-Net v2 results folder (plans.json, dataset.json,
fold_0/checkpoint_final.pth with `network_weights`, `trainer_name`, `init_args` and the mirroring
axes) with SPINEPS' inference_config.json, DIR/instance, SPINEPS' instance folder
(inference_config.json and a Lightning `*weights*.ckpt` of its `PLNet`/`Unet3D`), and DIR/labeling,
SPINEPS' labelling folder (inference_config.json with `modeltype: classifier` and a Lightning
`*val_f1=*valf1-weights.ckpt` of its `PLClassifier`). SPINEPS loads them as its own (`spineps sample
-ms DIR/semantic -mi DIR/instance -ml DIR/labeling`), and `convert spineps` reads them back to
bit-identical parameters.

Axes: our semantic model space is the bundle's `axcodes` (PIR for SPINEPS); nnU-Net sees the
same voxels with the array axes reversed (TPTBox's `run_inference` transposes, as SimpleITK reads a
NIfTI), so kernels, strides, patch and spacing are written in reversed order with
`transpose_forward` [0, 1, 2]. The instance network sees cutouts in our axis order, the labelling network patches in P, I, R as ours.

Mirroring: spine_jax's test-time mirroring along R swaps the left and right channels back, which
nnU-Net's mirroring cannot, so a model trained here says `inference_augmentation: false`; a converted
nnU-Net model (which mirrors without the swap) keeps its axes.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import tempfile
from typing import Any, Mapping

import jax
import numpy as np
from flax import traverse_util

from spine_jax.conversion import layout
from spine_jax.conversion import nnunet_plans
from spine_jax.conversion import spineps_labeling
from spine_jax.conversion.errors import ConversionError, refuse_existing
from spine_jax.conversion.spineps_folder import INFERENCE_CONFIG, LOCATION_IDS
from spine_jax.data import labeling_patches
from spine_jax.data import nifti
from spine_jax.data import spatial
from spine_jax.data import spine_labels
from spine_jax.engine import networks
from spine_jax.inference import restore
from spine_jax.inference.phase2 import common as phase2_common
from spine_jax.models import instance_unet
from spine_jax.models import labeling
from spine_jax.models import unet

CONFIGURATION = "3d_fullres"
TRAINER = "nnUNetTrainer"
CHECKPOINT_FILE = "checkpoint_final.pth"
INSTANCE_WEIGHTS_FILE = "spine_jax_instance_weights.ckpt"
LABELING_WEIGHTS_FILE = "spine_jax_labeling-val_f1=none-valf1-weights.ckpt"  # lab_model.py's *val_f1=*valf1-weights.ckpt
LIGHTNING_VERSION = "2.6.6"
# nnU-Net's plan as SPINEPS' semantic model folders hold it: SimpleITK's reversed axes, no transposition.
READER = "SimpleITKIO"
TRANSPOSE = (0, 1, 2)
# TPTBox names of the semantic structures, as SPINEPS' inference_config.json spells its labels.
_LOCATION_NAME = {v: k for k, v in LOCATION_IDS.items()
                  if k not in ("Vertebra_Corpus", "Sacrum", "background", "Unknown")}
# PLNet (spineps/architectures_new/pl_unet.py) builds Unet3D(dim, (1, 2, 4, 8), out_dim=4, channels).
INSTANCE_DIM_MULTS = (1, 2, 4, 8)
_PYTORCH_NORM = {"instance": "torch.nn.modules.instancenorm.InstanceNorm3d",
                 "batch": "torch.nn.modules.batchnorm.BatchNorm3d"}


def network_order() -> tuple[int, ...]:
  """For each of our model axes, the nnU-Net network axis it is written on (the importer's own rule)."""
  return nnunet_plans.spatial_order({"image_reader_writer": READER, "transpose_forward": list(TRANSPOSE)},
                                    "export")


def _aliases(key: str) -> list[str]:
  """The other names PlainConvUNet's state dict gives a tensor: `all_modules.{0,1}` (conv, norm) of every
  conv block and `decoder.encoder.*` (the decoder keeps a reference to the encoder)."""
  out = []
  for part, index in ((".conv.", 0), (".norm.", 1)):
    if ".convs." in key and part in key:
      out.append(key.replace(part, f".all_modules.{index}.", 1))
  if key.startswith("encoder."):
    out += [f"decoder.{k}" for k in (key, *out)]
  return out


def semantic_state_dict(variables: Mapping[str, Any], model_cfg) -> dict[str, np.ndarray]:
  """A PlainConvUNet state dict (network axes) of our semantic U-Net's variables, aliases included."""
  if model_cfg.norm not in _PYTORCH_NORM:
    raise ConversionError(f"model.norm {model_cfg.norm!r}: nnU-Net's PlainConvUNet here takes "
                          f"{', '.join(_PYTORCH_NORM)} normalisation")
  order = network_order()
  out: dict[str, np.ndarray] = {}
  for collection in ("params", "batch_stats"):
    for path, value in traverse_util.flatten_dict(dict(variables.get(collection) or {})).items():
      value = np.asarray(value, np.float32)
      if path[-1] == "kernel":
        transposed = path[0].startswith("decoder_transpconv")
        value = (layout.transposed_conv_from_flax if transposed else layout.conv_from_flax)(value, order)
      key = unet.pytorch_key(path)
      out[key] = np.ascontiguousarray(value)
      if key.endswith(".running_var"):  # torch's BatchNorm counts its updates; loading needs the entry
        out[key[:-len("running_var")] + "num_batches_tracked"] = np.zeros((), np.int64)
  for key in list(out):
    for alias in _aliases(key):
      out[alias] = out[key]
  return out


def network_axes(values) -> list:
  """Per-axis values (kernel, stride, patch, spacing) of our model axes in nnU-Net's network axes."""
  order = network_order()
  return [values[order.index(a)] for a in range(3)]


def semantic_arch_kwargs(model_cfg) -> dict[str, Any]:
  """plans.json `arch_kwargs` of our U-Net config, in network axes."""
  back = lambda values: [int(v) for v in network_axes(values)]
  nonlin = ("torch.nn.LeakyReLU", {"negative_slope": float(model_cfg.leaky_relu_slope), "inplace": True})
  return dict(n_stages=int(model_cfg.n_stages), features_per_stage=[int(f) for f in model_cfg.features_per_stage],
              conv_op="torch.nn.modules.conv.Conv3d",
              kernel_sizes=[back(k) for k in model_cfg.kernel_sizes], strides=[back(s) for s in model_cfg.strides],
              n_conv_per_stage=[int(n) for n in model_cfg.n_conv_per_stage],
              n_conv_per_stage_decoder=[int(n) for n in model_cfg.n_conv_per_stage_decoder],
              conv_bias=bool(model_cfg.conv_bias), norm_op=_PYTORCH_NORM[model_cfg.norm],
              norm_op_kwargs={"eps": 1e-05, "affine": True}, dropout_op=None, dropout_op_kwargs=None,
              nonlin=nonlin[0], nonlin_kwargs=nonlin[1])


def semantic_plans(config) -> dict[str, Any]:
  """plans.json with one 3d_fullres configuration: the architecture, patch, spacing and z-scoring."""
  spacing = [float(s) for s in network_axes(tuple(config.data.preprocess.spacing))]
  patch = [int(p) for p in network_axes(tuple(config.data.patch.patch_size))]
  resample = lambda is_seg, order: {"is_seg": is_seg, "order": order, "order_z": 0, "force_separate_z": None}
  configuration = dict(
      data_identifier=f"nnUNetPlans_{CONFIGURATION}", preprocessor_name="DefaultPreprocessor", batch_size=2,
      patch_size=patch, median_image_size_in_voxels=patch, spacing=spacing,
      normalization_schemes=["ZScoreNormalization"], use_mask_for_norm=[False],
      resampling_fn_data="resample_data_or_seg_to_shape", resampling_fn_data_kwargs=resample(False, 3),
      resampling_fn_seg="resample_data_or_seg_to_shape", resampling_fn_seg_kwargs=resample(True, 1),
      resampling_fn_probabilities="resample_data_or_seg_to_shape",
      resampling_fn_probabilities_kwargs=resample(False, 1), batch_dice=False,
      architecture={"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                    "arch_kwargs": semantic_arch_kwargs(config.model),
                    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]})
  return {"dataset_name": "Dataset001_spine_jax", "plans_name": "nnUNetPlans",
          "original_median_spacing_after_transp": spacing, "original_median_shape_after_transp": patch,
          "image_reader_writer": READER, "transpose_forward": list(TRANSPOSE), "transpose_backward": list(TRANSPOSE),
          "configurations": {CONFIGURATION: configuration}, "experiment_planner_used": "ExperimentPlanner",
          "label_manager": "LabelManager",
          "foreground_intensity_properties_per_channel": {"0": {"max": 1.0, "mean": 0.0, "median": 0.0, "min": 0.0,
                                                                "percentile_00_5": 0.0, "percentile_99_5": 1.0,
                                                                "std": 1.0}}}


def semantic_labels() -> dict[str, int]:
  """dataset.json labels: our channel order, by TPTBox name."""
  return {"background": 0, **{_LOCATION_NAME[i]: k for k, i in enumerate(spine_labels.SEMANTIC_IDS) if i}}


def exported_mirror_axes(config) -> tuple[int, ...]:
  """nnU-Net's mirroring axes (network axes) for a bundle whose mirroring nnU-Net can do: one without
  the left-right channel swap (a converted nnU-Net model); none otherwise."""
  inference = config.get("inference") or {}
  if inference.get("mirror_swaps_left_right", True):
    return ()
  order = network_order()
  return tuple(sorted(order[j] for j in inference.get("mirror_axes", ())))


def semantic_inference_config(config) -> dict[str, Any]:
  return {"log_name": "spine_jax_semantic", "modality": "T2w", "acquisition": "sag", "modeltype": "nnunet",
          "model_expected_orientation": list(config.data.preprocess.axcodes),
          "available_folds": networks.ensemble_size(config),
          "inference_augmentation": bool(exported_mirror_axes(config)),
          "resolution_range": [float(s) for s in config.data.preprocess.spacing],
          "default_step_size": float(config.inference.get("step_size", 0.5)),
          "labels": {str(k): _LOCATION_NAME[i] for k, i in enumerate(spine_labels.SEMANTIC_IDS) if i}}


def write_semantic_folder(folder: pathlib.Path, config, variables: Mapping[str, Any]) -> None:
  """An nnU-Net v2 results folder with SPINEPS' inference_config.json, written into `folder`."""
  import torch

  plans, dataset = semantic_plans(config), {"channel_names": {"0": "T2w"}, "labels": semantic_labels(),
                                            "numTraining": 0, "file_ending": ".nii.gz"}
  folder.mkdir(parents=True)
  (folder / "plans.json").write_text(json.dumps(plans, indent=2))
  (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
  (folder / INFERENCE_CONFIG).write_text(json.dumps(semantic_inference_config(config), indent=2))
  members = networks.ensemble_size(config)
  for fold in range(members):  # an ensemble's members are the folds again
    member = variables if members == 1 else jax.tree.map(lambda v, k=fold: np.asarray(v)[k], dict(variables))
    weights = {k: torch.from_numpy(np.array(v)) for k, v in semantic_state_dict(member, config.model).items()}
    (folder / f"fold_{fold}").mkdir()
    torch.save({"network_weights": weights, "trainer_name": TRAINER, "current_epoch": 0,
                "init_args": {"plans": plans, "configuration": CONFIGURATION, "fold": fold, "dataset_json": dataset},
                "inference_allowed_mirroring_axes": exported_mirror_axes(config)},
               folder / f"fold_{fold}" / CHECKPOINT_FILE)


def instance_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """A Unet3D state dict of our instance U-Net's parameters (same axes: cutouts are PIR on both sides)."""
  out = {}
  for path, value in traverse_util.flatten_dict(dict(params)).items():
    value = np.asarray(value, np.float32)
    if value.ndim == 5:
      value = (layout.transposed_conv_from_flax(value) if path[0].endswith("transpconv")
               else layout.conv_from_flax(value))
    out[instance_unet.pytorch_key(path)] = np.ascontiguousarray(value)
  return out


def check_instance_model(model_cfg) -> None:
  """SPINEPS builds only Unet3D(dim, (1, 2, 4, 8), out_dim=4, channels=10) with GroupNorm(8) and a 7³ stem."""
  found = dict(dim_mults=tuple(model_cfg.dim_mults), in_channels=int(model_cfg.in_channels),
               num_classes=int(model_cfg.num_classes), groups=int(model_cfg.groups),
               init_kernel=int(model_cfg.init_kernel))
  wanted = dict(dim_mults=INSTANCE_DIM_MULTS, in_channels=phase2_common.INPUT_CHANNELS,
                num_classes=phase2_common.OUTPUT_CHANNELS, groups=8, init_kernel=7)
  wrong = {k: v for k, v in found.items() if v != wanted[k]}
  if wrong:
    raise ConversionError(f"instance model {wrong}: SPINEPS' PLNet builds only {wanted} (with any dim)")


def spineps_voxel_count(config, count: int) -> int:
  """A phase-2 voxel threshold as SPINEPS reads it: voxels at the model's own spacing. Ours count at the
  reference spacing unless the model already runs SPINEPS' phase 2 (a converted SPINEPS model)."""
  if config.inference.get("phase2_mode", phase2_common.SPINE_JAX_MODE) == phase2_common.SPINEPS_MODE:
    return int(count)
  return max(1, int(round(count * np.prod(spatial.REFERENCE_SPACING) / np.prod(config.data.preprocess.spacing))))


def instance_inference_config(config) -> dict[str, Any]:
  """SPINEPS' instance inference_config.json; voxel thresholds at SPINEPS' per-spacing counts."""
  return {"log_name": "spine_jax_instance", "modality": "SEG", "acquisition": "sag", "modeltype": "unet",
          "model_expected_orientation": list(config.data.preprocess.axcodes), "available_folds": 1,
          "inference_augmentation": False, "resolution_range": [float(s) for s in config.data.preprocess.spacing],
          "default_step_size": 0.5, "labels": {"1": 1, "2": 2, "3": 3},
          "cutout_size": [int(n) for n in config.data.cutout.cutout_size],
          "corpus_size_cleaning": spineps_voxel_count(config, config.inference.min_body_voxels),
          "vert_size_threshold": spineps_voxel_count(config, config.inference.min_instance_voxels)}


def write_instance_folder(folder: pathlib.Path, config, params: Mapping[str, Any]) -> None:
  """SPINEPS' instance folder: inference_config.json and the Lightning checkpoint PLNet restores from."""
  import torch

  check_instance_model(config.model)
  weights = {f"network.{k}": torch.from_numpy(np.array(v)) for k, v in instance_state_dict(params).items()}
  opt = argparse.Namespace(channelwise=True, n_epoch=0, lr=1e-4, lr_end_factor=0.01, l2_reg_w=1e-4, dsc_loss_w=1.0)
  folder.mkdir(parents=True)
  (folder / INFERENCE_CONFIG).write_text(json.dumps(instance_inference_config(config), indent=2))
  torch.save({"state_dict": weights, "epoch": 0, "global_step": 0,
              "pytorch-lightning_version": LIGHTNING_VERSION,
              "hyper_parameters": {"opt": opt, "do2D": False, "num_channels": phase2_common.INPUT_CHANNELS,
                                   "dim": int(config.model.dim)}},
             folder / INSTANCE_WEIGHTS_FILE)


def check_labeling_model(config) -> None:
  """SPINEPS' PLClassifier builds only MONAI's DenseNet-121 and -169 (pl_densenet.py MODEL) with Linear heads and
  no dropout, and its labelling phase always masks instances to their corpus and keeps 128 mm around them."""
  model_cfg, data = config.model, config.data
  if model_cfg.backbone not in spineps_labeling.SPINEPS_BACKBONE_NAMES:
    raise ConversionError(f"labelling model backbone {model_cfg.backbone!r}: SPINEPS' PLClassifier builds only "
                          f"{', '.join(spineps_labeling.SPINEPS_BACKBONE_NAMES)}")
  if float(model_cfg.get("dropout", 0.0)) != 0.0:
    raise ConversionError(f"labelling model dropout {model_cfg.dropout}: SPINEPS' network has no dropout (MONAI's "
                          f"dropout_prob is never passed), so it would run another network")
  if not data.get("corpus_masked", True) or float(data.crop_margin_mm) != labeling_patches.LABELING_CROP_MARGIN_MM:
    raise ConversionError(f"labelling model data.corpus_masked {data.get('corpus_masked')} / data.crop_margin_mm "
                          f"{data.crop_margin_mm}: SPINEPS' labelling phase always masks to the corpus and keeps "
                          f"{labeling_patches.LABELING_CROP_MARGIN_MM:g} mm, so it would cut other patches")


def labeling_inference_config(config) -> dict[str, Any]:
  """SPINEPS' labelling inference_config.json: PIR, the bundle's zoom (or its (min, max) zoom_range) as
  resolution_range, its source's names when it was converted."""
  source = config.get("converted_from") or {}
  bounds = config.data.get("zoom_range")
  resolution = ([[float(z) for z in b] for b in bounds] if bounds is not None
                else [float(z) for z in config.data.zoom])
  modality = source.get("modality", "T2w")
  return {"log_name": source.get("log_name", "spine_jax_labeling"),
          "modality": list(modality) if isinstance(modality, (list, tuple)) else modality,
          "acquisition": source.get("acquisition", "sag"), "modeltype": "classifier",
          "model_expected_orientation": list(spatial.PIR), "available_folds": 1, "inference_augmentation": False,
          "resolution_range": resolution, "default_step_size": 0.5, "labels": {}}


def write_labeling_folder(folder: pathlib.Path, config, variables: Mapping[str, Any]) -> None:
  """SPINEPS' labelling folder: inference_config.json and the Lightning checkpoint PLClassifier restores from.

  `opt` is an argparse.Namespace with ARGS_MODEL's fields (PLClassifier reads it by attribute; pickling
  SPINEPS' own class would need SPINEPS here); `final_size` is the patch, `ds_name` says 'v4corpus' exactly
  when the patches are rotated (lab_model.py load)."""
  import torch

  check_labeling_model(config)
  heads = dict(labeling.normalise_heads(config.model.heads))
  rotated = bool(config.data.get("rotate", False))
  opt = argparse.Namespace(
      backbone=spineps_labeling.SPINEPS_BACKBONE_NAMES[config.model.backbone], classification_conv=False,
      classification_linear=bool(config.model.head_hidden), n_epoch=0, lr=1e-4, l2_regularization_w=1e-6,
      scheduler_endfactor=1e-3, in_channel=1, not_pretrained=True, mse_weighting=0.0, dropout=0.0, weight_decay=0,
      num_classes=sum(heads.values()), n_channel_p_group=list(heads.values()),
      final_size=tuple(int(n) for n in config.data.patch_size),
      ds_name=f"spine_jax_{spineps_labeling.ROTATED_DATASET_MARK}" if rotated else "spine_jax")
  weights = {k: torch.from_numpy(np.array(v)) for k, v in
             spineps_labeling.labeling_state_dict(variables, config.model).items()}
  folder.mkdir(parents=True)
  (folder / INFERENCE_CONFIG).write_text(json.dumps(labeling_inference_config(config), indent=2))
  torch.save({"state_dict": weights, "epoch": 0, "global_step": 0, "pytorch-lightning_version": LIGHTNING_VERSION,
              "hyper_parameters": {"opt": opt, "group_2_n_channel": heads}},
             folder / LABELING_WEIGHTS_FILE)


def export_pair(output, *, semantic_checkpoint=None, instance_checkpoint=None, labeling_checkpoint=None,
                overwrite: bool = False) -> dict:
  """Writes `output/semantic`, `output/instance` and/or `output/labeling` together (a temporary folder renamed
  into place)."""
  if semantic_checkpoint is None and instance_checkpoint is None and labeling_checkpoint is None:
    raise ConversionError("give --semantic_checkpoint, --instance_checkpoint and/or --labeling_checkpoint")
  output = pathlib.Path(output).absolute()
  refuse_existing(output, overwrite)
  models = {}
  for name, path in (("semantic", semantic_checkpoint), ("instance", instance_checkpoint),
                     ("labeling", labeling_checkpoint)):
    if path is not None:
      try:
        state, config, _ = restore.load_for_inference(path, name)
      except ValueError as e:  # CheckpointError: absent, damaged or of another task
        raise ConversionError(f"--{name}_checkpoint: {e}") from None
      models[name] = (state, config, restore.find_model(path))
  if "instance" in models:
    check_instance_model(models["instance"][1].model)
  if "labeling" in models:
    check_labeling_model(models["labeling"][1])
  output.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
  summary: dict[str, Any] = {"output": str(output)}
  try:
    for name, (state, config, (kind, where)) in models.items():
      if name == "semantic":
        write_semantic_folder(tmp / name, config, {"params": state.params, "batch_stats": state.batch_stats})
      elif name == "labeling":
        write_labeling_folder(tmp / name, config, {"params": state.params, "batch_stats": state.batch_stats})
      else:
        write_instance_folder(tmp / name, config, state.params)
      summary[name] = {"source": str(where), "kind": kind, "folder": str(output / name)}
    refuse_existing(output, overwrite)
    nifti.replace_directory(tmp, output)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return summary

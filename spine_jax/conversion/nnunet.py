"""An nnU-Net v2 model folder -> a semantic U-Net model bundle that ``predict semantic`` loads as its own.

A trained nnU-Net v2 model folder holds ``plans.json``, ``dataset.json`` and
``fold_k/checkpoint_final.pth`` (the weights under ``network_weights``). From them (the plans and
labels are read by ``nnunet_plans.py``):

* **architecture**: the configuration's (e.g. ``3d_fullres``) ``architecture.arch_kwargs``
  (plans of nnU-Net >= 2.4) or the older fields (``UNet_class_name``, ``UNet_base_num_features``,
  ``unet_max_num_features``, ``conv_kernel_sizes``, ``pool_op_kernel_sizes``,
  ``n_conv_per_stage_encoder/decoder``, with nnU-Net's fixed conv bias, InstanceNorm and
  LeakyReLU). Only ``PlainConvUNet`` converts; other classes are refused by name.
* **axes**: nnU-Net reads a NIfTI with SimpleITK (array axes = voxel axes reversed) and then
  transposes them by the plan's ``transpose_forward``; our model space keeps the voxel axes, in
  the orientation ``axcodes`` (SPINEPS: P, I, R, given by its inference_config.json). Kernels,
  strides, patch size and spacing are permuted accordingly, so the network computes the same
  function of the same voxels.
* **labels**: our network has one channel per SPINEPS structure (``spine_labels.SEMANTIC_IDS``).
  Each nnU-Net class is mapped to a SPINEPS id (by the user's ``label_map``, SPINEPS'
  inference_config, or the dataset.json name) and the rows of every segmentation head are
  reordered to our channels; a structure the nnU-Net model lacks gets a head that never wins
  (zero weights, bias -1e4).
* **preprocessing**: the plan's spacing and patch size; z-score normalisation (``ZScoreNormalization``,
  which our shift/cap/z-score equals, since a z-score ignores shifts and scales); other schemes
  are refused.

The model bundle (``engine/bundle.py``: the variables and the inference part of the config; no
optimiser) is written to a temporary folder beside the output and renamed into place only when
complete.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from spine_jax.conversion import layout
from spine_jax.conversion import nnunet_plans
from spine_jax.conversion import spineps_folder
from spine_jax.conversion import torch_files
from spine_jax.conversion.errors import ConversionError, refuse_existing
from spine_jax.data import bias_field
from spine_jax.data import spatial
from spine_jax.data import spineps_preprocess
from spine_jax.data import spine_labels
from spine_jax.engine import bundle
from spine_jax.inference import semantic_postprocess
from spine_jax.inference import sliding_window
from spine_jax.models import unet

NEVER_LOGIT = -1e4  # bias of a head for a structure the nnU-Net model does not predict


def network_weights(path: pathlib.Path, *, trust_pickle: bool) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(state dict without its alias keys, the checkpoint's init_args and ``inference_allowed_mirroring_axes``
  under ``mirror_axes``) of ``checkpoint_final.pth``."""
  checkpoint = torch_files.load(path, trust_pickle=trust_pickle)
  if not isinstance(checkpoint, Mapping) or "network_weights" not in checkpoint:
    found = sorted(map(str, checkpoint)) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
    raise ConversionError(f"{path}: no 'network_weights' entry (found {found}); not an nnU-Net v2 checkpoint")
  arrays = torch_files.state_dict_arrays(checkpoint["network_weights"], path, "network_weights")
  arrays = torch_files.strip_common_prefix(arrays)
  arrays = {k: v for k, v in arrays.items() if ".all_modules." not in k and not k.startswith("decoder.encoder.")}
  init_args = checkpoint.get("init_args")
  meta = dict(init_args) if isinstance(init_args, Mapping) else {}
  axes = checkpoint.get("inference_allowed_mirroring_axes")
  try:
    meta["mirror_axes"] = None if axes is None else tuple(sorted(int(a) for a in axes))
  except (TypeError, ValueError):
    raise ConversionError(f"{path}: inference_allowed_mirroring_axes {axes!r} is not a list of axes") from None
  if meta["mirror_axes"] is not None and not set(meta["mirror_axes"]) <= {0, 1, 2}:
    raise ConversionError(f"{path}: inference_allowed_mirroring_axes {axes!r}: not among the spatial axes 0, 1, 2")
  return arrays, meta


def unet_template(cfg: Mapping[str, Any]) -> dict[tuple[str, ...], tuple[int, ...]]:
  """(collection, *path) -> Flax shape of every variable of the U-Net a config describes."""
  model = unet.build_unet(cfg)
  shape = (1, *model.divisor, int(cfg["in_channels"]))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))
  return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(shapes).items()}


def _torch_shape(path, shape, order) -> tuple[int, ...]:
  """The PyTorch shape a Flax variable comes from (our spatial axes back in network order)."""
  if path[-1] != "kernel":
    return tuple(shape)
  k = [0, 0, 0]
  for j, a in enumerate(order):
    k[a] = shape[j]
  if path[1].startswith("decoder_transpconv"):
    return (shape[-2], shape[-1], *k)
  return (shape[-1], shape[-2], *k)


def convert_weights(arrays: Mapping[str, np.ndarray], cfg: Mapping[str, Any], order: Sequence[int],
                    source) -> dict[str, Any]:
  """Nested {'params': ..., ['batch_stats': ...]} of the U-Net ``cfg`` (our axes) from a PlainConvUNet
  state dict (network axes); every key used, every shape checked."""
  flat, used = {}, set()
  position = {k: i for i, k in enumerate(arrays)}  # report the first problem in the file's (module) order
  template = sorted(unet_template(cfg).items(), key=lambda kv: position.get(unet.pytorch_key(kv[0][1:]), len(position)))
  for path, shape in template:
    key = unet.pytorch_key(path[1:])
    expected = _torch_shape(path, shape, order)
    if key not in arrays:
      raise ConversionError(f"{source}: missing {key} (the plan's network needs a tensor of shape {expected})")
    used.add(key)
    value = np.asarray(arrays[key])
    layout.check_shape(source, key, value.shape, expected, "")
    if path[-1] == "kernel":
      convert = layout.transposed_conv_to_flax if path[1].startswith("decoder_transpconv") else layout.conv_to_flax
      value = convert(value, order)
    flat[path] = value.astype(np.float32)
  unexpected = sorted(k for k in arrays if k not in used and not k.endswith("num_batches_tracked"))
  if unexpected:
    more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
    raise ConversionError(f"{source}: unexpected keys {unexpected[:5]}{more}: not part of the network the "
                          f"plan describes (wrong configuration or plans.json?)")
  return traverse_util.unflatten_dict(flat)


def remap_heads(variables: dict[str, Any], mapping: Mapping[int, int]) -> dict[str, Any]:
  """Every segmentation head's output rows reordered to ``SEMANTIC_IDS``; missing structures never win."""
  by_id = {target: value for value, target in mapping.items()}
  params = dict(variables["params"])
  for name in [k for k in params if k.startswith("decoder_seg")]:
    kernel, bias = np.asarray(params[name]["kernel"]), np.asarray(params[name]["bias"])
    new_kernel = np.zeros((*kernel.shape[:-1], spine_labels.NUM_CLASSES), np.float32)
    new_bias = np.full((spine_labels.NUM_CLASSES,), NEVER_LOGIT, np.float32)
    for channel, target in enumerate(spine_labels.SEMANTIC_IDS):
      if target in by_id:
        new_kernel[..., channel] = kernel[..., by_id[target]]
        new_bias[channel] = bias[by_id[target]]
    params[name] = {"kernel": new_kernel, "bias": new_bias}
  return {**variables, "params": params}


def mirror_axes(allowed, order: Sequence[int], spineps_config: Mapping[str, Any] | None) -> tuple[int, ...]:
  """Our model axes of nnU-Net's test-time mirroring: the checkpoint's allowed axes (network axes; none
  recorded, no mirroring, as nnU-Net's predictor does), when the predictor mirrors at all: SPINEPS' only
  with ``inference_augmentation`` true in its inference_config.json, nnU-Net's own by default."""
  if allowed is None or (spineps_config is not None and not bool(spineps_config.get("inference_augmentation"))):
    return ()
  return tuple(sorted(j for j in range(3) if order[j] in allowed))


def semantic_config(plan: nnunet_plans.Plan, axcodes: Sequence[str], step_size: float,
                    provenance: Mapping[str, Any], grid: str = spatial.CENTRE_GRID,
                    mirror: Sequence[int] = (),
                    postprocess_mode: str = semantic_postprocess.SPINE_JAX_MODE,
                    window_mode: str = sliding_window.SPINE_JAX_MODE) -> ml_collections.ConfigDict:
  """The converted network's config as a model bundle holds it: architecture, preprocessing, patch
  and window, phase-1 post-processing, and where the weights came from; nothing of training (no data
  set, no optimiser)."""
  order = plan.spatial_order
  c = ml_collections.ConfigDict()
  c.task = "semantic"
  c.model = unet.default_unet_config()
  c.model.update({k: v for k, v in plan.arch.items() if k not in ("kernel_sizes", "strides")})
  c.model.kernel_sizes = tuple(nnunet_plans.permute(k, order) for k in plan.arch["kernel_sizes"])
  c.model.strides = tuple(nnunet_plans.permute(s, order) for s in plan.arch["strides"])
  c.model.in_channels = 1
  c.model.num_classes = spine_labels.NUM_CLASSES
  c.data = ml_collections.ConfigDict()
  c.data.preprocess = ml_collections.ConfigDict(dict(
      axcodes=tuple(axcodes), spacing=nnunet_plans.permute(plan.spacing, order), image_order=3,
      max_intensity=spatial.SPINEPS_MAX_INTENSITY, max_voxels=spatial.DEFAULT_MAX_VOXELS, grid=grid))
  if grid == spatial.SPINEPS_GRID:  # SPINEPS' preprocessing: N4, its framing and nnU-Net's z-score
    # With SPINEPS' defects kept (its masks reproduced), N4 is SimpleITK's, bit for bit with SPINEPS' ANTsPy on
    # the TPTBox MRI; the numpy rewrite differs by ~3e-5, which can flip a borderline vertebra (BUILD_NOTES.md).
    c.data.preprocess.update(normalisation=spineps_preprocess.SPINEPS, bias_field=bias_field.N4,
                             n4_backend=bias_field.SITK if window_mode == sliding_window.SPINEPS_MODE else bias_field.NUMPY)
  c.data.patch = ml_collections.ConfigDict(dict(patch_size=nnunet_plans.permute(plan.patch_size, order)))
  # nnU-Net mirrors without exchanging left and right structures.
  c.inference = ml_collections.ConfigDict(dict(step_size=float(step_size), batch_size=2, mirror_axes=tuple(mirror),
                                               mirror_swaps_left_right=False, sliding_window_mode=window_mode))
  c.postprocess = semantic_postprocess.default_postprocess_config(postprocess_mode)
  c.converted_from = ml_collections.ConfigDict(dict(provenance))
  return c


def write_bundle(output, config: ml_collections.ConfigDict, variables: Mapping[str, Any], *,
                 overwrite: bool = False, extra_files: Mapping[str, str] | None = None) -> pathlib.Path:
  """A model bundle (step 0: variables and the inference config) at ``output``, complete or not at all."""
  output = pathlib.Path(output).absolute()
  refuse_existing(output, overwrite)
  return bundle.write_bundle(output, config, variables, extra_files=extra_files)


def _axcodes(requested, spineps_config, folder) -> tuple[str, ...]:
  if requested:
    codes = tuple(str(c).upper() for c in requested)
    if not spineps_folder.valid_axcodes(codes):
      raise ConversionError(f"--axcodes {''.join(codes)}: not three axis codes naming each of L/R, A/P and S/I once")
    return codes
  if spineps_config is not None:
    codes = spineps_folder.orientation(spineps_config, folder)
    if codes:
      return codes
  return tuple(spatial.PIR)


def folds_to_convert(folder: pathlib.Path, fold, spineps_config: Mapping[str, Any] | None,
                     checkpoint_name: str) -> list[str]:
  """The folds of ``folder`` to convert: ``fold`` as given ('0', '0,1,2', 'all' for fold_all), else what the
  folder's users load: SPINEPS' ``available_folds`` (a count, a name or a list; fold_all when those are
  absent, as SPINEPS falls back), or every ``fold_k`` with the checkpoint, as nnU-Net's predictor finds them."""
  present = sorted(p.name[len("fold_"):] for p in folder.glob("fold_*") if (p / checkpoint_name).is_file())
  if fold is not None and str(fold).strip() != "":
    wanted = [f.strip() for f in str(fold).split(",") if f.strip()]
  elif spineps_config is not None and "available_folds" in spineps_config:
    value = spineps_config["available_folds"]
    wanted = ([str(i) for i in range(value)] if isinstance(value, int) and not isinstance(value, bool) else
              [str(value)] if isinstance(value, str) else [str(v) for v in value])
    if any(f not in present for f in wanted) and "all" in present:
      wanted = ["all"]
  else:
    wanted = [f for f in present if f != "all"] or present
  missing = [f for f in wanted if f not in present]
  if not wanted or missing:
    first = folder / f"fold_{(missing or ['0'])[0]}" / checkpoint_name
    raise ConversionError(f"{first}: no such file (folds with {checkpoint_name} here: {present or 'none'})")
  return wanted


def stack_members(members: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """One model's variables, or several (an ensemble) stacked along a leading member axis."""
  if len(members) == 1:
    return dict(members[0])
  return jax.tree.map(lambda *leaves: np.stack([np.asarray(v) for v in leaves]), *[dict(m) for m in members])


def convert_folder(folder, output, *, fold: int | str | None = None, configuration: str | None = None,
                   checkpoint_name: str = "checkpoint_final.pth", axcodes: Sequence[str] | None = None,
                   label_map: Mapping[str, int] | None = None, trust_pickle: bool = False,
                   overwrite: bool = False, spineps_defects: bool = False) -> dict[str, Any]:
  """Converts an nnU-Net v2 (or SPINEPS semantic) model folder; returns what was converted.

  Several folds (`folds_to_convert`) become one ensemble bundle whose logits are the folds' mean, as
  nnU-Net's and SPINEPS' predictors average them. `spineps_defects` (SPINEPS folders only) keeps SPINEPS'
  float16 window weights (inference/sliding_window.py), to reproduce its masks rather than nnU-Net's intent.

  Everything is read and checked before anything is written.
  """
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise ConversionError(f"{folder}: not a folder (expected an nnU-Net v2 model folder)")
  plans_path, dataset_path = folder / "plans.json", folder / "dataset.json"
  plans, dataset = nnunet_plans.read_json(plans_path), nnunet_plans.read_json(dataset_path)
  spineps_config = spineps_folder.read_inference_config(folder)
  if spineps_defects and spineps_config is None:
    raise ConversionError(f"{folder}: --spineps_defects applies to SPINEPS model folders (with inference_config.json)")
  folds = folds_to_convert(folder, fold, spineps_config, checkpoint_name)
  checkpoints = [folder / f"fold_{f}" / checkpoint_name for f in folds]
  weights = [network_weights(path, trust_pickle=trust_pickle) for path in checkpoints]
  checkpoint, (_, init_args) = checkpoints[0], weights[0]
  name = nnunet_plans.choose_configuration(folder, plans, configuration, init_args.get("configuration"), plans_path)
  plan = nnunet_plans.read_plan(plans, name, plans_path)
  labels = nnunet_plans.dataset_labels(dataset, dataset_path)
  network_ids = spineps_folder.network_label_ids(spineps_config, folder) if spineps_config else None
  mapping = nnunet_plans.label_mapping(labels, dataset_path, overrides=label_map, network_ids=network_ids)
  own = unet.default_unet_config()
  own.update(plan.arch)
  own.update(in_channels=1, num_classes=len(labels), deep_supervision=True)
  variables = stack_members([remap_heads(convert_weights(arrays, _in_our_axes(own, plan.spatial_order),
                                                         plan.spatial_order, path), mapping)
                             for (arrays, _), path in zip(weights, checkpoints)])
  codes = _axcodes(axcodes, spineps_config, folder)
  step = float(spineps_config.get("default_step_size", 0.5)) if spineps_config else 0.5
  provenance = dict(folder=str(folder.absolute()), checkpoint=str(checkpoint.absolute()), configuration=name,
                    fold=",".join(folds), network_axes_of_model_axes=list(plan.spatial_order),
                    labels={str(v): int(t) for v, t in mapping.items()},
                    spineps_inference_config=spineps_config is not None)
  # SPINEPS resamples with TPTBox's grid before nnU-Net (which then finds the plan's spacing); plain
  # nnU-Net resizes field-of-view preserving, as the centre grid does.
  grid = spatial.SPINEPS_GRID if spineps_config is not None else spatial.CENTRE_GRID
  # SPINEPS cleans its semantic mask its own way (phase_semantic.py); a plain nnU-Net model gets ours.
  postprocess = semantic_postprocess.SPINEPS_MODE if spineps_config is not None else semantic_postprocess.SPINE_JAX_MODE
  mirror = mirror_axes(init_args.get("mirror_axes"), plan.spatial_order, spineps_config)
  window = sliding_window.SPINEPS_MODE if spineps_defects else sliding_window.SPINE_JAX_MODE
  config = semantic_config(plan, codes, step, provenance, grid, mirror, postprocess, window)
  if len(folds) > 1:
    config.model.ensemble_size = len(folds)
  missing = [i for i in spine_labels.SEMANTIC_IDS if i not in mapping.values()]
  summary = {**provenance, "output": str(pathlib.Path(output).absolute()), "axcodes": "".join(codes),
             "spacing": list(config.data.preprocess.spacing), "patch_size": list(config.data.patch.patch_size),
             "features_per_stage": list(plan.arch["features_per_stage"]),
             "num_parameters": int(sum(np.size(v) for v in jax.tree.leaves(variables["params"])) // len(folds)),
             "folds": folds,
             "structures_not_predicted": missing}
  write_bundle(output, config, variables, overwrite=overwrite,
                   extra_files={"conversion.json": json.dumps(summary, indent=2)})
  return summary


def _in_our_axes(cfg: ml_collections.ConfigDict, order: Sequence[int]) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.kernel_sizes = tuple(nnunet_plans.permute(k, order) for k in cfg.kernel_sizes)
  cfg.strides = tuple(nnunet_plans.permute(s, order) for s in cfg.strides)
  return cfg

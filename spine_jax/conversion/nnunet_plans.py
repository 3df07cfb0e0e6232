"""What a converted network needs from an nnU-Net v2 model folder's plans.json and dataset.json.

The architecture (new ``arch_kwargs`` or the older fields), the plan's axis order against ours, and
the mapping of the data set's classes to SPINEPS ids. Pure reading and checking: no weights, no JAX.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Mapping, Sequence

from spine_jax.conversion import spineps_folder
from spine_jax.conversion import torch_files
from spine_jax.conversion.errors import ConversionError
from spine_jax.data import spine_labels

_SUPPORTED = "PlainConvUNet"
_OLD_DEFAULTS = dict(conv_bias=True, norm="instance", leaky_relu_slope=0.01)  # nnU-Net < 2.4 hard-codes these


@dataclasses.dataclass
class Plan:
  """What a converted network needs from plans.json, in nnU-Net's (network) axis order."""
  configuration: str
  arch: dict[str, Any]  # default_unet_config fields, network axes
  patch_size: tuple[int, ...]
  spacing: tuple[float, ...]
  spatial_order: tuple[int, ...]  # spatial_order[j]: the network axis of our model axis j


def read_json(path: pathlib.Path) -> dict[str, Any]:
  return torch_files.read_json(path, "an nnU-Net v2 model folder holds plans.json, dataset.json and "
                                     "fold_k/checkpoint_final.pth")


def _field(mapping: Mapping[str, Any], key: str, source, where: str):
  if key not in mapping:
    raise ConversionError(f"{source}: {where} has no field {key!r}")
  return mapping[key]


def configuration_names(plans: Mapping[str, Any], source) -> list[str]:
  configs = _field(plans, "configurations", source, "the plans")
  if not isinstance(configs, dict) or not configs:
    raise ConversionError(f"{source}: 'configurations' is empty or not an object")
  return sorted(configs)


def resolve_configuration(plans: Mapping[str, Any], name: str, source) -> dict[str, Any]:
  """A configuration with its ``inherits_from`` chain merged in (the child's fields win)."""
  configs = plans["configurations"]
  chain, current = [], name
  while current is not None:
    if current not in configs:
      raise ConversionError(f"{source}: no configuration {current!r}; the plans have {configuration_names(plans, source)}")
    if current in chain:
      raise ConversionError(f"{source}: configuration {name!r} inherits from itself through {chain}")
    chain.append(current)
    current = configs[current].get("inherits_from")
  merged = {}
  for part in reversed(chain):
    merged.update(configs[part])
  return merged


def choose_configuration(folder: pathlib.Path, plans: Mapping[str, Any], requested: str | None,
                         from_checkpoint: str | None, source) -> str:
  """The requested configuration, else the checkpoint's, else the folder name's (``...__3d_fullres``),
  else the plans' only 3D one."""
  names = configuration_names(plans, source)
  for candidate in (requested, from_checkpoint):
    if candidate:
      if candidate not in names:
        raise ConversionError(f"{source}: no configuration {candidate!r}; the plans have {names}")
      return candidate
  suffix = folder.name.rsplit("__", 1)[-1]
  if suffix in names:
    return suffix
  three_d = [n for n in names if n.startswith("3d")]
  if len(three_d) == 1:
    return three_d[0]
  raise ConversionError(f"{source}: several configurations {names}; choose one with --configuration")


def _class_name(value) -> str:
  return str(value).rsplit(".", 1)[-1] if value is not None else "None"


def _as_tuples(value, source, key) -> tuple[tuple[int, ...], ...]:
  try:
    return tuple(tuple(int(v) for v in t) for t in value)
  except (TypeError, ValueError):
    raise ConversionError(f"{source}: {key} must be a list of per-axis lists of integers, found {value!r}") from None


def _as_ints(value, n: int, source, key) -> tuple[int, ...]:
  if isinstance(value, int):
    return (value,) * n
  try:
    return tuple(int(v) for v in value)
  except (TypeError, ValueError):
    raise ConversionError(f"{source}: {key} must be a list of integers, found {value!r}") from None


def architecture(config: Mapping[str, Any], name: str, source) -> dict[str, Any]:
  """``default_unet_config`` fields of a configuration (network axes); unsupported networks refused."""
  where = f"configuration {name!r}"
  if "architecture" in config:
    arch = config["architecture"]
    cls = _class_name(_field(arch, "network_class_name", source, f"{where}.architecture"))
    kwargs = _field(arch, "arch_kwargs", source, f"{where}.architecture")
    if cls != _SUPPORTED:
      raise ConversionError(f"{source}: {where} uses network class {arch['network_class_name']!r}; only "
                            f"{_SUPPORTED} (dynamic_network_architectures) converts to spine_jax's semantic U-Net")
    return _new_arch(kwargs, source, where)
  cls = _class_name(_field(config, "UNet_class_name", source, where))
  if cls != _SUPPORTED:
    raise ConversionError(f"{source}: {where} uses network class {config['UNet_class_name']!r}; only "
                          f"{_SUPPORTED} (dynamic_network_architectures) converts to spine_jax's semantic U-Net")
  kernels = _as_tuples(_field(config, "conv_kernel_sizes", source, where), source, f"{where}.conv_kernel_sizes")
  n = len(kernels)
  base = int(_field(config, "UNet_base_num_features", source, where))
  cap = int(_field(config, "unet_max_num_features", source, where))
  return _checked(dict(
      n_stages=n, features_per_stage=tuple(min(base * 2 ** i, cap) for i in range(n)), kernel_sizes=kernels,
      strides=_as_tuples(_field(config, "pool_op_kernel_sizes", source, where), source, f"{where}.pool_op_kernel_sizes"),
      n_conv_per_stage=_as_ints(_field(config, "n_conv_per_stage_encoder", source, where), n, source,
                                f"{where}.n_conv_per_stage_encoder"),
      n_conv_per_stage_decoder=_as_ints(_field(config, "n_conv_per_stage_decoder", source, where), n - 1, source,
                                        f"{where}.n_conv_per_stage_decoder"),
      **_OLD_DEFAULTS), source, where)


def _new_arch(kwargs: Mapping[str, Any], source, where: str) -> dict[str, Any]:
  where = f"{where}.architecture.arch_kwargs"
  get = lambda key: _field(kwargs, key, source, where)
  conv = _class_name(get("conv_op"))
  if conv != "Conv3d":
    raise ConversionError(f"{source}: {where}.conv_op is {get('conv_op')!r}; predict semantic runs 3D "
                          f"networks (torch.nn.Conv3d) only")
  norm_cls = _class_name(get("norm_op"))
  norms = {"InstanceNorm3d": "instance", "BatchNorm3d": "batch"}
  if norm_cls not in norms:
    raise ConversionError(f"{source}: {where}.norm_op is {get('norm_op')!r}; supported: "
                          f"torch.nn.InstanceNorm3d, torch.nn.BatchNorm3d")
  norm_kwargs = kwargs.get("norm_op_kwargs") or {}
  if abs(float(norm_kwargs.get("eps", 1e-5)) - 1e-5) > 1e-12 or not norm_kwargs.get("affine", norm_cls == "BatchNorm3d"):
    raise ConversionError(f"{source}: {where}.norm_op_kwargs {norm_kwargs}; supported: eps 1e-05 with affine true")
  nonlin = _class_name(get("nonlin"))
  if nonlin == "LeakyReLU":
    slope = float((kwargs.get("nonlin_kwargs") or {}).get("negative_slope", 0.01))
  elif nonlin == "ReLU":
    slope = 0.0
  else:
    raise ConversionError(f"{source}: {where}.nonlin is {get('nonlin')!r}; supported: LeakyReLU, ReLU")
  if kwargs.get("nonlin_first", False):
    raise ConversionError(f"{source}: {where}.nonlin_first is true; spine_jax's U-Net applies conv -> norm -> "
                          f"nonlinearity")
  n = int(get("n_stages"))
  return _checked(dict(
      n_stages=n, features_per_stage=_as_ints(get("features_per_stage"), n, source, f"{where}.features_per_stage"),
      kernel_sizes=_as_tuples(get("kernel_sizes"), source, f"{where}.kernel_sizes"),
      strides=_as_tuples(get("strides"), source, f"{where}.strides"),
      n_conv_per_stage=_as_ints(get("n_conv_per_stage"), n, source, f"{where}.n_conv_per_stage"),
      n_conv_per_stage_decoder=_as_ints(get("n_conv_per_stage_decoder"), n - 1, source,
                                        f"{where}.n_conv_per_stage_decoder"),
      conv_bias=bool(kwargs.get("conv_bias", False)), norm=norms[norm_cls], leaky_relu_slope=slope), source, where)


def _checked(arch: dict[str, Any], source, where: str) -> dict[str, Any]:
  n = arch["n_stages"]
  lengths = {k: len(arch[k]) for k in ("features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage")}
  bad = {k: v for k, v in lengths.items() if v != n}
  if bad or len(arch["n_conv_per_stage_decoder"]) != n - 1:
    raise ConversionError(f"{source}: {where}: {n} stages need {n} entries per stage and {n - 1} decoder "
                          f"entries; found {lengths}, n_conv_per_stage_decoder {len(arch['n_conv_per_stage_decoder'])}")
  dims = {len(t) for t in (*arch["kernel_sizes"], *arch["strides"])}
  if dims != {3}:
    raise ConversionError(f"{source}: {where}: kernel sizes and strides must be 3D (3 entries each); found "
                          f"{arch['kernel_sizes']} and {arch['strides']}")
  return arch


def spatial_order(plans: Mapping[str, Any], source) -> tuple[int, ...]:
  """For each of our model axes (the voxel axes), the network axis nnU-Net puts it on."""
  reader = str(plans.get("image_reader_writer", "SimpleITKIO"))
  if "SimpleITK" in reader:
    reverse = True
  elif "Nibabel" in reader:
    reverse = False
  else:
    raise ConversionError(f"{source}: image_reader_writer {reader!r}; supported: SimpleITKIO, NibabelIO")
  t = _as_ints(plans.get("transpose_forward", (0, 1, 2)), 3, source, "transpose_forward")
  if sorted(t) != [0, 1, 2]:
    raise ConversionError(f"{source}: transpose_forward {list(t)} is not a permutation of [0, 1, 2]")
  voxel_of_network = [2 - a if reverse else a for a in t]
  return tuple(voxel_of_network.index(j) for j in range(3))


def permute(values: Sequence, order: Sequence[int]) -> tuple:
  return tuple(values[a] for a in order)


def read_plan(plans: Mapping[str, Any], name: str, source) -> Plan:
  config = resolve_configuration(plans, name, source)
  where = f"configuration {name!r}"
  schemes = list(_field(config, "normalization_schemes", source, where))
  if schemes != ["ZScoreNormalization"]:
    raise ConversionError(f"{source}: {where}.normalization_schemes {schemes}; predict semantic normalises one "
                          f"MRI channel by z-score (['ZScoreNormalization']) only")
  if any(config.get("use_mask_for_norm") or []):
    raise ConversionError(f"{source}: {where}.use_mask_for_norm is true; only whole-image z-score is supported")
  return Plan(configuration=name, arch=architecture(config, name, source),
              patch_size=_as_ints(_field(config, "patch_size", source, where), 3, source, f"{where}.patch_size"),
              spacing=tuple(float(v) for v in _field(config, "spacing", source, where)),
              spatial_order=spatial_order(plans, source))


def dataset_labels(dataset: Mapping[str, Any], source) -> dict[str, int]:
  """dataset.json labels {name: value}, checked to be nnU-Net's consecutive 0..N-1 (no regions)."""
  labels = _field(dataset, "labels", source, "dataset.json")
  if not isinstance(labels, dict):
    raise ConversionError(f"{source}: 'labels' must be an object {{name: value}}, found {type(labels).__name__}")
  if any(isinstance(v, (list, tuple)) for v in labels.values()) or dataset.get("regions_class_order"):
    raise ConversionError(f"{source}: region-based labels (lists of values) are not supported: the U-Net here "
                          f"predicts one class per voxel")
  try:
    out = {str(k): int(v) for k, v in labels.items()}
  except (TypeError, ValueError):
    raise ConversionError(f"{source}: label values must be integers, found {labels}") from None
  if sorted(out.values()) != list(range(len(out))):
    raise ConversionError(f"{source}: label values {sorted(out.values())} are not 0..{len(out) - 1}")
  channels = dataset.get("channel_names", dataset.get("modality", {"0": "image"}))
  if len(channels) != 1:
    raise ConversionError(f"{source}: channel_names {channels}: predict semantic feeds one image channel")
  return out


def parse_label_map(text: str) -> dict[str, int]:
  """``'Vertebra=49,3=100'`` -> {'Vertebra': 49, '3': 100}: dataset.json names or values -> SPINEPS ids."""
  out = {}
  for item in filter(None, (s.strip() for s in (text or "").split(","))):
    name, sep, value = item.partition("=")
    if not sep or not value.strip().isdigit():
      raise ConversionError(f"--label_map: {item!r} is not NAME=ID (e.g. Vertebra=49)")
    out[name.strip()] = int(value)
  return out


def label_mapping(labels: Mapping[str, int], source, *, overrides: Mapping[str, int] | None = None,
                  network_ids: Mapping[int, int] | None = None) -> dict[int, int]:
  """{nnU-Net class value: SPINEPS id}, every class mapped to a distinct semantic id."""
  overrides, network_ids = dict(overrides or {}), dict(network_ids or {})
  out, unmapped = {}, []
  for name, value in sorted(labels.items(), key=lambda kv: kv[1]):
    if name in overrides or str(value) in overrides:
      target = overrides.get(name, overrides.get(str(value)))
    elif value in network_ids:
      target = network_ids[value]
    elif value == 0:
      target = 0
    else:
      target = spineps_folder.id_for_name(name)
    if target is None:
      unmapped.append(f"{name}={value}")
    elif target not in spine_labels.SEMANTIC_IDS:
      raise ConversionError(f"{source}: label {name!r} maps to {target}, not a SPINEPS semantic id "
                            f"{sorted(spine_labels.SEMANTIC_IDS)}")
    else:
      out[value] = target
  if unmapped:
    raise ConversionError(f"{source}: labels {unmapped} have no SPINEPS semantic id; give them with "
                          f"--label_map=NAME=ID,... (ids {sorted(spine_labels.SEMANTIC_IDS[1:])})")
  targets = list(out.values())
  twice = sorted({t for t in targets if targets.count(t) > 1})
  if twice:
    raise ConversionError(f"{source}: several labels map to the same SPINEPS id(s) {twice}: {out}")
  if out.get(0) != 0:
    raise ConversionError(f"{source}: class 0 must be background, found a mapping to {out.get(0)}")
  return out

"""torchvision / MONAI DenseNet weights -> the trunk of ``spine_jax.models.densenet``.

Accepted files: a ``torch.save`` state dict (``.pth``, ``.pt``; a ``{'state_dict': ...}`` wrapper
too) of ``torchvision.models.densenet121/169/201`` (current names ``norm1``, or the old
``norm.1`` of the original ImageNet downloads) or ``monai.networks.nets.DenseNet121/169/201``
(dense layers wrap their modules in ``.layers``), or the ``.npz`` that ``python -m
spine_jax.convert densenet`` writes: the same tensors under torchvision's current names, in
PyTorch layout, readable without torch or pickle.

Loading into a model adapts the weights to it where the shapes allow:

* first conv, 3 -> 1 input channel: summed over channels (a grey image replicated into RGB gives
  the same response); to n channels: tiled and scaled by 3/n;
* 2D -> 3D (inflation, Carreira & Zisserman 2017): each k x k kernel repeated k times along the
  new leading spatial axis and divided by k, so a volume constant along that axis gives the 2D
  response away from its ends. 1 x 1 convs and BatchNorm carry over unchanged.

The classifier (torchvision ``classifier``, MONAI ``class_layers.out``) is dropped: heads are the
new task's and start fresh. ``num_batches_tracked`` has no counterpart.
"""
from __future__ import annotations

import io
import json
import math
import pathlib
import re
import zipfile
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from spine_jax.conversion import layout
from spine_jax.conversion import torch_files
from spine_jax.conversion.errors import ConversionError
from spine_jax.data import nifti
from spine_jax.models import densenet

HEAD_KEYS = ("classifier.weight", "classifier.bias", "class_layers.out.weight", "class_layers.out.bias")
_LEGACY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12])\.(weight|bias|running_mean|running_var)$")
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
META_KEY = "__meta__"


def canonical_keys(arrays: Mapping[str, np.ndarray]) -> tuple[str, dict[str, np.ndarray]]:
  """(flavour, arrays under torchvision's current names): MONAI's ``.layers.`` and the old ``norm.1``
  spelling removed, wrapper prefixes stripped; nothing dropped."""
  arrays = torch_files.strip_common_prefix(dict(arrays))
  flavour = "torchvision"
  out = {}
  for key, value in arrays.items():
    if ".layers." in key or key.startswith("class_layers."):
      flavour = "monai"
    new = key.replace(".layers.", ".")
    legacy = _LEGACY.match(new)
    if legacy:
      flavour = "torchvision (legacy names)"
      new = f"{legacy.group(1)}{legacy.group(2)}.{legacy.group(3)}"
    out[new] = value
  return flavour, out


def _unwrap(obj):
  """The state dict itself, or the one a ``{'state_dict': ...}`` wrapper holds."""
  if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
    return obj["state_dict"], "its 'state_dict'"
  return obj, "the file"


def read_weights(path, *, trust_pickle: bool = False) -> tuple[str, dict[str, np.ndarray]]:
  """(flavour, canonical arrays) of a .pth/.pt state dict or a converted .npz."""
  path = pathlib.Path(path)
  if path.suffix == ".npz":
    return _read_npz(path)
  obj, where = _unwrap(torch_files.load(path, trust_pickle=trust_pickle))
  return canonical_keys(torch_files.state_dict_arrays(obj, path, where))


def _read_npz(path: pathlib.Path) -> tuple[str, dict[str, np.ndarray]]:
  if not path.is_file():
    raise ConversionError(f"{path}: no such file")
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise ConversionError(f"{path}: not a readable .npz (truncated or corrupt?): {e}") from None
  meta = arrays.pop(META_KEY, None)
  if meta is None:
    raise ConversionError(f"{path}: no {META_KEY!r} entry; not written by 'python -m spine_jax.convert densenet'")
  flavour = json.loads(str(meta)).get("flavour", "converted")
  return flavour, arrays


def _require(arrays, key, source) -> np.ndarray:
  if key not in arrays:
    raise ConversionError(f"{source}: missing {key}: not a torchvision/MONAI DenseNet state dict")
  return arrays[key]


def infer_architecture(arrays: Mapping[str, np.ndarray], source) -> dict[str, Any]:
  """``DenseNet`` fields that a canonical state dict describes (ImageNet stem, compression 1/2)."""
  conv0 = _require(arrays, "features.conv0.weight", source)
  if conv0.ndim not in (4, 5) or conv0.shape[2] != 7:
    raise ConversionError(f"{source}: features.conv0.weight has shape {conv0.shape}; expected the 7x7 (or "
                          f"7x7x7) stem of torchvision/MONAI, (features, channels, 7, 7[, 7])")
  blocks = []
  while any(k.startswith(f"features.denseblock{len(blocks) + 1}.") for k in arrays):
    b = len(blocks) + 1
    layers = {int(m.group(1)) for k in arrays for m in [re.match(rf"features\.denseblock{b}\.denselayer(\d+)\.", k)] if m}
    blocks.append(max(layers) if layers else 0)
  if not blocks or not all(blocks):
    raise ConversionError(f"{source}: no features.denseblock1.denselayer1.* keys: not a DenseNet state dict")
  growth = int(_require(arrays, "features.denseblock1.denselayer1.conv2.weight", source).shape[0])
  bottleneck = int(_require(arrays, "features.denseblock1.denselayer1.conv1.weight", source).shape[0])
  return dict(growth_rate=growth, block_config=tuple(blocks), num_init_features=int(conv0.shape[0]),
              bn_size=max(bottleneck // growth, 1), stem="imagenet", spatial_dims=conv0.ndim - 2,
              in_channels=int(conv0.shape[1]))


def preset_name(fields: Mapping[str, Any]) -> str | None:
  """'densenet121' etc. when the fields are a known preset's."""
  for name in ("densenet121", "densenet169", "densenet201"):
    preset = densenet.densenet_preset(name)
    if all(tuple(np.atleast_1d(fields[k])) == tuple(np.atleast_1d(preset[k])) for k in
           ("growth_rate", "block_config", "num_init_features", "bn_size")):
      return name
  return None


def trunk_template(fields: Mapping[str, Any]) -> dict[tuple[str, ...], tuple[int, ...]]:
  """(collection, *path) -> Flax shape of every variable of a trunk, computed without running it."""
  arch = {k: v for k, v in fields.items() if k != "in_channels"}
  model = densenet.DenseNet(**arch)
  d = int(fields["spatial_dims"])
  x = jnp.zeros((1, *(64,) * d, int(fields["in_channels"])))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(shapes).items()}


def torch_key(path: tuple[str, ...]) -> str:
  """Torchvision name of a trunk variable: ``('params', 'denseblock1', ..., 'kernel')`` ->
  ``'features.denseblock1....weight'``."""
  return "features." + ".".join(path[1:-1]) + "." + _LEAF[path[-1]]


def adapt_input_channels(weight: np.ndarray, channels: int) -> np.ndarray:
  """First-conv weight (out, in, *k) for ``channels`` inputs: summed for 1, tiled and scaled otherwise."""
  have = weight.shape[1]
  if channels == have:
    return weight
  if channels == 1:
    return weight.sum(axis=1, keepdims=True)
  reps = math.ceil(channels / have)
  return np.tile(weight, (1, reps) + (1,) * (weight.ndim - 2))[:, :channels] * (have / channels)


def inflate(weight: np.ndarray, depth: int) -> np.ndarray:
  """2D conv weight (out, in, kh, kw) -> 3D (out, in, depth, kh, kw), repeated and divided by ``depth``."""
  return np.repeat(weight[:, :, None], depth, axis=2) / depth


def _adapt(key: str, weight: np.ndarray, expected: tuple[int, ...], source) -> np.ndarray:
  """Inflation and first-conv channel adaptation, where the shapes allow; the caller checks the result."""
  if len(expected) == 5 and weight.ndim == 4:
    if weight.shape[2:] != expected[3:]:
      raise ConversionError(f"{source}: {key} has shape {weight.shape}; cannot inflate it to the 3D model's "
                            f"{expected}: its kernel {weight.shape[2:]} is not the model's {expected[3:]}")
    weight = inflate(weight, expected[2])
  if key == "features.conv0.weight" and weight.ndim == len(expected):
    weight = adapt_input_channels(weight, expected[1])
  return weight


def to_variables(arrays: Mapping[str, np.ndarray], template: Mapping[tuple[str, ...], tuple[int, ...]],
                 source) -> dict[str, Any]:
  """Nested ``{'params': ..., 'batch_stats': ...}`` of a trunk in Flax layout, float32.

  Every template variable must be in ``arrays`` and every trunk tensor of ``arrays`` must be used;
  shapes are checked after adaptation and reported in PyTorch layout.
  """
  flat, used = {}, set()
  position = {k: i for i, k in enumerate(arrays)}  # report the first problem in the file's (module) order
  for path, shape in sorted(template.items(), key=lambda kv: position.get(torch_key(kv[0]), len(position))):
    key = torch_key(path)
    if key not in arrays:
      raise ConversionError(f"{source}: missing {key} (the model's trunk needs a tensor of shape "
                            f"{_torch_shape(path, shape)})")
    used.add(key)
    expected, found = _torch_shape(path, shape), np.shape(arrays[key])
    value = _adapt(key, np.asarray(arrays[key]), expected, source)
    note = "" if value.shape == found else f" (adapted from the file's {found})"
    layout.check_shape(source, key, value.shape, expected, note)
    flat[path] = (layout.conv_to_flax(value) if path[-1] == "kernel" else value).astype(np.float32)
  unexpected = sorted(k for k in arrays if k not in used and k not in HEAD_KEYS
                      and not k.endswith("num_batches_tracked"))
  if unexpected:
    more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
    raise ConversionError(f"{source}: unexpected keys {unexpected[:5]}{more}: the model's trunk has no such "
                          f"tensors (a deeper DenseNet than the config's trunk?)")
  return traverse_util.unflatten_dict(flat)


def _torch_shape(path, shape) -> tuple[int, ...]:
  return layout.conv_from_flax_shape(shape) if path[-1] == "kernel" else tuple(shape)


def describe(fields: Mapping[str, Any]) -> str:
  name = preset_name(fields) or "DenseNet"
  return (f"{name} ({fields['spatial_dims']}D, {fields['in_channels']} input channel(s), growth "
          f"{fields['growth_rate']}, blocks {tuple(fields['block_config'])}, {fields['num_init_features']} "
          f"initial features)")


def convert_file(path, output, *, trust_pickle: bool = False) -> dict[str, Any]:
  """Checks a DenseNet state dict against the architecture it describes and writes its trunk as .npz.

  Returns a summary (flavour, architecture, parameter count, dropped head). Nothing is written
  unless every tensor maps onto the trunk.
  """
  output = pathlib.Path(output)
  if output.suffix != ".npz":
    raise ConversionError(f"{output}: the converted DenseNet is written as .npz; name the output *.npz")
  flavour, arrays = read_weights(path, trust_pickle=trust_pickle)
  fields = infer_architecture(arrays, path)
  try:
    template = trunk_template(fields)
  except ValueError as e:
    raise ConversionError(f"{path}: the tensors describe no buildable DenseNet ({describe(fields)}): {e}") from None
  to_variables(arrays, template, path)  # validates every key and shape
  keep = {torch_key(p): np.asarray(arrays[torch_key(p)]) for p in template}
  meta = {"flavour": flavour, "source": str(pathlib.Path(path).absolute()),
          "architecture": {k: (list(v) if isinstance(v, tuple) else v) for k, v in fields.items()},
          "preset": preset_name(fields)}
  buffer = io.BytesIO()
  np.savez(buffer, **keep, **{META_KEY: np.asarray(json.dumps(meta))})
  nifti.atomic_write_bytes(output, buffer.getvalue())
  heads = {k: tuple(arrays[k].shape) for k in HEAD_KEYS if k in arrays}
  count = sum(math.prod(shape) for p, shape in template.items() if p[0] == "params")
  return {**meta, "num_parameters": int(count),
          "dropped_head": heads, "output": str(output), "description": describe(fields)}


def trunk_names(params: Mapping[str, Any]) -> list[str]:
  """Names of the DenseNet trunks in a model's parameters (``features``, or one per task when soft)."""
  return sorted(k for k, v in params.items() if k.startswith("features") and isinstance(v, Mapping)
                and "conv0" in v)


def _place(value: np.ndarray, like: jax.Array) -> jax.Array:
  """``value`` with the dtype and sharding of ``like``, built per shard (works on many hosts)."""
  value = np.asarray(value, dtype=like.dtype)
  sharding = getattr(like, "sharding", None)
  if sharding is None:
    return jnp.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def load_into_state(state, path, *, trust_pickle: bool = False):
  """A fresh train state with its DenseNet trunk(s) replaced by the weights of ``path``.

  Heads, the quality MLP and cross-stitch units keep their initial values; the optimiser state
  does not depend on the parameter values (Adam's moments and SGD's momentum start at zero).
  """
  _, arrays = read_weights(path, trust_pickle=trust_pickle)
  names = trunk_names(state.params)
  if not names:
    raise ConversionError(f"{path}: the model has no DenseNet trunk to load it into")
  params, stats = dict(state.params), dict(state.batch_stats)
  for name in names:
    template = {("params", *p): tuple(v.shape) for p, v in traverse_util.flatten_dict(params[name]).items()}
    template.update({("batch_stats", *p): tuple(v.shape)
                     for p, v in traverse_util.flatten_dict(stats.get(name, {})).items()})
    variables = to_variables(arrays, template, path)
    params[name] = jax.tree.map(_place, variables["params"], params[name])
    if name in stats:
      stats[name] = jax.tree.map(_place, variables["batch_stats"], stats[name])
  return state.replace(params=params, batch_stats=stats)

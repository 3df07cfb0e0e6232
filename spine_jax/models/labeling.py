"""Vertebra-labelling classifier (SPINEPS' VERIDAH, spineps/architectures/pl_densenet.py `PLClassifier`).

A 3D DenseNet trunk (``models/densenet.py``: conv0 ... norm5, ReLU, global average pool, the vector
MONAI's ``class_layers`` hands its Linear) and one classification head per output group, each
``[Dense(F // 2) -> ReLU ->] Dense(classes)`` as PLClassifier's ``classification_heads`` (the hidden
layer is its ``classification_linear``). ``__call__(x, train)`` takes one vertebra patch per batch
element, ``(B, P, I, R, 1)``, and returns ``{group: logits (B, classes)}`` in float32 (in head order;
a jitted function returns a dict's keys sorted, so read the order from ``heads``).

Axis order: SPINEPS cuts each patch out of the image reoriented to P, I, R (``lab_model.py``
``run_all_seg_instances`` reorients with TPTBox's default, PIR, whatever the folder's
``model_expected_orientation``), and centre-crops it to ``final_size`` (default 152 x 168 x 32) in
that order; its network sees ``(1, 1, P, I, R)``. Our channels-last patch is ``(B, P, I, R, 1)``, so
kernels carry over without any axis permutation.

Dropout: MONAI's DenseNet applies ``dropout_prob`` after each dense layer; PLClassifier never passes
it (its ``opt.dropout`` stays a training argument), so SPINEPS' network has none. ``dropout`` here
is that same per-dense-layer rate, 0 by default; the heads have none, as SPINEPS'.

Backbones (``model.backbone``, a preset of ``models/densenet.py``): ``densenet121`` and
``densenet169`` are SPINEPS' two (its ``MODEL`` enum); ``labeling_small`` trains on a 2-core CPU
(BUILD_NOTES.md, "SPINEPS labelling models"); ``tiny`` is for tests.

Parameter names: the trunk is ``features`` (torchvision's name, as ``multitask`` places it), head
``g`` is ``head_<g>`` with ``hidden`` (when ``head_hidden``) and ``out``.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from spine_jax.models import densenet

# SPINEPS' two backbones (pl_densenet.py MODEL: DENSENET121, DENSENET169) and ours for CPU training and tests.
SPINEPS_BACKBONES = ("densenet121", "densenet169")
BACKBONES = (*SPINEPS_BACKBONES, "labeling_small", "tiny")
# Group names become parameter names (``head_<name>``) and bundle keys: letters, digits and underscores.
_HEAD_NAME = re.compile(r"^[A-Za-z0-9_]+$")


def default_model_config() -> ml_collections.ConfigDict:
  """Every field ``build_labeling_model`` reads, with its default.

  ``heads``: the output groups in SPINEPS' order, a tuple of ``(name, classes)`` pairs (e.g.
  ``(('VERT', 24), ('REGION', 3))``); lists of pairs (a config read back from JSON) and a
  ``{name: classes}`` mapping in order are accepted too.
  """
  cfg = ml_collections.ConfigDict()
  cfg.backbone = "densenet121"
  cfg.heads = (("VERT", 24), ("REGION", 3))
  cfg.head_hidden = True  # SPINEPS' classification_linear
  cfg.dropout = 0.0  # after each dense layer, MONAI's dropout_prob; SPINEPS' network has none
  cfg.dtype = "float32"
  cfg.conv = "auto"  # models/conv.py implementation; 'auto': densenet.make_conv's CPU forms on CPU, XLA's own elsewhere
  return cfg


def normalise_heads(heads: Sequence[Sequence[Any]] | Mapping[str, int]) -> tuple[tuple[str, int], ...]:
  """``heads`` as a tuple of (name, classes) pairs; ValueError naming a bad entry."""
  items = list(heads.items()) if isinstance(heads, Mapping) else list(heads)
  out = []
  for item in items:
    if isinstance(item, str) or len(item) != 2:
      raise ValueError(f"model.heads: entry {item!r} is not a (name, classes) pair")
    name, classes = str(item[0]), item[1]
    if not _HEAD_NAME.match(name):
      raise ValueError(f"model.heads: name {name!r} is not letters, digits and underscores")
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
      raise ValueError(f"model.heads: {name} has {classes!r} classes, expected a positive integer")
    out.append((name, int(classes)))
  names = [n for n, _ in out]
  if not out or len(set(names)) != len(names):
    raise ValueError(f"model.heads: expected one or more distinct groups, got {names}")
  return tuple(out)


class LabelingHead(nn.Module):
  """PLClassifier's head of one group: [Dense(hidden) -> ReLU ->] Dense(classes), in float32."""
  classes: int
  hidden: int | None = None

  @nn.compact
  def __call__(self, features):
    x = features.astype(jnp.float32)
    if self.hidden is not None:
      x = nn.relu(nn.Dense(self.hidden, name="hidden")(x))
    return nn.Dense(self.classes, name="out")(x)


class LabelingNet(nn.Module):
  """3D DenseNet trunk and one head per group: (B, P, I, R, 1) -> {group: logits (B, classes)}."""
  heads: tuple[tuple[str, int], ...]
  backbone: str = "densenet121"
  head_hidden: bool = True
  dropout: float = 0.0
  dtype: Any = jnp.float32
  norm: Callable[..., nn.Module] = densenet.default_norm
  conv: Callable[..., nn.Module] = densenet.default_conv

  def trunk(self) -> densenet.DenseNet:
    fields = densenet.densenet_preset(self.backbone)
    return densenet.DenseNet(**fields, spatial_dims=3, dropout_rate=self.dropout, dtype=self.dtype, norm=self.norm,
                             conv=self.conv, name="features")

  @nn.compact
  def __call__(self, x, train: bool) -> dict[str, jnp.ndarray]:
    if x.ndim != 5:
      raise ValueError(f"expected (batch, P, I, R, channels) patches, got shape {x.shape}")
    trunk = self.trunk()
    features = trunk(x, train)
    hidden = trunk.num_features // 2 if self.head_hidden else None
    return {name: LabelingHead(classes, hidden, name=f"head_{name}")(features) for name, classes in self.heads}


def build_labeling_model(model_cfg: Mapping[str, Any], *, norm: Callable[..., nn.Module] = densenet.default_norm,
                         conv: Callable[..., nn.Module] | None = None) -> LabelingNet:
  """The network a model config describes (fields: ``default_model_config``; missing ones take its defaults)."""
  defaults = default_model_config()
  field = lambda name: defaults[name] if model_cfg.get(name, None) is None else model_cfg.get(name)
  backbone = str(field("backbone"))
  if backbone not in densenet.preset_names():
    raise ValueError(f"model.backbone: unknown DenseNet preset {backbone!r}; labelling uses {', '.join(BACKBONES)}")
  conv = densenet.make_conv(str(field("conv"))) if conv is None else conv
  return LabelingNet(heads=normalise_heads(field("heads")), backbone=backbone, head_hidden=bool(field("head_hidden")),
                     dropout=float(field("dropout")), dtype=jnp.dtype(field("dtype")), norm=norm, conv=conv)


def hidden_width(backbone: str) -> int:
  """Width of a head's hidden layer, F // 2 (512 for DenseNet-121), known without tracing."""
  fields = densenet.densenet_preset(backbone)
  return densenet.num_features(fields["growth_rate"], fields["block_config"], fields["num_init_features"]) // 2


def smallest_patch(backbone: str) -> int:
  """Fewest voxels per axis that the trunk pools down to one (32 for DenseNet-121: stem 4x, three transitions)."""
  fields = densenet.densenet_preset(backbone)
  stem = {"imagenet": 4, "light": 2, "small": 1}[fields["stem"]]
  return stem * 2 ** (len(fields["block_config"]) - 1)

"""DenseNet trunk (Huang et al. 2017), 2D and 3D, laid out like torchvision and MONAI.

One definition serves 2D slices (B, H, W, C) and 3D volumes (B, D, H, W, C): every
kernel, stride and padding is built from ``spatial_dims``. The trunk ends in
``norm5 -> ReLU -> global average pool`` and returns a feature vector (B, F), exactly
what torchvision's ``DenseNet.forward`` and MONAI's ``DenseNet121`` feed their linear
classifier, so converted PyTorch weights reproduce the PyTorch outputs.

Variable names map one to one onto the PyTorch state dicts, so a converter only walks
the tree. With the trunk at ``params['features']`` (as ``spine_jax.models.multitask``
places it), the Flax path ``features/<p>`` is torchvision's ``features.<p>`` with ``/``
read as ``.``:

  conv0/kernel                           features.conv0.weight
  norm0/{scale,bias}                     features.norm0.{weight,bias}
  norm0/{mean,var} (batch_stats)         features.norm0.{running_mean,running_var}
  denseblock{b}/denselayer{l}/norm1 ...  features.denseblock{b}.denselayer{l}.norm1 ...
    (norm1, conv1, norm2, conv2)
  transition{b}/{norm,conv}              features.transition{b}.{norm,conv}
  norm5/...                              features.norm5....

MONAI's ``DenseNet121/169/201`` use the same keys except that each dense layer wraps its
modules in a Sequential: ``features.denseblock{b}.denselayer{l}.layers.{norm1,...}``.
Layouts: a PyTorch conv weight (out, in, *k) becomes a Flax kernel (*k, in, out); a
BatchNorm ``weight`` is ``scale``, ``running_mean``/``running_var`` are ``mean``/``var`` in
the ``batch_stats`` collection; ``num_batches_tracked`` has no counterpart. Old
torchvision checkpoints spell ``norm.1``/``conv.2`` where newer ones say ``norm1``/``conv2``.

BatchNorm follows PyTorch's defaults (momentum 0.1, i.e. Flax 0.9; epsilon 1e-5) and has
no ``axis_name``: training runs under plain ``jit`` over a device mesh, where the batch
statistics are global already. (PyTorch keeps the unbiased batch variance in its running
variance and Flax the biased one; the two differ by n/(n-1) during training only.)
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from spine_jax.models import conv as conv_lib

# PyTorch's kaiming_normal_ (fan_in, gain sqrt 2, untruncated), which torchvision and MONAI use.
kaiming_normal = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')

default_norm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)


def make_conv(impl: str = 'auto') -> Callable[..., nn.Module]:
  """The DenseNets' convolution (no bias, PyTorch's init) in a `models.conv` implementation; 'auto' as there: on
  CPU the 1x1 layers as matrix products (their XLA weight gradients are 4-5x slower) and 3D layers as 2D sums,
  XLA's own elsewhere (BUILD_NOTES.md "The DenseNets on CPU"). The parameters are nn.Conv's in every form."""
  return functools.partial(conv_lib.make_conv(impl), use_bias=False, kernel_init=kaiming_normal)


default_conv = make_conv('xla')  # nn.Conv itself: what converters and the modules' defaults build

# 'imagenet': 7x7 stride-2 conv, BN, ReLU, 3x3 stride-2 max pool (torchvision, MONAI): 4x smaller.
# 'small': 3x3 stride-1 conv, BN, ReLU, no pool: full resolution, for tiny inputs.
# 'light': 3x3 stride-2 conv, BN, ReLU, no pool: 2x smaller, cheap on small slices.
STEMS = ('imagenet', 'small', 'light')

_IMAGENET = dict(growth_rate=32, num_init_features=64, bn_size=4, stem='imagenet')
_PRESETS = {
    'densenet121': dict(_IMAGENET, block_config=(6, 12, 24, 16)),
    'densenet169': dict(_IMAGENET, block_config=(6, 12, 32, 32)),
    'densenet201': dict(_IMAGENET, block_config=(6, 12, 48, 32)),
    # Fast CPU training on 64x64 slices: stride-2 3x3 stem, blocks at 32, 16, 8; 0.11 M parameters, F = 99.
    'small': dict(growth_rate=12, block_config=(3, 6, 4), num_init_features=24, bn_size=4, stem='light'),
    # Vertebra labelling on ~64x64x16 patches on a CPU (models/labeling.py): SPINEPS' ImageNet stem (4x smaller),
    # three blocks at 16x16x4, 8x8x2, 4x4x1; 0.30 M trunk parameters, F = 123.
    'labeling_small': dict(growth_rate=12, block_config=(3, 6, 6), num_init_features=24, bn_size=4, stem='imagenet'),
    # Tests and smoke runs: compiles in seconds.
    'tiny': dict(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2, stem='small'),
}


def densenet_preset(name: str) -> dict[str, Any]:
  """Architecture fields of a named DenseNet; a fresh dict, so callers may override keys."""
  if name not in _PRESETS:
    raise ValueError(f'unknown DenseNet preset {name!r}; known: {sorted(_PRESETS)}')
  return dict(_PRESETS[name])


def preset_names() -> tuple[str, ...]:
  return tuple(_PRESETS)


def transition_features(channels: int, compression: float) -> int:
  """Channels after a transition; floor, as torchvision's ``num_features // 2``."""
  return int(math.floor(channels * compression))


def num_features(growth_rate: int, block_config: Sequence[int], num_init_features: int,
                 compression: float = 0.5) -> int:
  """Length F of the trunk's output vector (1024 for DenseNet-121), known without tracing."""
  channels = num_init_features
  for i, num_layers in enumerate(block_config):
    channels += num_layers * growth_rate
    if i < len(block_config) - 1:
      channels = transition_features(channels, compression)
  return channels


def _tuple(value: int, spatial_dims: int) -> tuple[int, ...]:
  return (value,) * spatial_dims


def _pad(value: int, spatial_dims: int) -> tuple[tuple[int, int], ...]:
  """Symmetric explicit padding, as PyTorch's (``'SAME'`` pads stride-2 convs asymmetrically)."""
  return ((value, value),) * spatial_dims


class DenseLayer(nn.Module):
  """BN-ReLU-1x1 conv (bottleneck) then BN-ReLU-3x3 conv; the new maps join the input."""
  growth_rate: int
  bn_size: int
  dropout_rate: float = 0.0
  spatial_dims: int = 2
  dtype: Any = jnp.float32
  norm: Callable[..., nn.Module] = default_norm
  conv: Callable[..., nn.Module] = default_conv
  act: Callable[[jnp.ndarray], jnp.ndarray] = nn.relu

  @nn.compact
  def __call__(self, x, train: bool):
    d = self.spatial_dims
    y = self.norm(dtype=self.dtype, name='norm1')(x, use_running_average=not train)
    y = self.conv(self.bn_size * self.growth_rate, _tuple(1, d), padding=_pad(0, d),
                  dtype=self.dtype, name='conv1')(self.act(y))
    y = self.norm(dtype=self.dtype, name='norm2')(y, use_running_average=not train)
    y = self.conv(self.growth_rate, _tuple(3, d), padding=_pad(1, d), dtype=self.dtype,
                  name='conv2')(self.act(y))
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    return jnp.concatenate([x.astype(y.dtype), y], axis=-1)


class DenseBlock(nn.Module):
  """``num_layers`` dense layers named ``denselayer1..n``; each sees all earlier maps."""
  num_layers: int
  layer: Callable[..., nn.Module]

  @nn.compact
  def __call__(self, x, train: bool):
    for j in range(self.num_layers):
      x = self.layer(name=f'denselayer{j + 1}')(x, train)  # positional: remat keeps `train` static
    return x


class Transition(nn.Module):
  """BN-ReLU-1x1 conv to fewer channels, then 2x average pooling between blocks."""
  out_features: int
  spatial_dims: int = 2
  dtype: Any = jnp.float32
  norm: Callable[..., nn.Module] = default_norm
  conv: Callable[..., nn.Module] = default_conv
  act: Callable[[jnp.ndarray], jnp.ndarray] = nn.relu

  @nn.compact
  def __call__(self, x, train: bool):
    d = self.spatial_dims
    x = self.norm(dtype=self.dtype, name='norm')(x, use_running_average=not train)
    x = self.conv(self.out_features, _tuple(1, d), padding=_pad(0, d), dtype=self.dtype,
                  name='conv')(self.act(x))
    return nn.avg_pool(x, _tuple(2, d), strides=_tuple(2, d))


class DenseNet(nn.Module):
  """DenseNet feature trunk: input (B, *spatial, C) -> feature vector (B, F), float ``dtype``.

  The stages are public methods (``forward_stem``, ``forward_stage``, ``forward_head``)
  so that soft parameter sharing can step several trunks in lockstep; ``__call__``
  simply chains them.

  ``norm`` is a factory ``norm(dtype=..., name=...)`` whose module is called as
  ``m(x, use_running_average=...)`` (BatchNorm's signature); ``conv`` is called like
  ``nn.Conv(features, kernel_size, strides=..., padding=..., dtype=..., name=...)``.
  Parameters stay float32 whatever ``dtype`` computes in. ``remat`` recomputes each
  dense layer in the backward pass (torchvision's ``memory_efficient``) to save memory.
  """
  growth_rate: int = 32
  block_config: Sequence[int] = (6, 12, 24, 16)
  num_init_features: int = 64
  bn_size: int = 4
  compression: float = 0.5
  dropout_rate: float = 0.0
  spatial_dims: int = 2
  stem: str = 'imagenet'
  remat: bool = False
  dtype: Any = jnp.float32
  norm: Callable[..., nn.Module] = default_norm
  conv: Callable[..., nn.Module] = default_conv
  act: Callable[[jnp.ndarray], jnp.ndarray] = nn.relu

  @property
  def num_stages(self) -> int:
    return len(self.block_config)

  @property
  def num_features(self) -> int:
    return num_features(self.growth_rate, self.block_config, self.num_init_features, self.compression)

  def setup(self):
    if self.spatial_dims not in (2, 3):
      raise ValueError(f'spatial_dims must be 2 or 3, got {self.spatial_dims}')
    if self.stem not in STEMS:
      raise ValueError(f'unknown stem {self.stem!r}; known: {STEMS}')
    d = self.spatial_dims
    shared = dict(spatial_dims=d, dtype=self.dtype, norm=self.norm, conv=self.conv, act=self.act)
    if self.stem == 'imagenet':
      self.conv0 = self.conv(self.num_init_features, _tuple(7, d), strides=_tuple(2, d),
                             padding=_pad(3, d), dtype=self.dtype)
    else:
      stride = 2 if self.stem == 'light' else 1
      self.conv0 = self.conv(self.num_init_features, _tuple(3, d), strides=_tuple(stride, d),
                             padding=_pad(1, d), dtype=self.dtype)
    self.norm0 = self.norm(dtype=self.dtype)
    layer_cls = nn.remat(DenseLayer, static_argnums=(2,)) if self.remat else DenseLayer
    layer = functools.partial(layer_cls, growth_rate=self.growth_rate, bn_size=self.bn_size,
                              dropout_rate=self.dropout_rate, **shared)
    channels = self.num_init_features
    for i, num_layers in enumerate(self.block_config):
      # setattr keeps torchvision's names (denseblock1, transition1, ...) for the converter.
      setattr(self, f'denseblock{i + 1}', DenseBlock(num_layers=num_layers, layer=layer))
      channels += num_layers * self.growth_rate
      if i < self.num_stages - 1:
        channels = transition_features(channels, self.compression)
        setattr(self, f'transition{i + 1}', Transition(out_features=channels, **shared))
    self.norm5 = self.norm(dtype=self.dtype)

  def forward_stem(self, x, train: bool):
    """conv0 -> norm0 -> ReLU (-> 3x3 stride-2 max pool, pad 1, for the ImageNet stem); see STEMS."""
    if x.ndim != self.spatial_dims + 2:
      raise ValueError(f'expected a (batch, {self.spatial_dims} spatial dims, channels) input, '
                       f'got shape {x.shape}')
    x = self.act(self.norm0(self.conv0(x), use_running_average=not train))
    if self.stem == 'imagenet':
      d = self.spatial_dims
      x = nn.max_pool(x, _tuple(3, d), strides=_tuple(2, d), padding=_pad(1, d))
    return x

  def forward_stage(self, i: int, x, train: bool):
    """Dense block ``i + 1`` and, except after the last block, its transition."""
    x = getattr(self, f'denseblock{i + 1}')(x, train)
    if i < self.num_stages - 1:
      x = getattr(self, f'transition{i + 1}')(x, train)
    return x

  def forward_head(self, x, train: bool):
    """norm5 -> ReLU -> global average pool: the (B, F) vector a classifier reads."""
    x = self.act(self.norm5(x, use_running_average=not train))
    return jnp.mean(x, axis=tuple(range(1, 1 + self.spatial_dims)))

  def __call__(self, x, train: bool):
    x = self.forward_stem(x, train)
    for i in range(self.num_stages):
      x = self.forward_stage(i, x, train)
    return self.forward_head(x, train)

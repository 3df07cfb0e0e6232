"""nnU-Net v2 ``PlainConvUNet`` (dynamic_network_architectures), channels-last, config-driven.

The semantic network of SPINEPS phase 1. Every field of an nnU-Net plan's architecture
(stages, widths, kernel sizes, strides, convolutions per stage) is a config field, so a
``plans.json`` is copied over field by field and converted PyTorch weights reproduce the
PyTorch outputs. Input (B, X, Y, Z, C); 2D plans (2-tuples, (B, X, Y, C)) work as well.

Layout, as PyTorch builds it:

* encoder stage s: ``n_conv_per_stage[s]`` x (conv ``kernel_sizes[s]``, padding (k-1)//2,
  bias ``conv_bias`` -> norm -> LeakyReLU); the first conv carries ``strides[s]`` (strided
  convolutions downsample, there is no pooling).
* decoder stage i, i = 0 .. n_stages-2, **deepest first** (PyTorch's order of computation):
  transposed conv (kernel = stride = ``strides[-(i+1)]``, bias ``conv_bias``) from
  ``features[-(i+1)]`` to ``features[-(i+2)]``; concatenation [upsampled, skip] (channels
  of the upsampled map first, as ``torch.cat((x, skip), 1)``) with encoder stage
  n_stages-2-i; ``n_conv_per_stage_decoder[i]`` convs (kernel ``kernel_sizes[-(i+2)]``,
  stride 1); a 1x1x1 segmentation head (always with bias) to ``num_classes``.
  ``n_conv_per_stage_decoder`` is therefore indexed deepest first, as in plans.json.
* output: with deep supervision the list of every decoder stage's logits, full resolution
  first (PyTorch reverses its list); otherwise the full-resolution logits alone. Logits are
  float32 whatever ``dtype`` computes in. All heads are always built, as in PyTorch, so one
  parameter tree serves training and inference.

Parameter names map one to one onto the PyTorch state dict (``pytorch_key`` spells it):

  encoder_stage{s}/conv{c}/{kernel,bias}    encoder.stages.{s}.0.convs.{c}.conv.{weight,bias}
  encoder_stage{s}/norm{c}/{scale,bias}     encoder.stages.{s}.0.convs.{c}.norm.{weight,bias}
  decoder_stage{i}/conv{c}/{kernel,bias}    decoder.stages.{i}.convs.{c}.conv.{weight,bias}
  decoder_stage{i}/norm{c}/{scale,bias}     decoder.stages.{i}.convs.{c}.norm.{weight,bias}
  decoder_transpconv{i}/{kernel,bias}       decoder.transpconvs.{i}.{weight,bias}
  decoder_seg{i}/{kernel,bias}              decoder.seg_layers.{i}.{weight,bias}

with the same decoder index i on both sides (0 = the stage right after the bottleneck,
n_stages-2 = full resolution). The state dict's aliases ``...all_modules.{j}...`` and
``decoder.encoder.*`` repeat the same tensors and have no counterpart. Layouts: a conv
weight (out, in, *k) becomes a kernel (*k, in, out); a transposed-conv weight (in, out, *k)
becomes a kernel (*k, in, out) as well (a different permutation); biases and InstanceNorm
weights are unchanged. With ``norm='batch'`` the running statistics sit in ``batch_stats``
as ``mean``/``var`` (``running_mean``/``running_var``).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np

from spine_jax.models import conv as conv_lib

NORMS = ('instance', 'batch', 'group')

# nnU-Net's InitWeights_He(1e-2): kaiming_normal_(a=0.01) on every conv, zero biases.
_HE_SCALE = 2.0 / (1.0 + 0.01 ** 2)
he_normal = nn.initializers.variance_scaling(_HE_SCALE, 'fan_in', 'normal')
# torch computes a transposed conv's fan-in from its weight's dim 1, the *output* channels.
he_normal_transposed = nn.initializers.variance_scaling(_HE_SCALE, 'fan_in', 'normal',
                                                         in_axis=-1, out_axis=-2)


def default_unet_config() -> ml_collections.ConfigDict:
  """A typical nnU-Net 3d_fullres plan: 6 stages, 32..320 features, isotropic strides."""
  cfg = ml_collections.ConfigDict()
  cfg.n_stages = 6
  cfg.features_per_stage = (32, 64, 128, 256, 320, 320)
  cfg.kernel_sizes = ((3, 3, 3),) * 6  # per encoder stage, plans.json 'conv_kernel_sizes'
  cfg.strides = ((1, 1, 1),) + ((2, 2, 2),) * 5  # per encoder stage, plans.json 'strides'
  cfg.n_conv_per_stage = (2,) * 6
  cfg.n_conv_per_stage_decoder = (2,) * 5  # deepest decoder stage first, as in plans.json
  cfg.in_channels = 1
  cfg.num_classes = 15
  cfg.conv_bias = True
  cfg.norm = 'instance'  # InstanceNorm eps 1e-5, affine; 'batch' and 'group' for experiments
  cfg.norm_groups = 8  # for norm='group' only
  cfg.leaky_relu_slope = 0.01
  cfg.deep_supervision = True
  cfg.dtype = 'float32'  # compute dtype ('bfloat16' halves activation memory); params float32
  cfg.remat = False  # recompute each conv stack in the backward pass to save activation memory
  # 'auto': on CPU fused tap sums for few channels, sums of 2D convolutions otherwise (several times faster
  # there); XLA's 3D conv elsewhere; same parameters either way (models/conv.py).
  cfg.conv = 'auto'
  return cfg


def tiny_unet_config() -> ml_collections.ConfigDict:
  """3 stages, 4/8/16 features, anisotropic strides: compiles in seconds, for tests."""
  cfg = default_unet_config()
  cfg.n_stages = 3
  cfg.features_per_stage = (4, 8, 16)
  cfg.kernel_sizes = ((3, 3, 3),) * 3
  cfg.strides = ((1, 1, 1), (2, 2, 1), (2, 2, 2))
  cfg.n_conv_per_stage = (2,) * 3
  cfg.n_conv_per_stage_decoder = (2,) * 2
  return cfg


def make_norm(kind: str, groups: int = 8) -> Callable[..., nn.Module]:
  """Norm factory ``norm(dtype=..., name=...)``; eps 1e-5 (PyTorch's) for every kind."""
  if kind == 'instance':
    # Two-pass variance, as PyTorch: E[x^2]-E[x]^2 loses digits on large activations.
    return functools.partial(nn.InstanceNorm, epsilon=1e-5, use_fast_variance=False)
  if kind == 'batch':
    return functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)
  if kind == 'group':
    return functools.partial(nn.GroupNorm, num_groups=groups, epsilon=1e-5,
                             use_fast_variance=False)
  raise ValueError(f'unknown norm {kind!r}; known: {NORMS}')


def _pad(kernel: Sequence[int]) -> tuple[tuple[int, int], ...]:
  """PyTorch's symmetric padding (k-1)//2 ('SAME' would pad stride-2 convs asymmetrically)."""
  return tuple(((k - 1) // 2, (k - 1) // 2) for k in kernel)


class ConvStack(nn.Module):
  """``StackedConvBlocks``: ``num_convs`` x (conv -> norm -> LeakyReLU), first conv strided.

  ``norm`` is a factory ``norm(dtype=..., name=...)``; BatchNorm, the one norm with a
  train/eval difference, is called with ``use_running_average=not train``.
  """
  features: int
  num_convs: int
  kernel_size: Sequence[int]
  stride: Sequence[int]
  use_bias: bool = True
  dtype: Any = jnp.float32
  norm: Callable[..., nn.Module] = make_norm('instance')
  act: Callable[[jnp.ndarray], jnp.ndarray] = functools.partial(nn.leaky_relu,
                                                                negative_slope=0.01)
  conv: Callable[..., nn.Module] = nn.Conv

  @nn.compact
  def __call__(self, x, train: bool):
    kernel = tuple(self.kernel_size)
    for c in range(self.num_convs):
      stride = tuple(self.stride) if c == 0 else (1,) * len(kernel)
      x = self.conv(self.features, kernel, strides=stride, padding=_pad(kernel),
                  use_bias=self.use_bias, dtype=self.dtype, kernel_init=he_normal,
                  name=f'conv{c}')(x)
      norm = self.norm(dtype=self.dtype, name=f'norm{c}')
      x = norm(x, use_running_average=not train) if isinstance(norm, nn.BatchNorm) else norm(x)
      x = self.act(x)
    return x


class TransposedConv(nn.Module):
  """Transposed conv with kernel = stride (no overlap), as ``torch.nn.ConvTranspose3d``.

  Written as one matmul plus a depth-to-space reshape: XLA's ``conv_transpose`` would
  dilate the input with zeros and multiply them too (8x the work for stride 2 in 3D).
  ``out[..., s*i + k, o] = sum_c x[..., i, c] * kernel[k, c, o] + bias[o]``.
  """
  features: int
  stride: Sequence[int]
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    stride = tuple(self.stride)
    d = len(stride)
    kernel = self.param('kernel', he_normal_transposed, (*stride, x.shape[-1], self.features),
                        self.param_dtype)
    x = x.astype(self.dtype)
    y = jnp.tensordot(x, kernel.astype(self.dtype), axes=((x.ndim - 1,), (d,)))
    # (B, *spatial, *k, O) -> (B, s0, k0, s1, k1, ..., O) -> (B, s0*k0, s1*k1, ..., O)
    b, spatial = x.shape[0], x.shape[1:1 + d]
    order = [0] + [a for i in range(d) for a in (1 + i, 1 + d + i)] + [1 + 2 * d]
    y = jnp.transpose(y, order).reshape(b, *(n * s for n, s in zip(spatial, stride)), self.features)
    if self.use_bias:
      bias = self.param('bias', nn.initializers.zeros, (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class PlainConvUNet(nn.Module):
  """nnU-Net v2 PlainConvUNet: (B, *spatial, C) -> logits (see the module docstring).

  Every spatial side must be divisible by the product of the strides along its axis.
  ``remat`` recomputes each conv stack in the backward pass; parameters stay float32
  whatever ``dtype`` computes in. ``train`` only matters for ``norm='batch'``.
  """
  features_per_stage: Sequence[int] = (32, 64, 128, 256, 320, 320)
  kernel_sizes: Sequence[Sequence[int]] = ((3, 3, 3),) * 6
  strides: Sequence[Sequence[int]] = ((1, 1, 1),) + ((2, 2, 2),) * 5
  n_conv_per_stage: Sequence[int] = (2,) * 6
  n_conv_per_stage_decoder: Sequence[int] = (2,) * 5
  in_channels: int = 1
  num_classes: int = 15
  conv_bias: bool = True
  deep_supervision: bool = True
  remat: bool = False
  dtype: Any = jnp.float32
  norm: Callable[..., nn.Module] = make_norm('instance')
  act: Callable[[jnp.ndarray], jnp.ndarray] = functools.partial(nn.leaky_relu,
                                                                negative_slope=0.01)
  conv: Callable[..., nn.Module] = nn.Conv

  @property
  def n_stages(self) -> int:
    return len(self.features_per_stage)

  @property
  def divisor(self) -> tuple[int, ...]:
    """Per spatial axis, the product of the strides: every input side's required divisor."""
    return tuple(int(np.prod(axis)) for axis in zip(*self.strides))

  def check_input(self, shape: Sequence[int]) -> None:
    """Raise a ValueError naming the shape when it is not (B, *spatial, in_channels) with
    every side divisible by ``divisor``."""
    d, shape = len(self.divisor), tuple(shape)
    if len(shape) != d + 2:
      raise ValueError(f'expected a (batch, {d} spatial dims, channels) input, got shape {shape}')
    if shape[-1] != self.in_channels:
      raise ValueError(f'expected {self.in_channels} input channels (last axis), got shape {shape}')
    spatial = shape[1:-1]
    if any(n % k for n, k in zip(spatial, self.divisor)):
      raise ValueError(f'input spatial shape {spatial} (of {shape}) is not divisible by '
                       f'{self.divisor}, the product of the strides per axis; pad or crop '
                       f'to a multiple')

  def setup(self):
    n = self.n_stages
    lengths = dict(kernel_sizes=len(self.kernel_sizes), strides=len(self.strides),
                   n_conv_per_stage=len(self.n_conv_per_stage))
    if any(v != n for v in lengths.values()) or len(self.n_conv_per_stage_decoder) != n - 1:
      raise ValueError(f'{n} stages need {n} kernel_sizes, strides and n_conv_per_stage and '
                       f'{n - 1} n_conv_per_stage_decoder; got {lengths} and '
                       f'{len(self.n_conv_per_stage_decoder)}')
    if len({len(t) for t in (*self.kernel_sizes, *self.strides)}) != 1:
      raise ValueError(f'kernel_sizes {self.kernel_sizes} and strides {self.strides} must all '
                       f'have one entry per spatial axis')
    stack_cls = nn.remat(ConvStack, static_argnums=(2,)) if self.remat else ConvStack
    stack = functools.partial(stack_cls, use_bias=self.conv_bias, dtype=self.dtype,
                              norm=self.norm, act=self.act, conv=self.conv)
    f, k, s = self.features_per_stage, self.kernel_sizes, self.strides
    for i in range(n):
      # setattr keeps names the PyTorch keys map onto (see the module docstring).
      setattr(self, f'encoder_stage{i}', stack(features=f[i], num_convs=self.n_conv_per_stage[i],
                                               kernel_size=tuple(k[i]), stride=tuple(s[i])))
    ones = (1,) * len(s[0])
    for i in range(n - 1):
      setattr(self, f'decoder_transpconv{i}', TransposedConv(
          f[-(i + 2)], tuple(s[-(i + 1)]), use_bias=self.conv_bias, dtype=self.dtype))
      setattr(self, f'decoder_stage{i}', stack(
          features=f[-(i + 2)], num_convs=self.n_conv_per_stage_decoder[i],
          kernel_size=tuple(k[-(i + 2)]), stride=ones))
      setattr(self, f'decoder_seg{i}', self.conv(
          self.num_classes, ones, padding='VALID', use_bias=True, dtype=self.dtype,
          kernel_init=he_normal))

  def __call__(self, x, train: bool = False):
    self.check_input(x.shape)
    n = self.n_stages
    x = x.astype(self.dtype)
    skips = []
    for i in range(n):
      x = getattr(self, f'encoder_stage{i}')(x, train)  # positional: remat keeps `train` static
      skips.append(x)
    outputs = []
    for i in range(n - 1):
      x = getattr(self, f'decoder_transpconv{i}')(x)
      x = jnp.concatenate([x, skips[-(i + 2)]], axis=-1)
      x = getattr(self, f'decoder_stage{i}')(x, train)
      # Unused heads still run at init so their parameters exist, as PyTorch always builds them.
      if self.deep_supervision or i == n - 2 or self.is_initializing():
        outputs.append(getattr(self, f'decoder_seg{i}')(x).astype(jnp.float32))
    outputs = outputs[::-1]
    return outputs if self.deep_supervision else outputs[0]


def _dtype(name: Any):
  return jnp.dtype(name) if isinstance(name, str) else name


def build_unet(cfg: Mapping[str, Any]) -> PlainConvUNet:
  """The PlainConvUNet of a config from ``default_unet_config`` (lists become tuples)."""
  n = cfg['n_stages']
  features = tuple(int(v) for v in cfg['features_per_stage'])
  if len(features) != n:
    raise ValueError(f'n_stages={n} but features_per_stage has {len(features)} entries: {features}')
  return PlainConvUNet(
      features_per_stage=features,
      kernel_sizes=tuple(tuple(int(v) for v in t) for t in cfg['kernel_sizes']),
      strides=tuple(tuple(int(v) for v in t) for t in cfg['strides']),
      n_conv_per_stage=tuple(int(v) for v in cfg['n_conv_per_stage']),
      n_conv_per_stage_decoder=tuple(int(v) for v in cfg['n_conv_per_stage_decoder']),
      in_channels=int(cfg['in_channels']),
      num_classes=int(cfg['num_classes']),
      conv_bias=bool(cfg['conv_bias']),
      deep_supervision=bool(cfg['deep_supervision']),
      remat=bool(cfg['remat']),
      dtype=_dtype(cfg['dtype']),
      norm=make_norm(cfg['norm'], int(cfg.get('norm_groups', 8))),
      act=functools.partial(nn.leaky_relu, negative_slope=float(cfg['leaky_relu_slope'])),
      conv=conv_lib.make_conv(str(cfg.get('conv', 'auto'))),
  )


_LEAF = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
         'var': 'running_var'}


def pytorch_key(path: Sequence[str]) -> str:
  """The PyTorch state-dict key of a flattened Flax path, e.g.
  ``('encoder_stage0', 'conv1', 'kernel')`` -> ``'encoder.stages.0.0.convs.1.conv.weight'``."""
  module, leaf = path[0], _LEAF[path[-1]]
  for prefix, torch_prefix in (('encoder_stage', 'encoder.stages.{}.0.convs'),
                               ('decoder_stage', 'decoder.stages.{}.convs')):
    if module.startswith(prefix):
      sub = path[1]
      kind = 'conv' if sub.startswith('conv') else 'norm'
      return f'{torch_prefix.format(module[len(prefix):])}.{sub[len(kind):]}.{kind}.{leaf}'
  for prefix, torch_prefix in (('decoder_transpconv', 'decoder.transpconvs'),
                               ('decoder_seg', 'decoder.seg_layers')):
    if module.startswith(prefix):
      return f'{torch_prefix}.{module[len(prefix):]}.{leaf}'
  raise ValueError(f'not a PlainConvUNet parameter path: {path}')


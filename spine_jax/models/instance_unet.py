"""SPINEPS' residual 3D U-Net (``spineps/architectures/unet3D.py``, ``Unet3D``), channels-last.

The instance network of SPINEPS phase 2. It reads a cutout of the semantic mask, relabelled
{41..48 -> 1..8, 49 -> 9, else 0} and one-hot encoded (10 channels), and returns 4 logits per
voxel: background, the vertebra above, the vertebra at the cutout's centre, the vertebra below.
Input (B, X, Y, Z, C); every side divisible by 2 ** (len(dim_mults) - 1).

Layout, as PyTorch builds it (widths ``dims = (dim, dim * m for m in dim_mults)``, 16, 16, 32,
64, 128 in SPINEPS 1.x; its 2.x networks use ``dim = 8``):

* ``init_conv``: 7x7x7 conv (padding 3, bias) to ``dim``; its output ``r`` is kept for the head.
* level i (``dims[i] -> dims[i+1]``): 2 residual blocks, the output kept as skip i, then a 4x4x4
  stride-2 conv (padding 1, bias), except at the last level (PyTorch's ``nn.Identity``).
* bottleneck: 2 residual blocks at the last level's width and resolution.
* decoder step i (deepest first): ``0.5 * (x + skip)``, 2 residual blocks to ``dims[-(i+2)]``,
  then a 4x4x4 stride-2 transposed conv (padding 1, bias), except at the last step.
* head: concatenation ``[x, r]`` (channels of x first, as ``torch.cat((x, r), 1)``), a residual
  block to ``dim``, a 1x1x1 conv (bias) to ``num_classes``. Logits are float32.
* residual block: ``block2(block1(x)) + res_conv(x)``, each block 3x3x3 conv (padding 1, bias) ->
  GroupNorm (8 groups, eps 1e-5, affine) -> LeakyReLU (0.01); ``res_conv`` is a 1x1x1 conv
  (bias) that exists only where the widths differ. Nothing follows the addition.

Parameter names map one to one onto the PyTorch state dict (``pytorch_key`` spells it; a
Lightning checkpoint prefixes every key with ``network.``):

  init_conv/{kernel,bias}                  init_conv.{weight,bias}
  down{i}_res{j}/block{b}/proj/...         downs.{i}.{j}.block{b}.proj.{weight,bias}
  down{i}_res{j}/block{b}/norm/{scale,bias}  downs.{i}.{j}.block{b}.norm.{weight,bias}
  down{i}_res{j}/res_conv/...              downs.{i}.{j}.res_conv.{weight,bias}
  down{i}_conv/...                         downs.{i}.2.{weight,bias}
  mid_block{1,2}/...                       mid_block{1,2}....
  up{i}_res{j}/...                         ups.{i}.{j}....
  up{i}_transpconv/...                     ups.{i}.2.{weight,bias}
  final_res_block/..., final_conv/...      final_res_block...., final_conv....

Layouts: a conv weight (out, in, *k) becomes a kernel (*k, in, out); a transposed-conv weight
(in, out, *k) becomes a kernel (*k, in, out) as well (a different permutation); biases and
GroupNorm weights are unchanged. ``params_from_pytorch`` does all of it.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util
from jax import lax

from spine_jax.models import conv as conv_lib

# PyTorch's default conv init, kaiming_uniform_(a=sqrt(5)): U(+-1/sqrt(fan_in)). Biases start at
# zero here (PyTorch draws them from the same range; nothing depends on it).
torch_uniform = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
# torch computes a transposed conv's fan-in from its weight's dim 1, the *output* channels.
torch_uniform_transposed = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform',
                                                            in_axis=-1, out_axis=-2)


def default_instance_unet_config() -> ml_collections.ConfigDict:
  """SPINEPS 1.x's instance network: ``Unet3D(dim=16, dim_mults=(1, 2, 4, 8), channels=10,
  out_dim=4)``, 5,375,124 parameters."""
  cfg = ml_collections.ConfigDict()
  cfg.dim = 16  # base width; the widths are (dim, dim * m for m in dim_mults)
  cfg.dim_mults = (1, 2, 4, 8)
  cfg.in_channels = 10
  cfg.num_classes = 4
  cfg.groups = 8  # GroupNorm groups; every width must be divisible by it
  cfg.init_kernel = 7  # SPINEPS' initial conv; other sizes have no PyTorch twin
  cfg.leaky_relu_slope = 0.01
  cfg.dtype = 'float32'  # compute dtype; parameters stay float32
  cfg.remat = False  # recompute each residual block in the backward pass (activation memory)
  # 'auto': sums of 2D convolutions and FFTs on CPU (several times faster there), XLA's 3D convolution
  # elsewhere; the same parameters either way (models/conv.py).
  cfg.conv = 'auto'
  return cfg


def tiny_instance_unet_config() -> ml_collections.ConfigDict:
  """Widths 4, 4, 8, 16 in 2 groups, a 3x3x3 initial conv: compiles in seconds, for tests."""
  cfg = default_instance_unet_config()
  cfg.dim = 4
  cfg.dim_mults = (1, 2, 4)
  cfg.groups = 2
  cfg.init_kernel = 3
  return cfg


def _pad(k: int, n: int = 3) -> tuple[tuple[int, int], ...]:
  return ((k // 2, k // 2),) * n


class Block(nn.Module):
  """``Block3D``: 3x3x3 conv -> GroupNorm -> LeakyReLU."""
  features: int
  groups: int = 8
  slope: float = 0.01
  dtype: Any = jnp.float32
  conv: Callable[..., nn.Module] = nn.Conv

  @nn.compact
  def __call__(self, x):
    x = self.conv(self.features, (3, 3, 3), padding=_pad(3), dtype=self.dtype, kernel_init=torch_uniform,
                  name='proj')(x)
    # Two-pass variance, as PyTorch: E[x^2]-E[x]^2 loses digits on large activations.
    x = nn.GroupNorm(num_groups=self.groups, epsilon=1e-5, use_fast_variance=False, dtype=self.dtype,
                     name='norm')(x)
    return nn.leaky_relu(x, negative_slope=self.slope)


class ResnetBlock(nn.Module):
  """``ResnetBlock3D``: block2(block1(x)) + x, through a 1x1x1 conv when the widths differ."""
  features: int
  groups: int = 8
  slope: float = 0.01
  dtype: Any = jnp.float32
  conv: Callable[..., nn.Module] = nn.Conv

  @nn.compact
  def __call__(self, x):
    block = functools.partial(Block, self.features, self.groups, self.slope, self.dtype, self.conv)
    h = block(name='block2')(block(name='block1')(x))
    if x.shape[-1] != self.features:
      x = self.conv(self.features, (1, 1, 1), padding='VALID', dtype=self.dtype,
                    kernel_init=torch_uniform, name='res_conv')(x)
    return h + x


# Transposed conv k4 s2 p1 along one axis: output 2m + p sums input m - 1 + t (t = 0, 1, on the
# input padded by 1) times torch kernel tap _TAP[p][t] (from o = 2i - 1 + k).
_TAP = np.array([[3, 1], [2, 0]])


class TransposedConv(nn.Module):
  """``nn.ConvTranspose3d(c, features, 4, 2, 1)``: each side doubles.

  Written as a 2x2x2 convolution to 8 x features channels (one set per output parity) and an
  interleave, which multiplies exactly the taps PyTorch does; ``lax.conv_transpose`` would
  dilate the input with zeros and multiply those too (8x the work in 3D).
  """
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  sliced: bool = False  # the 2x2x2 convolution as sums of 2D ones (models/conv.py), for CPUs

  @nn.compact
  def __call__(self, x):
    c, f = x.shape[-1], self.features
    kernel = self.param('kernel', torch_uniform_transposed, (4, 4, 4, c, f), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (f,), self.param_dtype)
    w = kernel
    for a in range(3):  # (k0, k1, k2, c, f) -> (t0, p0, t1, p1, t2, p2, c, f)
      w = jnp.take(w, _TAP.T, axis=2 * a)
    w = jnp.transpose(w, (0, 2, 4, 6, 1, 3, 5, 7)).reshape(2, 2, 2, c, 8 * f)
    x, w = x.astype(self.dtype), w.astype(self.dtype)
    if self.sliced:
      y = conv_lib.sliced_conv(x, w, (1, 1, 1), ((1, 1),) * 3)
    else:
      y = lax.conv_general_dilated(x, w, (1, 1, 1), ((1, 1),) * 3, dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'))
    y = y.reshape(y.shape[:4] + (2, 2, 2, f))  # (B, n0+1, n1+1, n2+1, p0, p1, p2, f)
    n = x.shape[1:4]
    for a in range(3):  # the parity axis of spatial axis a sits right after the spatial axes
      lead, rest = (slice(None),) * (1 + a), (slice(None),) * (2 - a)
      lo = y[lead + (slice(0, n[a]),) + rest + (0,)]
      hi = y[lead + (slice(1, n[a] + 1),) + rest + (1,)]
      y = jnp.stack([lo, hi], axis=2 + a)
      y = y.reshape(y.shape[:1 + a] + (2 * n[a],) + y.shape[3 + a:])
    return y + bias.astype(self.dtype)


class InstanceUNet(nn.Module):
  """SPINEPS ``Unet3D``: (B, X, Y, Z, in_channels) -> (B, X, Y, Z, num_classes) float32 logits.

  ``train`` is accepted for the training loop's sake; GroupNorm behaves the same either way.
  """
  dim: int = 16
  dim_mults: Sequence[int] = (1, 2, 4, 8)
  in_channels: int = 10
  num_classes: int = 4
  groups: int = 8
  init_kernel: int = 7
  slope: float = 0.01
  remat: bool = False
  dtype: Any = jnp.float32
  conv_impl: str = 'xla'  # 'xla', 'sliced', 'fft', 'tapsum' or 'auto' (models/conv.py)

  @property
  def widths(self) -> tuple[int, ...]:
    return (self.dim, *(int(self.dim * m) for m in self.dim_mults))

  @property
  def divisor(self) -> int:
    """Every input side must be a multiple of this (one halving per level but the last)."""
    return 2 ** (len(self.dim_mults) - 1)

  def check_input(self, shape: Sequence[int]) -> None:
    """Raise a ValueError naming the shape unless it is (B, X, Y, Z, in_channels) with every side
    divisible by ``divisor``."""
    shape = tuple(shape)
    if len(shape) != 5:
      raise ValueError(f'expected a (batch, 3 spatial dims, channels) input, got shape {shape}')
    if shape[-1] != self.in_channels:
      raise ValueError(f'expected {self.in_channels} input channels (last axis), got shape {shape}')
    if any(n % self.divisor for n in shape[1:4]):
      raise ValueError(f'input spatial shape {shape[1:4]} (of {shape}) is not divisible by {self.divisor} '
                       f'(2 ** (levels - 1)); pad or crop to a multiple')
    if any(w % self.groups for w in self.widths):
      raise ValueError(f'widths {self.widths} are not all divisible by {self.groups} GroupNorm groups')

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    self.check_input(x.shape)
    res_cls = nn.remat(ResnetBlock) if self.remat else ResnetBlock
    # 'auto' without tap sums: phase 2 calls this network on a few batches of cutouts per scan, and its ten
    # tap-sum layers add 4 s of compilation (1 s with a warm cache) to save 0.03 s per cutout (BUILD_NOTES.md).
    impl = conv_lib.resolve_conv_impl(self.conv_impl, tap_sum=False)
    conv_cls = conv_lib.make_conv(impl)
    res = functools.partial(res_cls, groups=self.groups, slope=self.slope, dtype=self.dtype, conv=conv_cls)
    conv = functools.partial(conv_cls, dtype=self.dtype, kernel_init=torch_uniform)
    widths = self.widths
    levels = len(widths) - 1
    k = self.init_kernel
    x = conv(self.dim, (k, k, k), padding=_pad(k), name='init_conv')(x.astype(self.dtype))
    r = x
    skips = []
    for i in range(levels):
      x = res(widths[i + 1], name=f'down{i}_res0')(x)
      x = res(widths[i + 1], name=f'down{i}_res1')(x)
      skips.append(x)
      if i < levels - 1:
        x = conv(widths[i + 1], (4, 4, 4), strides=(2, 2, 2), padding=_pad(2), name=f'down{i}_conv')(x)
    x = res(widths[-1], name='mid_block1')(x)
    x = res(widths[-1], name='mid_block2')(x)
    for i in range(levels):
      out = widths[levels - 1 - i]
      x = 0.5 * (x + skips.pop())
      x = res(out, name=f'up{i}_res0')(x)
      x = res(out, name=f'up{i}_res1')(x)
      if i < levels - 1:
        x = TransposedConv(out, dtype=self.dtype, sliced=conv_lib.is_sliced(impl), name=f'up{i}_transpconv')(x)
    x = res(self.dim, name='final_res_block')(jnp.concatenate([x, r], axis=-1))
    x = conv(self.num_classes, (1, 1, 1), padding='VALID', name='final_conv')(x)
    return x.astype(jnp.float32)


def _dtype(name: Any):
  return jnp.dtype(name) if isinstance(name, str) else name


def build_instance_unet(cfg: Mapping[str, Any]) -> InstanceUNet:
  """The network of a config from ``default_instance_unet_config``."""
  return InstanceUNet(
      dim=int(cfg['dim']),
      dim_mults=tuple(int(m) for m in cfg['dim_mults']),
      in_channels=int(cfg['in_channels']),
      num_classes=int(cfg['num_classes']),
      groups=int(cfg['groups']),
      init_kernel=int(cfg['init_kernel']),
      slope=float(cfg['leaky_relu_slope']),
      remat=bool(cfg['remat']),
      dtype=_dtype(cfg['dtype']),
      conv_impl=str(cfg.get('conv', 'auto')),
  )


_LEAF = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}


def pytorch_key(path: Sequence[str]) -> str:
  """The PyTorch state-dict key of a flattened Flax path, e.g.
  ``('down1_res0', 'block2', 'norm', 'scale')`` -> ``'downs.1.0.block2.norm.weight'``."""
  module, inner, leaf = path[0], list(path[1:-1]), _LEAF[path[-1]]
  for prefix, torch_prefix in (('down', 'downs'), ('up', 'ups')):
    if module.startswith(prefix) and '_' in module and module[len(prefix)].isdigit():
      level, part = module[len(prefix):].split('_', 1)
      if part in ('conv', 'transpconv'):
        return f'{torch_prefix}.{level}.2.{leaf}'
      if part.startswith('res'):
        return '.'.join([torch_prefix, level, part[3:], *inner, leaf])
  if module in ('init_conv', 'final_conv', 'mid_block1', 'mid_block2', 'final_res_block'):
    return '.'.join([module, *inner, leaf])
  raise ValueError(f'not an InstanceUNet parameter path: {path}')


def params_from_pytorch(state_dict: Mapping[str, Any], template) -> dict:
  """Flax parameters from a PyTorch ``Unet3D`` state dict (numpy or torch tensors; keys with or
  without Lightning's ``network.`` prefix), shaped like ``template`` (the params of
  ``model.init``, real or abstract). Missing keys and shape mismatches are errors naming them."""
  sd = {k[len('network.'):] if k.startswith('network.') else k: np.asarray(v) for k, v in state_dict.items()}
  out = {}
  for path, leaf in traverse_util.flatten_dict(template).items():
    key = pytorch_key(path)
    if key not in sd:
      raise KeyError(f'state dict lacks {key!r} (for {"/".join(path)})')
    value = sd[key]
    if value.ndim == 5:  # conv (out, in, *k), transposed conv (in, out, *k) -> (*k, in, out)
      value = value.transpose(2, 3, 4, 0, 1) if path[0].endswith('transpconv') else value.transpose(2, 3, 4, 1, 0)
    if tuple(value.shape) != tuple(leaf.shape):
      raise ValueError(f'{key}: shape {value.shape} after conversion, the model expects {tuple(leaf.shape)}')
    out[path] = jnp.asarray(value, jnp.float32)
  return traverse_util.unflatten_dict(out)

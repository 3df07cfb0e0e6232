"""Convolution layers that share ``nn.Conv``'s parameters but compute 3D convolutions faster on CPU.

XLA's CPU backend runs 3D convolutions several times slower than 2D ones (and their gradients
slower still): on 2 cores a 3x3x3, 16-channel convolution of a 2 x 64 x 128 x 32 volume took
0.32 s forward and 1.25 s forward + backward, against 0.09 s and 0.53 s as a sum of 2D
convolutions (BUILD_NOTES.md, "Convolution on CPU"). ``SlicedConv`` is that sum: for each tap
``a`` of the kernel along the first spatial axis, the matching (strided) planes of the padded
input go through a 2D convolution with ``kernel[a]`` over the other two axes, and the results
add up. The parameters are ``nn.Conv``'s ('kernel' (*k, in, out) and 'bias'), so checkpoints
and converted PyTorch weights work with either implementation.

Large stride-1 kernels (at least FFT_MIN_TAPS taps, e.g. SPINEPS' 7 x 7 x 7 first convolution of the
instance network) cost 343 multiply-adds per voxel and channel pair as a sum of 2D convolutions; through
FFTs (``fft_conv``) their cost no longer grows with the kernel: 0.19 s against 0.39 s for that layer on
4 cutouts of 72 x 80 x 16 voxels (BUILD_NOTES.md, "Convolution on CPU"). 'fft' is 'sliced' with that
rule.

Few channels (the first stages of both U-Nets: 1, 8 or 16 in, 8 out) leave XLA's 2D convolution far from the
machine's peak. Written out as a sum over taps and input channels of shifted input slices times kernel rows,
an 8-in, 8-out block of a 3^3 kernel is one XLA loop fusion that runs near the matrix-multiply peak
(``tap_sum_conv``; BUILD_NOTES.md, "Convolution on CPU", has the figures). Wider layers go 8 channels at a
time (a scan over input groups: one fusion of more terms is several times slower), inside a loop that keeps
XLA from fusing the sum into its consumers; the input gradient is the same sum with the flipped kernel, the
weight gradient the 2D sums'. 1x1x1 kernels become a channel contraction (a matrix multiply), and so do 2D
1x1 kernels: XLA's CPU weight gradient of a 2D 1x1 convolution was 4-5x slower than the product's (the
DenseNets' bottlenecks and transitions). 'tapsum' is 'fft' with these rules; 'auto' picks it on CPU.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

CONV_IMPLS = ('xla', 'sliced', 'fft', 'tapsum')
FFT_MIN_TAPS = 125  # 'fft': stride-1 3D kernels of at least 5 x 5 x 5 taps go through FFTs
FFT_BLOCK_SIDE = 72  # voxels per axis of `fft_conv`'s overlap-save blocks
TAP_SUM_GROUP = 8  # channels per fused block of `tap_sum_conv`
TAP_SUM_MAX_TAPS = 27  # 'tapsum': stride-1 kernels of at most 3 x 3 x 3 taps...
TAP_SUM_MAX_IN, TAP_SUM_MAX_OUT = 16, 8  # ... with at most these channels go through `tap_sum_conv`


class SlicedConv(nn.Module):
  """A 3D convolution as a sum of 2D convolutions over the last two spatial axes.

  Takes the arguments of ``nn.Conv`` that the networks use; ``padding`` is explicit
  ((lo, hi) per spatial axis) or 'VALID'. Other than 3 spatial axes, falls back to XLA's convolution (1x1
  kernels with ``tap_sum``: a contraction).
  With ``fft_min_taps`` > 0, stride-1 kernels of at least that many taps go through ``fft_conv``.
  """
  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] | None = None
  padding: Any = 'VALID'
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()
  fft_min_taps: int = 0
  tap_sum: bool = False  # small stride-1 layers through `tap_sum_conv`, 1x1(x1) kernels as a contraction

  @nn.compact
  def __call__(self, x):
    kernel_size = tuple(self.kernel_size)
    d = len(kernel_size)
    strides = tuple(self.strides) if self.strides is not None else (1,) * d
    padding = ((0, 0),) * d if self.padding == 'VALID' else tuple(tuple(p) for p in self.padding)
    if len(padding) != d or not all(len(p) == 2 for p in padding):
      raise ValueError(f'SlicedConv: padding must be VALID or (lo, hi) per axis, got {self.padding!r}')
    kernel = self.param('kernel', self.kernel_init, (*kernel_size, x.shape[-1], self.features),
                        self.param_dtype)
    dtype = self.dtype or x.dtype
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    stride_1 = all(st == 1 for st in strides)
    if self.tap_sum and stride_1 and math.prod(kernel_size) == 1 and padding == ((0, 0),) * d:
      y = jnp.einsum('...c,co->...o', x, kernel.reshape(kernel.shape[-2:]))
    elif d == 3 and self.tap_sum and stride_1 and takes_tap_sum(kernel_size, padding, x.shape[-1], self.features):
      y = tap_sum_conv(x, kernel, padding)
    elif d == 3 and 0 < self.fft_min_taps <= math.prod(kernel_size) and stride_1:
      y = fft_conv(x, kernel, padding)
    elif d == 3:
      y = sliced_conv(x, kernel, strides, padding)
    else:
      y = jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_dimension_numbers(d))
    if self.use_bias:
      bias = self.param('bias', self.bias_init, (self.features,), self.param_dtype)
      y = y + bias.astype(dtype)
    return y


def sliced_conv(x, kernel, strides, padding):
  """(B, X, Y, Z, C) * (kx, ky, kz, C, O) -> (B, X', Y', Z', O), PyTorch's cross-correlation."""
  b, n0 = x.shape[0], x.shape[1]
  k0, s0, (lo, hi) = kernel.shape[0], strides[0], padding[0]
  xp = jnp.pad(x, ((0, 0), (lo, hi), (0, 0), (0, 0), (0, 0))) if lo or hi else x
  out0 = (n0 + lo + hi - k0) // s0 + 1
  if out0 < 1:
    raise ValueError(f'SlicedConv: input side {n0} too small for kernel {k0} with padding {lo, hi}')
  y = None
  for a in range(k0):
    planes = jax.lax.slice_in_dim(xp, a, a + s0 * (out0 - 1) + 1, stride=s0, axis=1)
    planes = planes.reshape(b * out0, *planes.shape[2:])
    z = jax.lax.conv_general_dilated(planes, kernel[a], strides[1:], padding[1:],
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    y = z if y is None else y + z
  return y.reshape(b, out0, *y.shape[1:])


def fft_conv(x, kernel, padding, block_side: int | None = None):
  """(B, X, Y, Z, C) * (kx, ky, kz, C, O) -> (B, X', Y', Z', O), stride 1: PyTorch's cross-correlation
  as a product of spectra, in float32 (complex64), cast back to x's dtype.

  Overlap-save: a padded axis longer than `block_side` (FFT_BLOCK_SIDE unless given) is cut into overlapping
  blocks of at most that many voxels (`fft_blocks`), and each block's first side - k + 1 outputs are exact
  (output o reads inputs o .. o + k - 1 of its block, so circular correlation needs no room for wrap-around).
  The blocks keep the kernel's spectrum small: over a whole 254 x 310 x 70 cutout, that spectrum is 3.6 GB
  for 10 -> 16 channels, and writing and reading it took most of 12 s. The FFTs run channels-first (XLA's CPU
  FFT over the leading axes of a channels-last array was 2.5x slower), the kernel's spectrum is an explicit
  DFT (small matrix products, real arithmetic), and the product a loop over blocks in real arithmetic (fused
  into one expression, XLA recomputed the kernel's spectrum for every block)."""
  block_side = FFT_BLOCK_SIDE if block_side is None else int(block_side)
  taps = kernel.shape[:3]
  sides = tuple(n + lo + hi for n, (lo, hi) in zip(x.shape[1:4], padding))
  out = tuple(n - k + 1 for n, k in zip(sides, taps))
  if min(out) < 1:
    raise ValueError(f'fft_conv: input sides {sides} (padded) too small for kernel {taps}')
  counts, tiles = zip(*(fft_blocks(o, k, block_side) for o, k in zip(out, taps)))
  fft = tuple(t + k - 1 for t, k in zip(tiles, taps))
  batch, channels = x.shape[0], x.shape[-1]
  xc = jnp.moveaxis(x, -1, 1).astype(jnp.float32)  # (B, C, X, Y, Z)
  xc = jnp.pad(xc, ((0, 0), (0, 0), *((lo, n * t + k - 1 - s + hi) for (lo, hi), n, t, k, s
                                        in zip(padding, counts, tiles, taps, sides))))
  for a in range(3):  # spatial axis a (at 2 + 2a) -> (blocks, fft side)
    xc = _overlapping_blocks(xc, 2 + 2 * a, fft[a], tiles[a], counts[a])
  xc = jnp.transpose(xc, (0, 2, 4, 6, 1, 3, 5, 7)).reshape(-1, channels, *fft)  # (B n0 n1 n2, C, F0, F1, F2)
  spectrum = jnp.fft.rfftn(xc, axes=(2, 3, 4))
  ks = jnp.moveaxis(_correlation_spectrum(kernel.astype(jnp.float32), fft), (3, 4), (0, 1))  # (C, O, F...)
  kr, ki = jnp.real(ks), jnp.imag(ks)

  def product(s):  # one block's (C, F...) spectrum times the kernel's: (O, F...)
    sr, si = jnp.real(s), jnp.imag(s)
    re = sum(sr[c, None] * kr[c] - si[c, None] * ki[c] for c in range(channels))
    im = sum(sr[c, None] * ki[c] + si[c, None] * kr[c] for c in range(channels))
    return jax.lax.complex(re, im)
  y = jnp.fft.irfftn(jax.lax.map(product, spectrum), s=fft, axes=(2, 3, 4))[..., :tiles[0], :tiles[1], :tiles[2]]
  features = y.shape[1]
  y = y.reshape(batch, *counts, features, *tiles).transpose(0, 1, 5, 2, 6, 3, 7, 4)
  y = y.reshape(batch, *(n * t for n, t in zip(counts, tiles)), features)
  return y[:, :out[0], :out[1], :out[2]].astype(x.dtype)


def fft_blocks(out: int, taps: int, block_side: int) -> tuple[int, int]:
  """(blocks, outputs per block) along one axis of `out` outputs: one block where out + taps - 1 fits in
  `block_side`, else the fewest blocks of at most `block_side` voxels, their outputs shared out evenly."""
  per_block = max(block_side - taps + 1, 1)
  count = -(-out // per_block)
  return count, -(-out // count)


def _overlapping_blocks(x, axis: int, size: int, step: int, count: int):
  """`count` windows of `size` along `axis`, `step` apart, stacked on a new axis before it."""
  return jnp.stack([jax.lax.slice_in_dim(x, i * step, i * step + size, axis=axis) for i in range(count)], axis=axis)


def _correlation_spectrum(kernel, sides):
  """conj(rfftn(kernel zero-padded to `sides`)) over the three spatial axes, in real arithmetic: the
  last axis (rfft's half spectrum) first, where the arrays are smallest."""
  real, imag = kernel, None
  for axis in (2, 1, 0):
    n, k = sides[axis], kernel.shape[axis]
    freqs = np.arange(n // 2 + 1 if axis == 2 else n)
    angle = 2.0 * np.pi * np.outer(freqs, np.arange(k)) / n  # +i: the conjugate, for correlation
    cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)

    def along(matrix, a, axis=axis):
      return jnp.moveaxis(jnp.tensordot(matrix, a, axes=([1], [axis])), 0, axis)
    if imag is None:
      real, imag = along(cos, real), along(sin, real)
    else:
      real, imag = along(cos, real) - along(sin, imag), along(sin, real) + along(cos, imag)
  return jax.lax.complex(real, imag)


def takes_tap_sum(kernel_size, padding, in_channels: int, out_channels: int) -> bool:
  """Whether 'tapsum' computes a stride-1 layer as `tap_sum_conv`: few taps and channels, padding within the
  kernel (so that the input gradient is the same kind of sum)."""
  return (math.prod(kernel_size) <= TAP_SUM_MAX_TAPS and in_channels <= TAP_SUM_MAX_IN
          and out_channels <= TAP_SUM_MAX_OUT
          and all(0 <= lo < k and 0 <= hi < k for (lo, hi), k in zip(padding, kernel_size)))


def _chained_sum(terms, chains: int = 16):
  """Sum of arrays as `chains` independent running sums, then pairwise: a single running sum of 216 terms
  is one long dependency chain inside the fused loop (2.5x slower on 8 -> 8)."""
  sums = [None] * chains
  for i, t in enumerate(terms):
    k = i % chains
    sums[k] = t if sums[k] is None else jax.lax.add(sums[k], t)
  sums = [t for t in sums if t is not None]
  while len(sums) > 1:
    sums = [jax.lax.add(sums[i], sums[i + 1]) if i + 1 < len(sums) else sums[i] for i in range(0, len(sums), 2)]
  return sums[0]


def _tap_block(xp, kernel, out):
  """One block, every tap and input channel of `kernel` (kx, ky, kz, C, O) on the padded input: one fusion.
  Written in few `lax` ops per term (a slice, two broadcasts, a product, a sum): JAX traces these terms on
  every start, compilation cache or not, and jnp indexing made that take seconds per network."""
  kx, ky, kz, channels, features = kernel.shape
  shape = (xp.shape[0], *out, features)
  rows = jax.lax.split(kernel.reshape(-1, features), [1] * (kx * ky * kz * channels))
  terms = []
  for a in range(kx):
    for b in range(ky):
      for c in range(kz):
        for ch in range(channels):
          column = jax.lax.slice(xp, (0, a, b, c, ch), (xp.shape[0], a + out[0], b + out[1], c + out[2], ch + 1))
          row = rows[((a * ky + b) * kz + c) * channels + ch]
          terms.append(jax.lax.mul(jax.lax.broadcast_in_dim(column, shape, (0, 1, 2, 3, 4)),
                                   jax.lax.broadcast_in_dim(row, shape, (3, 4))))
  return _chained_sum(terms)


def _tap_sum(xp, kernel):
  """Cross-correlation of a padded input with `kernel`, VALID, inside a loop: a loop's operands and results
  are buffers. Without it XLA fuses the sum into each of its consumers (a norm's statistics and its
  normalisation each recompute all of it: 3x slower in the instance network). The trip count is 1 for a finite
  kernel and 2 for a NaN one (the body is idempotent), so that XLA cannot remove the loop as it removes
  one-trip loops."""
  out = tuple(n - k + 1 for n, k in zip(xp.shape[1:4], kernel.shape[:3]))
  if min(out) < 1:
    raise ValueError(f'tap_sum_conv: input sides {xp.shape[1:4]} (padded) too small for kernel {kernel.shape[:3]}')
  trips = 1 + jnp.isnan(jax.lax.slice(kernel.reshape(-1), (0,), (1,))[0]).astype(jnp.int32)
  init = jnp.zeros((xp.shape[0], *out, kernel.shape[-1]), xp.dtype)
  return jax.lax.fori_loop(0, trips, lambda _, y: _tap_sum_groups(xp, kernel, out), init)


def _tap_sum_groups(xp, kernel, out):
  """Cross-correlation of a padded input with `kernel`, VALID (output sides `out`), TAP_SUM_GROUP channels at
  a time."""
  cin, cout, g = kernel.shape[3], kernel.shape[4], TAP_SUM_GROUP

  def per_output_group(k):
    if cin <= g:
      return _tap_block(xp, k, out)
    n_in = -(-cin // g)
    pad_c = n_in * g - cin
    xs = jnp.pad(xp, ((0, 0),) * 4 + ((0, pad_c),)) if pad_c else xp
    ks = jnp.pad(k, ((0, 0),) * 3 + ((0, pad_c), (0, 0))) if pad_c else k
    xs = jnp.moveaxis(xs.reshape(*xs.shape[:4], n_in, g), 4, 0)
    ks = jnp.moveaxis(ks.reshape(*ks.shape[:3], n_in, g, ks.shape[-1]), 3, 0)

    def body(total, group):  # a loop: one fusion of every group's terms is several times slower
      return total + _tap_block(*group, out), None
    total, _ = jax.lax.scan(body, jnp.zeros((xp.shape[0], *out, k.shape[-1]), xp.dtype), (xs, ks))
    return total
  if cout <= g:
    return per_output_group(kernel)
  n_out = -(-cout // g)
  ks = jnp.pad(kernel, ((0, 0),) * 4 + ((0, n_out * g - cout),))
  ks = jnp.moveaxis(ks.reshape(*ks.shape[:4], n_out, g), 4, 0)
  ys = jax.lax.map(per_output_group, ks)  # (n_out, B, X, Y, Z, g)
  return jnp.moveaxis(ys, 0, -2).reshape(*ys.shape[1:-1], n_out * g)[..., :cout]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def tap_sum_conv(x, kernel, padding):
  """(B, X, Y, Z, C) * (kx, ky, kz, C, O) -> (B, X', Y', Z', O), stride 1: PyTorch's cross-correlation as
  fused sums of shifted input slices times kernel rows (module docstring). `padding` ((lo, hi) per axis,
  each below the kernel's side)."""
  return _tap_sum(jnp.pad(x, ((0, 0), *padding, (0, 0))), kernel)


def _tap_sum_fwd(x, kernel, padding):
  return tap_sum_conv(x, kernel, padding), (x, kernel)


def _tap_sum_bwd(padding, residuals, dy):
  x, kernel = residuals
  sliced_vjp = jax.vjp(lambda x, k: sliced_conv(x, k, (1, 1, 1), padding), x, kernel)[1]
  if kernel.shape[3] > TAP_SUM_MAX_OUT:  # the input gradient would be a sum to several output groups: slower
    return sliced_vjp(dy)
  # Input gradient: dy padded by (k - 1 - lo, k - 1 - hi), correlated with the flipped kernel, in and out swapped.
  back = tuple((k - 1 - lo, k - 1 - hi) for (lo, hi), k in zip(padding, kernel.shape[:3]))
  flipped = jnp.swapaxes(kernel[::-1, ::-1, ::-1], 3, 4)
  dx = _tap_sum(jnp.pad(dy, ((0, 0), *back, (0, 0))), flipped.astype(dy.dtype)).astype(x.dtype)
  return dx, sliced_vjp(dy)[1]


tap_sum_conv.defvjp(_tap_sum_fwd, _tap_sum_bwd)


def _dimension_numbers(d):
  spatial = 'DHW'[-d:] if d <= 3 else None
  return (f'N{spatial}C', f'{spatial}IO', f'N{spatial}C')


def make_conv(impl: str) -> Callable[..., nn.Module]:
  """Conv factory with ``nn.Conv``'s signature: 'xla' (``nn.Conv``), 'sliced', 'fft', 'tapsum' or 'auto'."""
  impl = resolve_conv_impl(impl)
  if impl == 'xla':
    return nn.Conv
  if impl == 'sliced':
    return SlicedConv
  return functools.partial(SlicedConv, fft_min_taps=FFT_MIN_TAPS, tap_sum=impl == 'tapsum')


def is_sliced(impl: str) -> bool:
  """Whether a resolved implementation computes 3D convolutions as sums of 2D ones (transposed ones too)."""
  return resolve_conv_impl(impl) in ('sliced', 'fft', 'tapsum')


def resolve_conv_impl(impl: str, tap_sum: bool = True) -> str:
  """'auto' -> 'tapsum' on CPU (sums of 2D convolutions, FFTs for large kernels, fused tap sums for few
  channels: faster there), or 'fft' with `tap_sum` false (a network called a few times per process, whose
  tap sums' compilation costs more than they save); XLA's own convolution on GPU/TPU (cuDNN...)."""
  if impl == 'auto':
    return ('tapsum' if tap_sum else 'fft') if jax.default_backend() == 'cpu' else 'xla'
  if impl not in CONV_IMPLS:
    raise ValueError(f'unknown conv implementation {impl!r}; known: auto, {", ".join(CONV_IMPLS)}')
  return impl

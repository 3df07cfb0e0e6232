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
rule; 'auto' picks it on CPU.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

CONV_IMPLS = ('xla', 'sliced', 'fft')
FFT_MIN_TAPS = 125  # 'fft': stride-1 3D kernels of at least 5 x 5 x 5 taps go through FFTs


class SlicedConv(nn.Module):
  """A 3D convolution as a sum of 2D convolutions over the last two spatial axes.

  Takes the arguments of ``nn.Conv`` that the networks use; ``padding`` is explicit
  ((lo, hi) per spatial axis) or 'VALID'. Other than 3 spatial axes, falls back to ``nn.Conv``.
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
    if d == 3 and 0 < self.fft_min_taps <= math.prod(kernel_size) and all(st == 1 for st in strides):
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


def fft_conv(x, kernel, padding):
  """(B, X, Y, Z, C) * (kx, ky, kz, C, O) -> (B, X', Y', Z', O), stride 1: PyTorch's cross-correlation
  as a product of spectra, in float32 (complex64), cast back to x's dtype.

  The padded input's sides n need no room for wrap-around: output o reads inputs o .. o + k - 1 < n, so
  circular correlation of length n is exact there. The kernel's spectrum is an explicit DFT (k taps to n
  frequencies per axis: small matrix products), conjugated for correlation."""
  xp = jnp.pad(x, ((0, 0), *padding, (0, 0))).astype(jnp.float32)
  sides, taps = xp.shape[1:4], kernel.shape[:3]
  out = tuple(n - k + 1 for n, k in zip(sides, taps))
  if min(out) < 1:
    raise ValueError(f'fft_conv: input sides {sides} (padded) too small for kernel {taps}')
  spectrum = jnp.fft.rfftn(xp, s=sides, axes=(1, 2, 3))
  kernel_spectrum = _correlation_spectrum(kernel.astype(jnp.float32), sides)
  channels = x.shape[-1]
  if channels <= 16:  # a fused multiply-add per channel beats a batched dot of tiny matrices on CPU
    product = sum(spectrum[..., c, None] * kernel_spectrum[None, ..., c, :] for c in range(channels))
  else:
    product = jnp.einsum('bxyzc,xyzco->bxyzo', spectrum, kernel_spectrum)
  y = jnp.fft.irfftn(product, s=sides, axes=(1, 2, 3))
  return y[:, :out[0], :out[1], :out[2]].astype(x.dtype)


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


def _dimension_numbers(d):
  spatial = 'DHW'[-d:] if d <= 3 else None
  return (f'N{spatial}C', f'{spatial}IO', f'N{spatial}C')


def make_conv(impl: str) -> Callable[..., nn.Module]:
  """Conv factory with ``nn.Conv``'s signature: 'xla' (``nn.Conv``), 'sliced', 'fft' or 'auto'."""
  impl = resolve_conv_impl(impl)
  if impl == 'xla':
    return nn.Conv
  return functools.partial(SlicedConv, fft_min_taps=FFT_MIN_TAPS) if impl == 'fft' else SlicedConv


def is_sliced(impl: str) -> bool:
  """Whether a resolved implementation computes 3D convolutions as sums of 2D ones (transposed ones too)."""
  return resolve_conv_impl(impl) in ('sliced', 'fft')


def resolve_conv_impl(impl: str) -> str:
  """'auto' -> 'fft' on CPU (sums of 2D convolutions, FFTs for large kernels: faster there); XLA's own
  convolution on GPU/TPU (cuDNN...)."""
  if impl == 'auto':
    return 'fft' if jax.default_backend() == 'cpu' else 'xla'
  if impl not in CONV_IMPLS:
    raise ValueError(f'unknown conv implementation {impl!r}; known: auto, {", ".join(CONV_IMPLS)}')
  return impl



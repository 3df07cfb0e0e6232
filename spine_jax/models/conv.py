"""Convolution layers that share ``nn.Conv``'s parameters but compute 3D convolutions faster on CPU.

XLA's CPU backend runs 3D convolutions several times slower than 2D ones (and their gradients
slower still): on 2 cores a 3x3x3, 16-channel convolution of a 2 x 64 x 128 x 32 volume took
0.32 s forward and 1.25 s forward + backward, against 0.09 s and 0.53 s as a sum of 2D
convolutions (BUILD_NOTES.md, "Convolution on CPU"). ``SlicedConv`` is that sum: for each tap
``a`` of the kernel along the first spatial axis, the matching (strided) planes of the padded
input go through a 2D convolution with ``kernel[a]`` over the other two axes, and the results
add up. The parameters are ``nn.Conv``'s ('kernel' (*k, in, out) and 'bias'), so checkpoints
and converted PyTorch weights work with either implementation.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

CONV_IMPLS = ('xla', 'sliced')


class SlicedConv(nn.Module):
  """A 3D convolution as a sum of 2D convolutions over the last two spatial axes.

  Takes the arguments of ``nn.Conv`` that the networks use; ``padding`` is explicit
  ((lo, hi) per spatial axis) or 'VALID'. Other than 3 spatial axes, falls back to ``nn.Conv``.
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
    y = sliced_conv(x, kernel, strides, padding) if d == 3 else jax.lax.conv_general_dilated(
        x, kernel, strides, padding, dimension_numbers=_dimension_numbers(d))
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


def _dimension_numbers(d):
  spatial = 'DHW'[-d:] if d <= 3 else None
  return (f'N{spatial}C', f'{spatial}IO', f'N{spatial}C')


def make_conv(impl: str) -> Callable[..., nn.Module]:
  """Conv factory with ``nn.Conv``'s signature: 'xla' (``nn.Conv``), 'sliced' or 'auto'."""
  impl = resolve_conv_impl(impl)
  return nn.Conv if impl == 'xla' else SlicedConv


def resolve_conv_impl(impl: str) -> str:
  """'auto' -> 'sliced' on CPU, where it is faster; XLA's own convolution on GPU/TPU (cuDNN...)."""
  if impl == 'auto':
    return 'sliced' if jax.default_backend() == 'cpu' else 'xla'
  if impl not in CONV_IMPLS:
    raise ValueError(f'unknown conv implementation {impl!r}; known: auto, {", ".join(CONV_IMPLS)}')
  return impl



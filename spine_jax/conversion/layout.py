"""PyTorch <-> Flax tensor layouts, the shape check every converter uses, and the error figure.

PyTorch convolutions store (out, in, *k) and transposed convolutions (in, out, *k); Flax stores
both as (*k, in, out). Spatial axes may also be reordered (``spatial_order``) when the PyTorch
network saw its volumes with the axes in another order than our model space (nnU-Net).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from spine_jax.conversion.errors import ConversionError


def conv_to_flax(weight: np.ndarray, spatial_order: Sequence[int] | None = None) -> np.ndarray:
  """(out, in, *k) -> (*k, in, out); ``spatial_order[j]`` is the PyTorch spatial axis of our axis j."""
  d = weight.ndim - 2
  order = tuple(range(d)) if spatial_order is None else tuple(spatial_order)
  return np.transpose(weight, (*(2 + a for a in order), 1, 0))


def transposed_conv_to_flax(weight: np.ndarray, spatial_order: Sequence[int] | None = None) -> np.ndarray:
  """(in, out, *k) -> (*k, in, out)."""
  d = weight.ndim - 2
  order = tuple(range(d)) if spatial_order is None else tuple(spatial_order)
  return np.transpose(weight, (*(2 + a for a in order), 0, 1))


def conv_from_flax(kernel: np.ndarray, spatial_order: Sequence[int] | None = None) -> np.ndarray:
  """(*k, in, out) -> (out, in, *k): the inverse of ``conv_to_flax`` (export to PyTorch)."""
  d = kernel.ndim - 2
  order = tuple(range(d)) if spatial_order is None else tuple(spatial_order)
  return np.transpose(kernel, np.argsort((*(2 + a for a in order), 1, 0)))


def transposed_conv_from_flax(kernel: np.ndarray, spatial_order: Sequence[int] | None = None) -> np.ndarray:
  """(*k, in, out) -> (in, out, *k): the inverse of ``transposed_conv_to_flax``."""
  d = kernel.ndim - 2
  order = tuple(range(d)) if spatial_order is None else tuple(spatial_order)
  return np.transpose(kernel, np.argsort((*(2 + a for a in order), 0, 1)))


def conv_from_flax_shape(shape: Sequence[int]) -> tuple[int, ...]:
  """The PyTorch (out, in, *k) shape of a Flax (*k, in, out) kernel, for messages."""
  return (shape[-1], shape[-2], *shape[:-2])


def check_shape(source, key: str, found: Sequence[int], expected: Sequence[int], note: str = "") -> None:
  """Raise naming the file, the key and both shapes unless they agree."""
  if tuple(found) != tuple(expected):
    raise ConversionError(f"{source}: {key} has shape {tuple(found)}{note}, expected {tuple(expected)}")


def relative_l2(ours, reference) -> float:
  """||ours - reference|| / ||reference|| in float64: the conformance figure of converted weights."""
  ours = np.asarray(ours, np.float64)
  reference = np.asarray(reference, np.float64)
  if ours.shape != reference.shape:
    raise ValueError(f"outputs differ in shape: {ours.shape} vs {reference.shape}")
  return float(np.linalg.norm(ours - reference) / max(np.linalg.norm(reference), 1e-30))

"""nnU-Net-style sliding-window prediction: numpy orchestration around a (jitted) JAX model call.

A volume larger than the network's patch is covered by overlapping patches (step = half a patch
by default); each patch's prediction is weighted by a Gaussian that trusts the patch centre more
than its border, where the network saw little context, and the weighted sum is divided by the
summed weights. The model is called on fixed-shape batches (the last one padded), so a jitted
`predict_fn` compiles once. The next batch is dispatched before the previous result is pulled to
the host, so device compute overlaps with the host-side accumulation.

Two window modes: `spine_jax` (float32 weights and sums: nnU-Net's intent) and `spineps`, the float16
arithmetic of TPTBox's nnU-Net predictor as SPINEPS 2.1.3 runs it. There the Gaussian is cast to float16
before it is normalised, so its values under float16's smallest subnormal (6e-8; about 55% of a
64 x 128 x 32 map, everything below 5e-4 of the peak) underflow to zero and are then raised to the smallest
non-zero one: a patch's outer half weighs as much as its border. The weighted logits and weights are summed
in float16. The `spineps` mode exists to reproduce SPINEPS' masks; the default keeps the correct weights.
"""
from __future__ import annotations

import itertools
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy import ndimage

SPINE_JAX_MODE, SPINEPS_MODE = 'spine_jax', 'spineps'
WINDOW_MODES = (SPINE_JAX_MODE, SPINEPS_MODE)
SPINEPS_WEIGHT_SCALE = 1000.0  # TPTBox's value_scaling_factor (predictor.py `_allocate`)


def gaussian_importance_map(patch_size: Sequence[int], sigma_scale: float = 1.0 / 8,
                            value_scaling_factor: float = 10.0, dtype=np.float32) -> np.ndarray:
  """nnU-Net's `compute_gaussian`: a Gaussian of sigma = patch * sigma_scale centred at patch // 2.

  Normalised to a maximum of `value_scaling_factor`; zeros (beyond scipy's 4-sigma truncation)
  become the smallest non-zero value, so no voxel of a covered image gets weight 0. Built as the
  outer product of 1D filtered impulses, which is what nnU-Net's n-D filter of an impulse equals.
  """
  patch_size = tuple(int(p) for p in patch_size)
  result = np.ones((), np.float64)
  for n in patch_size:
    impulse = np.zeros(n, np.float64)
    impulse[n // 2] = 1.0
    profile = ndimage.gaussian_filter1d(impulse, n * sigma_scale, mode='constant', cval=0.0)
    result = np.multiply.outer(result, profile)
  result = (result / (result.max() / value_scaling_factor)).astype(dtype)
  zero = result == 0
  if zero.any():
    result[zero] = result[~zero].min()
  return result


def spineps_importance_map(patch_size: Sequence[int], sigma_scale: float = 1.0 / 8) -> np.ndarray:
  """TPTBox's `compute_gaussian` (sliding_window_prediction.py) with the arguments SPINEPS' predictor
  passes: the n-D filtered impulse cast to float16 first, then scaled to a peak of 1000 in float16, zeros
  raised to the smallest non-zero value. Float16."""
  patch_size = tuple(int(p) for p in patch_size)
  impulse = np.zeros(patch_size)
  impulse[tuple(p // 2 for p in patch_size)] = 1.0
  profile = ndimage.gaussian_filter(impulse, [p * sigma_scale for p in patch_size], 0, mode='constant', cval=0)
  half = profile.astype(np.float16)
  half = (half / half.max() * np.float16(SPINEPS_WEIGHT_SCALE)).astype(np.float16)
  half[half == 0] = half[half != 0].min()
  return half


def window_mode_of(cfg) -> str:
  """`inference.sliding_window_mode` of an inference config, checked ('spine_jax' when absent)."""
  mode = cfg.get('sliding_window_mode', SPINE_JAX_MODE) if cfg is not None else SPINE_JAX_MODE
  if mode not in WINDOW_MODES:
    raise ValueError(f'inference.sliding_window_mode must be one of {WINDOW_MODES}, got {mode!r}')
  return mode


def sliding_window_steps(image_size: Sequence[int], patch_size: Sequence[int],
                         step_size: float = 0.5) -> list[list[int]]:
  """nnU-Net's `compute_steps_for_sliding_window`: patch start offsets per axis.

  ceil((image - patch) / (patch * step_size)) + 1 starts per axis, evenly spaced from 0 to
  image - patch (rounded half to even, as numpy). An axis smaller than the patch is padded to the
  patch first (see `sliding_window_predict`), so it gets the single start [0].
  """
  if not 0 < step_size <= 1:
    raise ValueError(f'step_size must be in (0, 1], got {step_size}')
  if len(image_size) != len(patch_size):
    raise ValueError(f'image size {tuple(image_size)} and patch size {tuple(patch_size)} differ in length')
  steps = []
  for image, patch in zip(image_size, patch_size):
    last = max(int(image), int(patch)) - int(patch)
    count = int(np.ceil(last / (patch * step_size))) + 1
    stride = last / (count - 1) if count > 1 else 0.0
    steps.append([int(np.round(stride * i)) for i in range(count)])
  return steps


def pad_to_patch(image: np.ndarray, patch_size: Sequence[int], value: float = 0.0) -> tuple[np.ndarray, tuple]:
  """Pad the spatial axes of (X, Y, Z, C) up to the patch, half below and half above (as nnU-Net).

  Returns (padded, crop): `padded[crop]` is the original. Zero is the mean of a z-scored image.
  """
  pads = [(max(p - s, 0) // 2, max(p - s, 0) - max(p - s, 0) // 2) for s, p in zip(image.shape[:3], patch_size)]
  pads += [(0, 0)] * (image.ndim - 3)
  crop = tuple(slice(lo, lo + s) for (lo, _), s in zip(pads, image.shape[:3]))
  if not any(lo or hi for lo, hi in pads):
    return image, crop
  return np.pad(image, pads, mode='constant', constant_values=value), crop


def mirror_combinations(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
  """Every subset of the mirror axes, the empty one (no flip) first: nnU-Net's test-time mirroring."""
  axes = tuple(sorted(set(int(a) for a in mirror_axes)))
  if any(a not in (0, 1, 2) for a in axes):
    raise ValueError(f'mirror axes must be spatial axes 0, 1, 2; got {tuple(mirror_axes)}')
  return [combo for r in range(len(axes) + 1) for combo in itertools.combinations(axes, r)]


def _channel_swaps(swaps: Mapping[int, Sequence[int]] | None, num_classes: int) -> dict[int, np.ndarray]:
  """{axis: channel permutation} checked: each a permutation of range(num_classes), on a spatial axis."""
  out = {}
  for axis, perm in (swaps or {}).items():
    perm = np.asarray(perm, np.int64)
    if int(axis) not in (0, 1, 2) or sorted(perm.tolist()) != list(range(num_classes)):
      raise ValueError(f'mirror_channel_swaps[{axis}] must be a permutation of the {num_classes} output '
                       f'channels on a spatial axis 0, 1, 2; got {perm.tolist()}')
    out[int(axis)] = perm
  return out


def _check_prediction(prediction: np.ndarray, batch_shape: tuple, num_classes: int) -> np.ndarray:
  expected = batch_shape[:4] + (num_classes,)
  if prediction.shape != expected:
    raise ValueError(f'predict_fn returned shape {prediction.shape} for a batch of shape {batch_shape}; '
                     f'expected {expected}')
  return prediction


def sliding_window_predict(predict_fn: Callable, image: np.ndarray, patch_size: Sequence[int], num_classes: int, *,
                           step_size: float = 0.5, batch_size: int = 2, use_gaussian: bool = True,
                           mirror_axes: Sequence[int] = (), mirror_channel_swaps: Mapping[int, Sequence[int]] | None = None,
                           progress: Callable[[int, int], None] | None = None, pad_value: float = 0.0,
                           mode: str = SPINE_JAX_MODE) -> np.ndarray:
  """Stitched (X, Y, Z, num_classes) float32 predictions of `predict_fn` over `image` (X, Y, Z, C).

  `predict_fn(batch (B, px, py, pz, C)) -> (B, px, py, pz, num_classes)` (numpy or jax) is called
  with B = batch_size always. With `mirror_axes` (spatial axes of the patch), each batch is also
  predicted flipped along every non-empty subset of them, flipped back, and averaged with the
  plain prediction (nnU-Net's mirroring). `mirror_channel_swaps[a]` is a permutation of the output
  channels applied after flipping axis a back: a flip along the left-right axis turns left structures
  into right ones, so a network trained with that mirroring (and the swap) predicts them swapped.
  `progress(done, total)` counts patches. `mode` 'spineps' weighs and sums as SPINEPS (module docstring).
  """
  image = np.asarray(image, np.float32)
  patch_size = tuple(int(p) for p in patch_size)
  if image.ndim != 4 or len(patch_size) != 3:
    raise ValueError(f'expected an (X, Y, Z, C) image and a 3D patch, got shapes {image.shape} and {patch_size}')
  if batch_size < 1:
    raise ValueError(f'batch_size must be at least 1, got {batch_size}')
  padded, crop = pad_to_patch(image, patch_size, pad_value)
  starts = list(itertools.product(*sliding_window_steps(padded.shape[:3], patch_size, step_size)))
  if mode not in WINDOW_MODES:
    raise ValueError(f'sliding-window mode must be one of {WINDOW_MODES}, got {mode!r}')
  half = mode == SPINEPS_MODE
  if not use_gaussian:
    weight = np.ones(patch_size, np.float16 if half else np.float32)
  else:
    weight = spineps_importance_map(patch_size) if half else gaussian_importance_map(patch_size)
  flips = mirror_combinations(mirror_axes)
  swaps = _channel_swaps(mirror_channel_swaps, num_classes)
  accumulator = np.float16 if half else np.float32
  summed = np.zeros(padded.shape[:3] + (num_classes,), accumulator)
  weights = np.zeros(padded.shape[:3], accumulator)
  weight32 = weight.astype(np.float32)[..., None]
  product = np.empty(patch_size + (num_classes,), np.float32)  # one window's weighted prediction, reused

  def windows(batch_starts):
    return tuple(tuple(slice(s, s + p) for s, p in zip(start, patch_size)) for start in batch_starts)

  def dispatch(batch_starts):
    batch = np.zeros((batch_size,) + patch_size + (padded.shape[-1],), np.float32)
    for i, window in enumerate(windows(batch_starts)):
      batch[i] = padded[window]
    # Spatial axis a of the patch is axis a + 1 of the batch.
    return [(combo, predict_fn(np.ascontiguousarray(np.flip(batch, [a + 1 for a in combo])) if combo else batch))
            for combo in flips]

  def accumulate(batch_starts, pending):
    prediction = None
    for combo, out in pending:
      out = _check_prediction(np.asarray(out, np.float32), (batch_size,) + patch_size, num_classes)
      out = np.flip(out, [a + 1 for a in combo]) if combo else out
      for a in combo:
        if a in swaps:
          out = out[..., swaps[a]]
      prediction = out if prediction is None else prediction + out
    if len(flips) > 1:
      prediction = prediction / np.float32(len(flips))
    for i, window in enumerate(windows(batch_starts)):
      np.multiply(prediction[i], weight32, out=product)
      target = summed[window]  # a view: float32 products, rounded into float16 sums in 'spineps'
      np.add(target, product, out=target, casting='unsafe')
      weights[window] += weight

  batches = [starts[i:i + batch_size] for i in range(0, len(starts), batch_size)]
  previous = None
  done = 0
  for batch_starts in batches + [None]:
    current = (batch_starts, dispatch(batch_starts)) if batch_starts is not None else None
    if previous is not None:
      accumulate(*previous)
      done += len(previous[0])
      if progress is not None:
        progress(done, len(starts))
    previous = current
  if half:
    return np.ascontiguousarray((summed / weights[..., None])[crop], np.float32)
  summed = summed[crop]
  np.divide(summed, weights[crop][..., None], out=summed)  # in place: the sums can be hundreds of MB
  return np.ascontiguousarray(summed)

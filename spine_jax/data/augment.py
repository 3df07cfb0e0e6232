"""Augmentation of 2D slices as grain random transforms (the authors' flips, rotation up to ±30°, plus
intensity jitter). Deterministic given the rng grain derives from the element's global index."""
from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi


def augment_slice(image: np.ndarray, rng: np.random.Generator, cfg) -> np.ndarray:
  """image: (H, W) normalised slice. Returns a new float32 array of the same shape."""
  x = image
  if cfg.flip_lr and rng.random() < 0.5:
    x = x[:, ::-1]
  if cfg.flip_ap and rng.random() < 0.5:
    x = x[::-1, :]
  if cfg.max_rotation_deg:
    angle = rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg)
    x = ndi.rotate(x, angle, reshape=False, order=1, mode="constant", cval=float(image.min()))
  x = np.asarray(x, np.float32)
  if cfg.intensity_scale:
    x = x * np.float32(1.0 + rng.uniform(-cfg.intensity_scale, cfg.intensity_scale))
  if cfg.intensity_shift:
    x = x + np.float32(rng.uniform(-cfg.intensity_shift, cfg.intensity_shift))
  if cfg.noise_std:
    x = x + rng.normal(0.0, cfg.noise_std, x.shape).astype(np.float32)
  return np.ascontiguousarray(x, dtype=np.float32)

"""Signed-distance primitives (mm, negative inside) shared by the CT and MRI phantoms."""
from __future__ import annotations

import numpy as np


def ellipse_sdf(u, v, a, b):
  """Approximate signed distance to an ellipse with semi-axes a, b (exact on the axes)."""
  k0 = np.sqrt(np.square(u / a) + np.square(v / b))
  k1 = np.sqrt(np.square(u / (a * a)) + np.square(v / (b * b)))
  return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


def capsule_sdf(u, v, w, p0, p1, radius, w_scale=1.0):
  """Signed distance to a segment p0-p1 thickened by `radius`, w stretched by w_scale (flat or tall sections)."""
  d = np.array(p1, np.float32) - np.array(p0, np.float32)
  d[2] *= w_scale
  q = (u - p0[0], v - p0[1], (w - p0[2]) * w_scale)
  h = np.clip((q[0] * d[0] + q[1] * d[1] + q[2] * d[2]) / max(float(d @ d), 1e-6), 0.0, 1.0)
  return np.sqrt(np.square(q[0] - h * d[0]) + np.square(q[1] - h * d[1]) + np.square(q[2] - h * d[2])) - radius

"""The MRI phantoms' voxel field and the vertebra's parts as signed distances (mm, negative inside)
in the vertebra's own frame (u: right, v: anterior, w: superior). Part of `mri.py`'s phantoms.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from spine_jax.data.phantoms import shapes
from spine_jax.data.phantoms.mri_anatomy import Frame
from spine_jax.data.spine_labels import (ARCUS, COSTAL_LEFT, COSTAL_RIGHT, INFERIOR_ARTICULAR_LEFT,
                                         INFERIOR_ARTICULAR_RIGHT, SPINOUS, SUPERIOR_ARTICULAR_LEFT,
                                         SUPERIOR_ARTICULAR_RIGHT)


# The voxel field


class Field:
  """The PIR voxel grid (world mm: p posterior, i inferior, r right) and the painted arrays."""

  def __init__(self, origin, spacing, shape):
    self.origin = np.asarray(origin, np.float64)
    self.spacing = np.asarray(spacing, np.float64)
    self.shape = tuple(int(n) for n in shape)
    self.axes = [(o + s * np.arange(n)).astype(np.float32) for o, s, n in zip(self.origin, self.spacing, self.shape)]
    self.sem = np.zeros(self.shape, np.uint8)
    self.inst = np.zeros(self.shape, np.int16)
    self.signal = np.zeros(self.shape, np.float32)

  def affine(self) -> np.ndarray:
    """PIR voxel -> RAS mm: axis 0 runs to -A, axis 1 to -S, axis 2 to +R."""
    sp, o = self.spacing, self.origin
    return np.array([[0, 0, sp[2], o[2]], [-sp[0], 0, 0, -o[0]], [0, -sp[1], 0, -o[1]], [0, 0, 0, 1]], np.float64)

  def block_of(self, world: np.ndarray, pad: float = 1.5):
    """Voxel slices covering world points (n, 3) plus `pad` mm; None when they miss the grid."""
    out = []
    for a in range(3):
      lo = int(np.floor((world[:, a].min() - pad - self.origin[a]) / self.spacing[a]))
      hi = int(np.ceil((world[:, a].max() + pad - self.origin[a]) / self.spacing[a])) + 1
      lo, hi = max(lo, 0), min(hi, self.shape[a])
      if lo >= hi:
        return None
      out.append(slice(lo, hi))
    return tuple(out)

  def local(self, frame: Frame, blk):
    """(u (1, 1, R'), v (P', I', 1), w (P', I', 1)) float32 local coordinates of a block's voxels."""
    dp = (self.axes[0][blk[0]] - np.float32(frame.origin[0]))[:, None]
    di = (self.axes[1][blk[1]] - np.float32(frame.origin[1]))[None, :]
    ev, ew = frame.ev.astype(np.float32), frame.ew.astype(np.float32)
    v = (dp * ev[0] + di * ev[1])[:, :, None]
    w = (dp * ew[0] + di * ew[1])[:, :, None]
    u = (self.axes[2][blk[2]] - np.float32(frame.origin[2]))[None, None, :]
    return u, v, w


# ---------------------------------------------------------------------------------------------
# Shapes (signed distances, mm, negative inside)


@dataclasses.dataclass
class Part:
  """A labelled shape in a piece's frame: sdf(u, v, w) within the local box [lo, hi]."""
  label: int
  lo: tuple
  hi: tuple
  sdf: object


def capsule_part(label, p0, p1, radius, half_height=None) -> Part:
  """A capsule part; `half_height` flattens (or heightens) its section along w."""
  hh = radius if half_height is None else half_height
  lo = np.minimum(p0, p1) - (radius, radius, hh)
  hi = np.maximum(p0, p1) + (radius, radius, hh)
  return Part(label, tuple(lo), tuple(hi),
               lambda u, v, w: shapes.capsule_sdf(u, v, w, p0, p1, radius, radius / hh))


def pedicle_z(h: float) -> tuple[float, float]:
  """(centre, height) along w of the pedicles: the upper part of the body."""
  height = 0.42 * h
  return h / 2 - 0.08 * h - height / 2, height


def _lamina_geometry(h: float) -> tuple[float, float]:
  """(centre, half height) along w of the laminae: from below the pedicles' top to below the body."""
  top, bottom = 0.3 * h, -0.6 * h
  return (top + bottom) / 2, (top - bottom) / 2


def posterior_parts(d: dict) -> list[Part]:
  """The arch and processes of a vertebra, in paint order (later parts win where they touch).

  Canal-centred coordinate vv = v + vc (the canal's centre is vc behind the body's centre).
  Left parts (43, 45, 47) lie at u < 0: the patient's left, the low end of the R axis.
  """
  h, cd, cw, pw, lam, vc = d['height'], d['canal_depth'], d['canal_width'], d['pedicle'], d['lamina'], d['vc']
  ped_z, ped_h = pedicle_z(h)
  lam_c, lam_h = _lamina_geometry(h)
  px = cw / 2 + pw / 2 - 1.5
  parts = []
  for sign in (-1.0, 1.0):
    parts.append(capsule_part(ARCUS, (sign * px, cd / 2 + 3.0 - vc, ped_z), (sign * px, -0.15 * cd - vc, ped_z),
                               pw / 2, ped_h / 2))

  def lamina(u, v, w):
    vv = v + np.float32(vc)
    ring = np.maximum(shapes.ellipse_sdf(u, vv, cw / 2 + lam, cd / 2 + lam), -shapes.ellipse_sdf(u, vv, cw / 2, cd / 2))
    ring = np.maximum(ring, vv + np.float32(0.1 * cd))
    centre = np.float32(lam_c) + np.float32(0.35) * (vv + np.float32(cd / 2))  # shingled: lower further back
    return np.maximum(ring, np.abs(w - centre) - np.float32(lam_h))
  parts.append(Part(ARCUS, (-cw / 2 - lam, -cd / 2 - lam - vc, lam_c - 0.35 * lam - lam_h),
                     (cw / 2 + lam, -0.1 * cd - vc, lam_c + 0.2 * cd + lam_h), lamina))
  # Spinous process: a tall thin plate pointing back (and down in the thorax).
  sl, sa = d['spinous_length'], np.deg2rad(d['spinous_angle'])
  s0 = np.array((0.0, -cd / 2 - 0.5 * lam - vc, lam_c - 0.2 * lam))
  s1 = s0 + (0.0, -sl * np.cos(sa), -sl * np.sin(sa))
  tall = {'cervical': 0.25, 'thoracic': 0.25, 'lumbar': 0.32}.get(d['region'], 0.3) * h
  parts.append(capsule_part(SPINOUS, s0, s1, 2.5 if d['region'] == 'cervical' else 3.0, tall))
  # Transverse (costal) processes: lateral from the pedicle, forward in the neck, backward in the thorax.
  tl, ta = d['transverse_length'], np.deg2rad(d['transverse_angle'])
  t_vv = 0.25 * cd if d['region'] == 'cervical' else -0.15 * cd
  for sign, label in ((-1.0, COSTAL_LEFT), (1.0, COSTAL_RIGHT)):
    t0 = np.array((sign * (cw / 2 + pw / 2), t_vv - vc, ped_z - 0.05 * h))
    t1 = t0 + (sign * (pw / 2 + tl) * np.cos(ta), -(pw / 2 + tl) * np.sin(ta), 0.0)
    parts.append(capsule_part(label, t0, t1, 3.5, 0.16 * h))
  # Articular processes: superior rising to the level of the vertebra above's lower endplate,
  # inferior reaching down behind the superior process of the vertebra below.
  fr = d['facet']
  for sign, sup, inf in ((-1.0, SUPERIOR_ARTICULAR_LEFT, INFERIOR_ARTICULAR_LEFT),
                         (1.0, SUPERIOR_ARTICULAR_RIGHT, INFERIOR_ARTICULAR_RIGHT)):
    a0 = (sign * px, -0.3 * cd - vc, ped_z)
    a1 = (sign * px, -0.3 * cd - vc - 1.0, h / 2 + d['disc_above'] - fr)
    parts.append(capsule_part(sup, a0, a1, fr))
    b_vv = -0.3 * cd - 2.0 * fr - 0.8 - vc
    b0 = (sign * (px - 1.0), b_vv, lam_c)
    b1 = (sign * (px - 1.0), b_vv, -h / 2 - d['disc'] - 0.2 * h + fr)
    parts.append(capsule_part(inf, b0, b1, fr))
  return parts


def end_surface(d: dict, u, v, concave: bool):
  """|w| of the body's top/bottom surface: concave endplates dip toward the centre."""
  if not concave:
    return np.float32(d['height'] / 2)
  q2 = np.minimum(np.square(u / np.float32(d['width'] / 2)) + np.square(v / np.float32(d['depth'] / 2)), 1.0)
  return np.float32(d['height'] / 2) - np.float32(d['concavity']) * (1.0 - q2)


def body_section(d: dict, u, v, w, grow: float = 1.0):
  """Body cross-section: elliptic, waisted at mid-height, its back wall carved by the canal."""
  h = d['height']
  waist = np.float32(grow) * (1.0 - np.float32(d['waist']) * (1.0 - np.square(np.clip(w * np.float32(2 / h), -1, 1))))
  sec = shapes.ellipse_sdf(u, v, np.float32(d['width'] / 2) * waist, np.float32(d['depth'] / 2) * waist)
  return np.maximum(sec, -shapes.ellipse_sdf(u, v + np.float32(d['vc']), d['canal_width'] / 2, d['canal_depth'] / 2))


# ---------------------------------------------------------------------------------------------

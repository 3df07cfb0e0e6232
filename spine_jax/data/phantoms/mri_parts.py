"""The MRI phantoms' voxel field and the bones' parts (vertebra, atlas, sacral segment) as signed
distances (mm, negative inside) in the piece's own frame (u: right, v: anterior, w: superior), with
the rows of the field a piece can reach. Part of `mri.py`'s phantoms.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from spine_jax.data.phantoms import shapes
from spine_jax.data.phantoms.mri_anatomy import C1_HEIGHT_MM, Frame, Piece
from spine_jax.data.spine_labels import (ARCUS, CORPUS, COSTAL_LEFT, COSTAL_RIGHT, INFERIOR_ARTICULAR_LEFT,
                                         INFERIOR_ARTICULAR_RIGHT, SACRUM, SPINOUS, SUPERIOR_ARTICULAR_LEFT,
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
  parts += _costal_parts(d, ped_z)
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


def _costal_parts(d: dict, ped_z: float) -> list[Part]:
  """Transverse (costal) processes: lateral from the pedicle, forward in the neck, backward in the thorax.

  A transitional last lumbar vertebra has broad ones; a sacralised L5's ('alar') also run down beside
  the rudimentary disc to the sacral ala below.
  """
  h, cd, cw, pw, vc = d['height'], d['canal_depth'], d['canal_width'], d['pedicle'], d['vc']
  tl, ta = d['transverse_length'], np.deg2rad(d['transverse_angle'])
  t_vv = 0.25 * cd if d['region'] == 'cervical' else -0.15 * cd
  form = d.get('costal', 'typical')
  parts = []
  for sign, label in ((-1.0, COSTAL_LEFT), (1.0, COSTAL_RIGHT)):
    t0 = np.array((sign * (cw / 2 + pw / 2), t_vv - vc, ped_z - 0.05 * h))
    t1 = t0 + (sign * (pw / 2 + tl) * np.cos(ta), -(pw / 2 + tl) * np.sin(ta), 0.0)
    if form == 'typical':
      parts.append(capsule_part(label, t0, t1, 3.5, 0.16 * h))
      continue
    parts.append(capsule_part(label, t0, t1, 5.0, 0.25 * h))
    if form == 'alar':  # down past the rudimentary disc, where the ala rises to meet it
      t2 = t1 + (sign * 3.0, 0.0, -(t1[2] + h / 2 + d['disc'] + 4.0))
      parts.append(capsule_part(label, t1, t2, 5.5, 7.0))
  return parts


def dens_part(d: dict) -> Part:
  """C2's dens: a peg rising from the front of its body through the atlas' ring."""
  b, h = d['depth'] / 2, d['height']
  return capsule_part(CORPUS, (0.0, -b + 5.5, h / 2 - 3.0), (0.0, -b + 5.0, h / 2 + 12.0), 5.0)


def atlas_parts(d: dict) -> list[Part]:
  """C1: anterior arch, lateral masses (with their transverse processes) and posterior arch; no body."""
  cd, cw, vc, b2 = d['canal_depth'], d['canal_width'], d['vc'], d['depth'] / 2
  half = C1_HEIGHT_MM / 2
  parts = [capsule_part(ARCUS, (-7.0, -b2 + 14.0, 0.0), (7.0, -b2 + 14.0, 0.0), 3.5, half),
           capsule_part(COSTAL_LEFT, (-cw / 2 - 6.0, -b2 + 2.0, 0.0), (-cw / 2 - 22.0, -b2, 0.0), 3.5, 4.0),
           capsule_part(COSTAL_RIGHT, (cw / 2 + 6.0, -b2 + 2.0, 0.0), (cw / 2 + 22.0, -b2, 0.0), 3.5, 4.0)]
  for sign in (-1.0, 1.0):
    parts.append(capsule_part(ARCUS, (sign * (cw / 2 + 1.0), -b2 + 10.0, 0.0), (sign * (cw / 2 + 2.0), -vc, 0.0),
                               6.0, 1.1 * half))
  lam = 5.0

  def posterior_arch(u, v, w):
    vv = v + np.float32(vc)
    ring = np.maximum(shapes.ellipse_sdf(u, vv, cw / 2 + lam, cd / 2 + lam), -shapes.ellipse_sdf(u, vv, cw / 2, cd / 2))
    return np.maximum(np.maximum(ring, vv), np.abs(w) - np.float32(0.7 * half))
  parts.append(Part(ARCUS, (-cw / 2 - lam, -cd / 2 - lam - vc, -half), (cw / 2 + lam, -vc, half), posterior_arch))
  return parts


def sacral_body(d: dict):
  """(sdf, gap below, gap above) of a sacral segment's body: it reaches into the fused gaps to its neighbours."""
  h, a, b, cd, cw, vc = d['height'], d['width'] / 2, d['depth'] / 2, d['canal_depth'], d['canal_width'], d['vc']
  gap = d['disc'] / 2 if d['segment'] < d['segments'] else 0.0
  top_gap = d['disc_above'] / 2 if d['segment'] > 1 else 0.0

  def body(u, v, w):
    sec = np.maximum(shapes.ellipse_sdf(u, v, a, b), -shapes.ellipse_sdf(u, v + np.float32(vc), cw / 2, cd / 2))
    return np.maximum(sec, np.maximum(w - np.float32(h / 2 + top_gap), -w - np.float32(h / 2 + gap)))
  return body, gap, top_gap


def sacral_parts(d: dict) -> list[Part]:
  """One fused sacral segment (all SACRUM): body, dorsal wall, median crest; the top one with its articular
  processes, and its alae when the config draws them."""
  h, a, b, cd, cw, lam, vc = (d['height'], d['width'] / 2, d['depth'] / 2, d['canal_depth'], d['canal_width'],
                              d['lamina'], d['vc'])
  body, gap, top_gap = sacral_body(d)

  def dorsal(u, v, w):
    vv = v + np.float32(vc)
    ring = np.maximum(shapes.ellipse_sdf(u, vv, cw / 2 + lam, cd / 2 + lam), -shapes.ellipse_sdf(u, vv, cw / 2, cd / 2))
    return np.maximum(np.maximum(ring, vv), np.maximum(w - np.float32(h / 2 + top_gap), -w - np.float32(h / 2 + gap)))
  parts = [Part(SACRUM, (-a, -b, -h / 2 - gap), (a, b, h / 2 + top_gap), body),
           Part(SACRUM, (-cw / 2 - lam, -cd / 2 - lam - vc, -h / 2 - gap), (cw / 2 + lam, -vc, h / 2 + top_gap),
                 dorsal),
           capsule_part(SACRUM, (0.0, -cd / 2 - lam - vc, 0.3 * h), (0.0, -cd / 2 - lam - vc - 4.0, -0.3 * h), 2.5)]
  if d['segment'] == 1:
    px = cw / 2 + 2.0
    for sign in (-1.0, 1.0):
      parts.append(capsule_part(SACRUM, (sign * px, -0.3 * cd - vc, 0.2 * h),
                                 (sign * px, -0.3 * cd - vc - 1.0, h / 2 + d['disc_above'] - d['facet']), d['facet']))
      if d.get('alae'):  # the wings beside the body, their top level with its upper endplate
        parts.append(capsule_part(SACRUM, (sign * (a - 6.0), -0.3 * b, 0.1 * h),
                                   (sign * (a + 30.0), -0.9 * b, 0.05 * h), 9.0, 0.4 * h))
  return parts


def piece_rows(piece: Piece, body_only: bool = False) -> tuple[float, float]:
  """(min, max) world i (mm, i runs inferior) that a labelled voxel of a piece (or of its body) can have:
  its parts' boxes in its frame, so a field whose rows stay outside holds none of the piece."""
  d = piece.dims
  if piece.kind == 'atlas':
    parts = atlas_parts(d)
  elif piece.kind == 'sacral':
    parts = sacral_parts(d)[:1] if body_only else sacral_parts(d)
  else:
    a, b = d['width'] / 2 * 1.05, d['depth'] / 2 * 1.05
    parts = [Part(CORPUS, (-a, -b, -d['height'] / 2), (a, b, d['height'] / 2), None)]
    if not body_only:
      parts += posterior_parts(d) + ([dens_part(d)] if piece.name == 'C2' else [])
  i = np.concatenate([piece.frame.corners(part.lo, part.hi)[:, 1] for part in parts])
  return float(i.min()), float(i.max())


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

"""The MRI phantoms' painting: bone (cortex and marrow), discs, ribs, the atlas and sacrum, soft
tissue, vessels, canal, cord and cauda equina into the voxel field's labels and T2w values. Part of
`mri.py`'s phantoms.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from spine_jax.data.phantoms import shapes
from spine_jax.data.phantoms.mri_anatomy import Curve, Piece
from spine_jax.data.spine_labels import CANAL, CORD, CORPUS, DISC, DISC_OFFSET, ENDPLATE, ENDPLATE_OFFSET
from spine_jax.data.phantoms.mri_parts import (Field, Part, atlas_parts, body_section, capsule_part, dens_part,
                                               end_surface, pedicle_z, posterior_parts, sacral_body, sacral_parts)


# Painting


@dataclasses.dataclass
class _Tissue:
  """T2w relative intensities of one volume (SPEC section 7)."""
  csf: float
  nucleus: float
  annulus: float
  marrow: float
  cord: float
  cortex: float
  fat: float
  muscle: float
  air: float
  root: float
  vessel: float
  remnant: float
  viscera: tuple


def draw_tissue(rng) -> _Tissue:
  return _Tissue(csf=rng.uniform(0.8, 1.0), nucleus=rng.uniform(0.8, 1.0), annulus=rng.uniform(0.05, 0.15),
                 marrow=rng.uniform(0.4, 0.6), cord=rng.uniform(0.4, 0.5), cortex=rng.uniform(0.05, 0.15),
                 fat=rng.uniform(0.7, 0.9), muscle=rng.uniform(0.2, 0.3), air=rng.uniform(0.0, 0.03),
                 root=rng.uniform(0.3, 0.45), vessel=rng.uniform(0.03, 0.12) if rng.random() < 0.8 else
                 rng.uniform(0.6, 0.9), remnant=rng.uniform(0.15, 0.8),
                 viscera=(rng.uniform(0.1, 0.3), rng.uniform(0.4, 0.7)))


def _paint_part(field: Field, piece: Piece, part: Part, cortex: float, marrow: float, cortex_value: float):
  """Label the part's voxels with its semantic and the piece's instance id; bone signal: cortex rim, marrow core."""
  blk = field.block_of(piece.frame.corners(part.lo, part.hi))
  if blk is None:
    return
  sdf = part.sdf(*field.local(piece.frame, blk))
  inside = sdf <= 0
  if not inside.any():
    return
  field.sem[blk][inside] = part.label
  field.inst[blk][inside] = piece.ident
  field.signal[blk][inside] = np.where(sdf[inside] > -cortex, np.float32(cortex_value), np.float32(marrow))


def _paint_body(field: Field, piece: Piece, tis: _Tissue, marrow: float, rng) -> None:
  """Vertebral body (49) with ~1 mm endplates (62, instance 200 + X) at its top and bottom; C2 gets the dens."""
  d, ident = piece.dims, piece.ident
  h, a, b = d['height'], d['width'] / 2, d['depth'] / 2
  top_plate = piece.name != 'C2'  # no disc above C2: the dens rises from its top
  blk = field.block_of(piece.frame.corners((-a * 1.05, -b * 1.05, -h / 2), (a * 1.05, b * 1.05, h / 2)))
  if blk is None:
    return
  u, v, w = field.local(piece.frame, blk)
  sec = body_section(d, u, v, w)
  top = end_surface(d, u, v, top_plate)
  bottom = end_surface(d, u, v, True)
  sdf = np.maximum(sec, np.maximum(w - top, -w - bottom))
  inside = sdf <= 0
  ep = np.float32(d['endplate'])
  plate = inside & ((w < ep - bottom) | ((w > top - ep) if top_plate else False))
  sem, inst, sig = field.sem[blk], field.inst[blk], field.signal[blk]
  sem[inside] = CORPUS
  inst[inside] = ident
  value = np.where(sec > -np.float32(d['cortex']), np.float32(tis.cortex), np.float32(marrow))
  sig[inside] = _body_marks(rng, d, u, v, w, value, tis)[inside]
  sem[plate] = ENDPLATE
  inst[plate] = ENDPLATE_OFFSET + ident
  sig[plate] = np.float32(tis.cortex)
  if piece.name == 'C2':
    _paint_part(field, piece, dens_part(d), d['cortex'], marrow, tis.cortex)


def _body_marks(rng, d, u, v, w, value, tis):
  """Benign look-alikes in the marrow: the basivertebral vein (bright line), now and then a haemangioma."""
  value = np.broadcast_to(value, np.broadcast_shapes(u.shape, v.shape, w.shape)).copy()
  b = d['depth'] / 2
  if rng.random() < 0.5:
    vein = shapes.capsule_sdf(u, v, w, (0.0, -b + 1.5, 0.0), (0.0, -b + 0.35 * d['depth'], 0.0), 1.0, 1.5)
    value[vein <= 0] = np.float32(min(tis.marrow + 0.3, 0.95))
  if rng.random() < 0.1:
    r = rng.uniform(3.0, 6.0)
    c = (rng.uniform(-0.4, 0.4) * d['width'] / 2, rng.uniform(-0.4, 0.4) * b, rng.uniform(-0.2, 0.2) * d['height'])
    spot = shapes.capsule_sdf(u, v, w, c, c, r)
    value[spot <= 0] = np.float32(rng.uniform(0.7, 0.9))
  return value


def paint_disc(field: Field, upper: Piece, lower: Piece, tis: _Tissue, rng) -> None:
  """Disc (100, instance 100 + upper's id) filling the wedge between two endplates; bright nucleus, dark annulus."""
  du, dl = upper.dims, lower.dims
  a = max(du['width'], dl['width']) / 2 * 1.04
  b = max(du['depth'], dl['depth']) / 2 * 1.04
  corners = np.concatenate([upper.frame.corners((-a, -b, -du['height'] / 2 - 1.0), (a, b, -du['height'] / 2 + 2.0)),
                            lower.frame.corners((-a, -b, dl['height'] / 2 - 2.0), (a, b, dl['height'] / 2 + 1.0))])
  blk = field.block_of(corners)
  if blk is None:
    return
  uu, vu, wu = field.local(upper.frame, blk)
  ul, vl, wl = field.local(lower.frame, blk)
  below_upper = -wu - end_surface(du, uu, vu, True)  # > 0 under the upper body
  above_lower = wl - end_surface(dl, ul, vl, lower.kind != 'sacral')  # > 0 over the lower body
  um, vm = (uu + ul) * np.float32(0.5), (vu + vl) * np.float32(0.5)
  half_w = np.float32((du['width'] + dl['width']) / 4 * 1.03)
  half_d = np.float32((du['depth'] + dl['depth']) / 4 * 1.03)
  vc = np.float32((du['vc'] + dl['vc']) / 2)
  sec = np.maximum(shapes.ellipse_sdf(um, vm, half_w, half_d), -shapes.ellipse_sdf(um, vm + vc, (du['canal_width'] + dl['canal_width']) / 4,
                                                               (du['canal_depth'] + dl['canal_depth']) / 4))
  sdf = np.maximum(sec, -np.minimum(below_upper, above_lower))
  inside = sdf <= 0
  if not inside.any():
    return
  # Nucleus: a bright core fading into the dark annulus toward the rim and the endplates.
  rho = np.sqrt(np.square(um / half_w) + np.square((vm + np.float32(0.1) * half_d) / half_d))
  rim = np.float32(rng.uniform(0.2, 0.3))  # the annulus: the outer fifth to third of the radius
  radial = np.clip((1.0 - rho) / rim, 0.0, 1.0)
  frac = below_upper / np.maximum(below_upper + above_lower, np.float32(1e-3))
  vertical = np.clip(np.minimum(frac, 1.0 - frac) / np.float32(0.12), 0.0, 1.0)
  odds = {'cervical': 0.15, 'thoracic': 0.1}.get(du['region'], 0.25)  # lower lumbar discs wear most
  degeneration = rng.uniform(0.1, 0.4) if rng.random() < odds else 0.0
  if du.get('disc_below') == 'rudimentary':  # a transitional vertebra's disc to the sacrum: thin and dark
    degeneration = max(degeneration, 0.6)
  nucleus = tis.nucleus * (1.0 - degeneration)
  value = np.float32(tis.annulus) + np.float32(nucleus - tis.annulus) * radial * vertical
  if rng.random() < 0.4:  # intranuclear cleft: a dark horizontal line in adult discs
    value = np.where((np.abs(frac - 0.5) < 0.05) & (rho < 0.8), value * np.float32(0.6), value)
  field.sem[blk][inside] = DISC
  field.inst[blk][inside] = DISC_OFFSET + upper.ident
  field.signal[blk][inside] = value[inside]


def paint_vertebra(field: Field, piece: Piece, tis: _Tissue, rng) -> None:
  """Posterior elements (41-48), then the body and endplates, of one vertebra C2 .. L6."""
  d = piece.dims
  marrow = float(np.clip(tis.marrow * rng.uniform(0.9, 1.1), 0.35, 0.65))
  for part in posterior_parts(d):
    _paint_part(field, piece, part, d['cortex'], marrow * 0.92, tis.cortex)
  _paint_body(field, piece, tis, marrow, rng)


def paint_ribs(field: Field, piece: Piece, tis: _Tissue) -> list:
  """Rib heads, necks and shafts beside a thoracic vertebra: bone signal, but background label (SPINEPS has no ribs).

  dims['rib'] is the rib's length relative to a typical one: short ribs (T13, often T12) are also thinner,
  and a length of 0 leaves the head and neck only. Returns (block, mask) of the voxels painted.
  """
  d = piece.dims
  h, cd, cw, pw, vc = d['height'], d['canal_depth'], d['canal_width'], d['pedicle'], d['vc']
  ta = np.deg2rad(d['transverse_angle'])
  length = d.get('rib', 1.0)
  radius, half = (4.0, 5.0) if length == 1.0 else (4.0 * (0.6 + 0.4 * length), 5.0 * (0.6 + 0.4 * length))
  painted = []
  for sign in (-1.0, 1.0):
    p0 = np.array((sign * (d['width'] / 2 - 2.0), -d['depth'] / 2 + 3.0, h / 2))
    reach = pw / 2 + d['transverse_length']
    p1 = np.array((sign * (cw / 2 + pw / 2 + reach * np.cos(ta)), -0.15 * cd - vc - reach * np.sin(ta) + 4.0,
                   pedicle_z(h)[0]))
    segments = [(p0, p1)] + ([(p1, p1 + np.multiply((sign * 25.0, 6.0, -8.0), length))] if length > 0 else [])
    for a, b in segments:
      part = capsule_part(0, a, b, radius, half)
      blk = field.block_of(piece.frame.corners(part.lo, part.hi))
      if blk is None:
        continue
      sdf = part.sdf(*field.local(piece.frame, blk))
      free = (sdf <= 0) & (field.sem[blk] == 0)
      field.signal[blk][free] = np.where(sdf[free] > -1.0, np.float32(tis.cortex), np.float32(tis.marrow * 0.9))
      painted.append((blk, free))
  return painted


def paint_atlas(field: Field, piece: Piece, tis: _Tissue) -> None:
  """C1: anterior arch, lateral masses and posterior arch around the dens and the canal; all arcus (41)."""
  for part in atlas_parts(piece.dims):
    _paint_part(field, piece, part, piece.dims['cortex'], tis.marrow * 0.92, tis.cortex)


def paint_sacral(field: Field, piece: Piece, tis: _Tissue, marrow: float) -> None:
  """One fused sacral segment (26, instance 26) and the line of the fused disc's remnant below it."""
  d = piece.dims
  for part in sacral_parts(d):
    _paint_part(field, piece, part, d['cortex'], marrow, tis.cortex)
  if d['segment'] < d['segments']:  # the remnant of the fused disc below: a line of its own signal
    h, a, b = d['height'], d['width'] / 2, d['depth'] / 2
    body, gap, _ = sacral_body(d)
    blk = field.block_of(piece.frame.corners((-a, -b, -h / 2 - gap), (a, b, -h / 2 + 1.0)))
    if blk is not None:
      u, v, w = field.local(piece.frame, blk)
      line = (body(u, v, w) < -1.5) & (w < np.float32(-h / 2 + 0.5))
      field.signal[blk][line] = np.float32(tis.remnant)


# ---------------------------------------------------------------------------------------------
# Row-by-row structures: canal, cord, cauda equina, soft tissues


@dataclasses.dataclass
class _Rows:
  """Quantities along the field's inferior axis, from the curve at each row's arc length."""
  s: np.ndarray  # (I,) arc length of the canal's centre at the row
  p: np.ndarray  # canal centre, p mm
  r: np.ndarray  # midline, r mm
  cos: np.ndarray  # cos(phi): posterior distance from the canal = (p - canal p) * cos
  values: dict  # name -> (I,) per-row dims interpolated between the pieces


def _piece_profile(pieces, key, s_query):
  return np.interp(s_query, [p.s for p in pieces], [p.dims[key] for p in pieces])


def _canal_line(curve: Curve, pieces) -> tuple[np.ndarray, np.ndarray]:
  """(p, i) of the canal's centre along the curve: vc behind the body-centre line."""
  vc = _piece_profile(pieces, 'vc', curve.s)
  return curve.p + vc * np.cos(curve.phi), curve.i - vc * np.sin(curve.phi)


def row_profiles(curve: Curve, pieces, i_axis: np.ndarray, keys) -> _Rows:
  cp, ci = _canal_line(curve, pieces)
  ci = np.maximum.accumulate(ci)
  s = np.interp(i_axis, ci + np.arange(ci.size) * 1e-9, curve.s)
  return _Rows(s=s, p=np.interp(s, curve.s, cp), r=np.interp(s, curve.s, curve.r),
               cos=np.cos(np.interp(s, curve.s, curve.phi)),
               values={k: _piece_profile(pieces, k, s) for k in keys})


def _smooth_1d(rng, x: np.ndarray, wavelength_mm: float) -> np.ndarray:
  """A smooth random function of x in about [-1, 1]: three sinusoids at and above `wavelength_mm`."""
  out = np.zeros_like(x, np.float64)
  for k in range(3):
    out += rng.uniform(-1, 1) / (k + 1) * np.sin(2 * np.pi * x / (wavelength_mm / (k + 1)) + rng.uniform(0, 6.3))
  return out / 1.5


def skin_line(rng, rows: _Rows) -> tuple[np.ndarray, np.ndarray]:
  """(posterior distance of the skin from the canal's centre, subcutaneous fat thickness) per row, mm."""
  v = rows.values
  tip = v['canal_depth'] / 2 + v['lamina'] + v['spinous_length'] * np.cos(np.deg2rad(v['spinous_angle']))
  cover = v['cover'] * (1.0 + 0.3 * _smooth_1d(rng, rows.s, 400.0))
  fat = rng.uniform(4.0, 20.0) * (1.0 + 0.3 * _smooth_1d(rng, rows.s, 300.0))
  step = max(float(np.median(np.abs(np.diff(rows.s)))) if rows.s.size > 1 else 1.0, 1e-3)
  skin = ndimage.gaussian_filter1d(tip + cover + fat, 25.0 / step, mode='nearest')  # the back is smooth
  return skin, fat


def paint_soft_tissue(field: Field, rows: _Rows, tis: _Tissue, skin, fat, anterior, rng) -> None:
  """Background signal in the sagittal plane: viscera in front, muscle around the spine, fat band, air behind."""
  d = (field.axes[0][:, None] - rows.p[None, :].astype(np.float32)) * rows.cos[None, :].astype(np.float32)
  coarse = rng.standard_normal((max(field.shape[0] // 24, 2), max(field.shape[1] // 24, 2)))
  texture = ndimage.zoom(coarse, (field.shape[0] / coarse.shape[0], field.shape[1] / coarse.shape[1]), order=1)
  texture = texture[:field.shape[0], :field.shape[1]].astype(np.float32)
  lo, hi = tis.viscera
  viscera = np.float32(lo) + np.float32(hi - lo) * np.clip(0.5 + 0.35 * texture, 0.0, 1.0)
  muscle = np.float32(tis.muscle) * (1.0 + np.float32(0.1) * texture)
  sheet = np.where(d < -anterior[None, :] - 6.0, viscera, muscle)
  sheet = np.where(d > (skin - fat)[None, :], np.float32(tis.fat), sheet)
  sheet = np.where(d > skin[None, :], np.float32(tis.air), sheet)
  field.signal[...] = sheet[:, :, None]


def _tube(field: Field, rows: _Rows, d_mm, u_mm, radius, s_range):
  """Boolean mask of a round tube parallel to the canal (posterior offset d_mm, lateral u_mm), tapering at its ends."""
  ends = np.minimum(rows.s - s_range[0], s_range[1] - rows.s)
  r = (radius * np.sqrt(np.clip(ends / 25.0, 0.0, 1.0))).astype(np.float32)
  d = (field.axes[0][:, None] - rows.p[None, :].astype(np.float32)) * rows.cos[None, :].astype(np.float32)
  u = field.axes[2][None, :] - rows.r[:, None].astype(np.float32)
  dist = np.square(d - np.float32(d_mm))[:, :, None] + np.square(u - np.float32(u_mm))[None, :, :]
  return dist <= np.square(r)[None, :, None]


def paint_vessels(field: Field, rows: _Rows, pieces, tis: _Tissue, anterior, rng) -> None:
  """Flow voids in front of the spine: the airway in the neck, the aorta from T4 to L4 (left of the midline)."""
  s_of = {p.name: p.s for p in pieces}
  neck = (s_of['C2'], s_of['T3'])
  if np.any((rows.s > neck[0]) & (rows.s < neck[1])):
    gap, radius = rng.uniform(12.0, 20.0), rng.uniform(6.0, 9.0)
    d = -np.mean(anterior) - gap - radius
    field.signal[_tube(field, rows, d, rng.uniform(-2, 2), radius, neck)] = np.float32(tis.air)
  trunk = (s_of['T3'], s_of['L4'])
  if np.any((rows.s > trunk[0]) & (rows.s < trunk[1])):
    radius = rng.uniform(9.0, 12.0)
    d = -np.mean(anterior) - 2.0 - radius
    field.signal[_tube(field, rows, d, -rng.uniform(5.0, 15.0), radius, trunk)] = np.float32(tis.vessel)


def paint_canal(field: Field, rows: _Rows, pieces, tis: _Tissue, rng) -> dict:
  """Canal (61) with CSF, the cord (60) down to its conus at L1-L2, cauda equina roots below.

  Returns the arc lengths of the conus tip and of the canal's end (mid S2).
  """
  by = {p.name: p for p in pieces}
  l1 = by['L1']
  s_conus = rng.uniform(l1.s, l1.s + l1.dims['height'] / 2 + l1.dims['disc'] + 2.0)
  s_end = by['S2'].s
  v = rows.values
  cd, cw = v['canal_depth'], v['canal_width']
  reach = float(np.max(cd) / 2 + 2.0)
  p_lo = np.min(rows.p - reach / np.maximum(rows.cos, 0.3))
  p_hi = np.max(rows.p + reach / np.maximum(rows.cos, 0.3))
  a0 = int(np.clip(np.floor((p_lo - field.origin[0]) / field.spacing[0]), 0, field.shape[0]))
  a1 = int(np.clip(np.ceil((p_hi - field.origin[0]) / field.spacing[0]) + 1, 0, field.shape[0]))
  if a0 >= a1:
    return dict(conus=s_conus, canal_end=s_end)
  band = slice(a0, a1)
  d = ((field.axes[0][band][:, None] - rows.p[None, :].astype(np.float32)) * rows.cos[None, :].astype(np.float32))
  u = field.axes[2][None, :] - rows.r[:, None].astype(np.float32)
  d3, u3 = d[:, :, None], u[None, :, :]
  canal = shapes.ellipse_sdf(u3, d3, (cw / 2).astype(np.float32)[None, :, None], (cd / 2).astype(np.float32)[None, :, None]) <= 0
  open_rows = (rows.s <= s_end)[None, :, None]
  sem, sig = field.sem[band], field.signal[band]
  sig[canal & ~open_rows] = np.float32(tis.fat)  # the sacral canal below the dural sac: epidural fat
  canal &= open_rows
  sem[canal] = CANAL
  sig[canal] = np.float32(tis.csf)
  # Cord: tapering into the conus over its last 12 mm; slightly off-centre in the canal.
  taper = np.sqrt(np.clip((s_conus - rows.s) / 12.0, 0.0, 1.0)).astype(np.float32)
  shift = np.float32(rng.uniform(-1.0, 1.0))
  half_d = np.maximum(v['cord_depth'] / 2 * taper, 1e-3).astype(np.float32)[None, :, None]
  half_w = np.maximum(v['cord_width'] / 2 * taper, 1e-3).astype(np.float32)[None, :, None]
  cord = (shapes.ellipse_sdf(u3, d3 - shift, half_w, half_d) <= 0) & (taper > 0.05)[None, :, None] & canal
  sem[cord] = CORD
  sig[cord] = np.float32(tis.cord)
  # Cauda equina: thin roots hanging from the conus in the posterior canal.
  below = (rows.s > s_conus - 5.0)[None, :, None]
  for _ in range(int(rng.integers(4, 9))):
    rd, ru, rr = rng.uniform(-0.1, 0.3), rng.uniform(-0.3, 0.3), rng.uniform(0.5, 0.9)
    root = (np.square(d3 - (rd * cd).astype(np.float32)[None, :, None]) +
            np.square(u3 - (ru * cw).astype(np.float32)[None, :, None]) <= np.float32(rr * rr))
    sig[root & below & canal] = np.float32(tis.root)
  return dict(conus=s_conus, canal_end=s_end)


# ---------------------------------------------------------------------------------------------

"""Procedural sagittal T2-weighted spines with SPINEPS labels: the default MRI training and test data.

No patient scans can be shipped, so each volume is drawn from a seed: a spine of C1 to the sacrum
(T13 or L6 now and then) whose sizes follow SPEC section 7 by level, laid along a sagittal curve
with cervical lordosis, thoracic kyphosis, lumbar lordosis and sacral kyphosis; a field of view
over a random run of vertebrae cuts it, with parts of the neighbours at the edges as real scans do.
Each vertebra is rigid in its own frame (u: to the patient's right, v: anterior, w: superior, mm,
origin at the body's centre): body with concave endplates, pedicles and laminae, spinous,
transverse and articular processes; discs fill the wedge between neighbouring endplates; the
canal, cord (ending at L1-L2), cauda equina and the soft tissues follow the curve row by row.
T2w intensities (CSF and nucleus bright, marrow intermediate, cortex dark, fat bright, muscle
dark-intermediate), partial-volume blur, thick acquisition slices resampled to the grid, a smooth
bias field, Rician noise and a random scanner scale make the image.

Arrays are PIR (axis 0 posterior, 1 inferior, 2 to the patient's right; axis 2 is the sagittal
slice axis), so the patient's LEFT is the LOW end of axis 2: labels 43/45/47 (left) lie at smaller
axis-2 indices than 44/46/48 (right), and flipping axis 2 must swap these pairs. Each part is
evaluated only in the voxel block its bounding box covers, which keeps a default volume well
under a second.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import pathlib

import ml_collections
import numpy as np
from scipy import ndimage

from spine_jax.data import levels as levels_lib
from spine_jax.data import nifti
from spine_jax.data.phantoms import shapes

PIR = ('P', 'I', 'R')
REFERENCE_SPACING_MM = (0.75, 0.75, 1.65)

# SPINEPS semantic ids (SPEC section 3).
SACRUM = 26
ARCUS, SPINOUS = 41, 42
TRANSVERSE_LEFT, TRANSVERSE_RIGHT = 43, 44
SUPERIOR_LEFT, SUPERIOR_RIGHT = 45, 46
INFERIOR_LEFT, INFERIOR_RIGHT = 47, 48
BODY, CORD, CANAL, ENDPLATE, DISC = 49, 60, 61, 62, 100
SEMANTIC_IDS = (SACRUM, 41, 42, 43, 44, 45, 46, 47, 48, BODY, CORD, CANAL, ENDPLATE, DISC)
LEFT_RIGHT_PAIRS = ((TRANSVERSE_LEFT, TRANSVERSE_RIGHT), (SUPERIOR_LEFT, SUPERIOR_RIGHT),
                    (INFERIOR_LEFT, INFERIOR_RIGHT))
DISC_OFFSET, ENDPLATE_OFFSET = 100, 200  # instance ids: disc below vertebra X, endplate of vertebra X
BONE_IDS = (SACRUM, 41, 42, 43, 44, 45, 46, 47, 48, BODY, ENDPLATE)

# Per region: (value at the region's first level, value at its last), mm or degrees. C2 is the
# first cervical level (C1 is drawn apart), T13 and L6 take their region's last values.
_DIMS = {
    'cervical': dict(height=(14.0, 15.0), depth=(15.0, 16.0), width=(17.0, 25.0), disc=(5.0, 6.0),
                     canal_depth=(16.5, 14.5), canal_width=(24.0, 22.0), pedicle=(5.0, 6.0), lamina=(4.0, 5.0),
                     spinous_length=(14.0, 30.0), spinous_angle=(15.0, 20.0), transverse_length=(8.0, 12.0),
                     transverse_angle=(-25.0, -15.0), facet=(4.0, 4.5), cord_depth=(8.0, 7.5),
                     cord_width=(11.0, 12.0), cover=(30.0, 15.0)),
    'thoracic': dict(height=(17.0, 23.0), depth=(25.0, 30.0), width=(28.0, 40.0), disc=(4.0, 8.0),
                     canal_depth=(15.0, 14.5), canal_width=(17.0, 19.0), pedicle=(6.0, 8.0), lamina=(5.0, 6.0),
                     spinous_length=(30.0, 27.0), spinous_angle=(45.0, 25.0), transverse_length=(20.0, 14.0),
                     transverse_angle=(25.0, 20.0), facet=(4.0, 5.0), cord_depth=(7.0, 6.5),
                     cord_width=(9.5, 8.5), cover=(10.0, 12.0)),
    'lumbar': dict(height=(25.0, 28.0), depth=(33.0, 35.0), width=(40.0, 50.0), disc=(9.0, 12.0),
                   canal_depth=(16.0, 17.5), canal_width=(21.0, 25.0), pedicle=(9.0, 13.0), lamina=(6.0, 7.0),
                   spinous_length=(28.0, 22.0), spinous_angle=(5.0, 0.0), transverse_length=(16.0, 18.0),
                   transverse_angle=(5.0, 5.0), facet=(5.0, 6.0), cord_depth=(6.5, 6.0), cord_width=(8.5, 8.0),
                   cover=(14.0, 18.0)),
}
# SPEC section 7 ranges that every drawn vertebra keeps to (and that the tests check).
SPEC_RANGES = {
    'cervical': dict(height=(14.0, 15.0), depth=(15.0, 16.0), width=(17.0, 25.0), disc=(5.0, 6.0),
                     canal_depth=(14.0, 17.0)),
    'thoracic': dict(height=(17.0, 23.0), depth=(25.0, 30.0), width=(28.0, 40.0), disc=(4.0, 8.0),
                     canal_depth=(14.0, 16.0)),
    'lumbar': dict(height=(25.0, 28.0), depth=(33.0, 35.0), width=(40.0, 50.0), disc=(9.0, 12.0),
                   canal_depth=(15.0, 18.0)),
}
_SACRAL_SCALE = ((1.0, 1.0, 1.0), (0.85, 0.8, 0.85), (0.7, 0.62, 0.7), (0.55, 0.5, 0.55), (0.45, 0.4, 0.45))
_FUSED_GAP_MM = 2.5  # remnant disc between fused sacral segments
_C1_HEIGHT_MM, _C1_GAP_MM = 10.0, 3.0  # atlas ring height, its gap above C2's body (the dens fills it)
_STEP_MM = 0.5  # arc-length sampling of the spine curve
_FAR = np.float32(1.0e3)


def default_mri_phantom_config() -> ml_collections.ConfigDict:
  """Phantom MRI data set settings; the default fits CPU training (about 128 x 300 x 32 voxels, 6-9 vertebrae)."""
  cfg = ml_collections.ConfigDict()
  cfg.num_train_volumes = 64
  cfg.num_test_volumes = 8
  cfg.train_seed = 0
  cfg.test_seed = 1  # held-out split: its own seed, so no volume is shared with training
  cfg.spacing_mm = REFERENCE_SPACING_MM  # (P, I, R)
  # Voxels along (P, I, R); 0 fits that axis to the drawn anatomy and margins, rounded up to
  # `shape_multiple`. A fixed size crops or pads the field around the anatomy's centre.
  cfg.shape = (0, 0, 32)
  cfg.shape_multiple = 16
  # Complete vertebrae in the field (the sacrum counts as one), clamped at S1; the field's edges
  # cut into the vertebrae above and below, as real partial-spine scans do.
  cfg.num_vertebrae_range = (6, 9)
  # Top level of the field, drawn uniformly from this list: cervical and thoracic fields, and lumbar
  # studies (from T12 or L1 down to the sacrum, the commonest spine MRI) listed three times each, so
  # about a third of the fields reach the sacrum.
  cfg.top_level_choices = (tuple(f'C{i}' for i in range(2, 8)) + tuple(f'T{i}' for i in range(1, 13))
                           + ('L1',) + ('T12', 'L1') * 2)
  cfg.t13_probability = 0.03  # a 13th thoracic vertebra (SPINEPS id 28)
  cfg.l6_probability = 0.03  # a 6th lumbar vertebra (SPINEPS id 25)
  cfg.size_scale_range = (0.94, 1.06)  # whole-patient size; SPEC ranges are kept by clipping
  cfg.cervical_lordosis_deg = (20.0, 40.0)
  cfg.thoracic_kyphosis_deg = (20.0, 50.0)
  cfg.lumbar_lordosis_deg = (40.0, 60.0)
  cfg.sacral_kyphosis_deg = (25.0, 50.0)
  cfg.tilt_deg = 10.0  # the field's spine leans up to this much (patient positioning)
  cfg.lateral_shift_mm = 4.0  # midline off the field's centre along R
  cfg.scoliosis_mm = 3.0  # amplitude of a gentle lateral wave of the spine
  cfg.noise_std_range = (0.01, 0.05)  # Rician noise, relative to CSF at about 1
  cfg.bias_strength = 0.3  # log-amplitude of the smooth multiplicative bias field
  cfg.thick_slice_probability = 0.8  # acquired as thick slices, then resampled to spacing_mm
  cfg.slice_thickness_mm_range = (3.0, 4.0)
  cfg.blur_voxels_range = (0.3, 0.7)  # in-plane partial-volume blur (Gaussian sigma, voxels)
  cfg.intensity_scale_range = (300.0, 2000.0)  # scanner units of a signal of 1
  return cfg


def smoke_config() -> ml_collections.ConfigDict:
  """Two training volumes and one test volume of 3-4 vertebrae in 96 x 160 x 32 voxels: for tests
  and launch checks (the configs' `smoke` variants)."""
  cfg = default_mri_phantom_config()
  cfg.num_train_volumes = 2
  cfg.num_test_volumes = 1
  cfg.num_vertebrae_range = (3, 4)
  cfg.shape = (96, 160, 32)
  return cfg


def whole_spine_config() -> ml_collections.ConfigDict:
  """C1/C2 to the sacrum in one field (several stitched stations); large: about 160 x 960 x 32 voxels."""
  cfg = default_mri_phantom_config()
  cfg.top_level_choices = ('C2',)
  cfg.num_vertebrae_range = (30, 30)  # clamped at S1: always the whole spine
  cfg.tilt_deg = 4.0
  return cfg


# ---------------------------------------------------------------------------------------------
# Levels and sizes


def spine_levels(rng: np.random.Generator, t13_probability: float = 0.0, l6_probability: float = 0.0):
  """C1 .. S1 of one patient: 12 thoracic and 5 lumbar vertebrae, now and then T13 or L6."""
  thoracic = 13 if rng.random() < t13_probability else 12
  lumbar = 6 if rng.random() < l6_probability else 5
  return ([f'C{i}' for i in range(1, 8)] + [f'T{i}' for i in range(1, thoracic + 1)]
          + [f'L{i}' for i in range(1, lumbar + 1)] + ['S1'])


def vertebra_id(level: str) -> int:
  """SPINEPS instance id of a level (C1 = 1 ... L6 = 25, S1 = 26, T13 = 28)."""
  return levels_lib.level_to_label(level, 'spineps')


def _region_position(level: str) -> tuple[str, float]:
  """(region, 0..1 from the region's first to its last level) for the size table."""
  region, number = levels_lib.level_region(level), int(level[1:])
  first, count = {'cervical': (2, 6), 'thoracic': (1, 12), 'lumbar': (1, 5)}[region]
  return region, float(np.clip((number - first) / (count - 1), 0.0, 1.0))


def level_dims(level: str, scale: float, rng: np.random.Generator) -> dict:
  """Dimensions (mm, degrees) of one vertebra of a cervical, thoracic or lumbar level, SPEC ranges kept."""
  region, t = _region_position(level)
  dims = {}
  for key, (first, last) in _DIMS[region].items():
    value = first + (last - first) * t
    if not key.endswith('angle'):
      value *= (scale if key != 'cover' else 1.0) * rng.uniform(0.97, 1.03)
    dims[key] = float(value)
  for key, (lo, hi) in SPEC_RANGES[region].items():
    dims[key] = float(np.clip(dims[key], lo, hi))
  if level in ('C2', 'C3'):
    dims['spinous_length'] = max(dims['spinous_length'], 20.0)  # C2's big bifid spinous process
  dims['region'] = region
  return dims


def _c1_dims(c2: dict) -> dict:
  """The atlas: a ring around the dens and a wide canal, no body."""
  return dict(c2, height=_C1_HEIGHT_MM, disc=_C1_GAP_MM, canal_depth=c2['canal_depth'] + 1.0,
              canal_width=c2['canal_width'] + 2.0, region='cervical')


def _sacral_dims(l5: dict, rng: np.random.Generator) -> list[dict]:
  """S1-S5 segments: shrinking bodies with a dorsal wall around a narrowing canal."""
  h1 = rng.uniform(26.0, 30.0)
  out = []
  for k, (fh, fd, fw) in enumerate(_SACRAL_SCALE):
    out.append(dict(l5, height=h1 * fh, depth=l5['depth'] * fd * rng.uniform(0.98, 1.05), width=l5['width'] * fw,
                    disc=_FUSED_GAP_MM, canal_depth=max(13.0 - 2.5 * k, 4.0), canal_width=max(24.0 - 3.5 * k, 8.0),
                    lamina=max(6.0 - k, 3.0), region='sacral', segment=k + 1))
  return out


# ---------------------------------------------------------------------------------------------
# The spine's curve and the vertebrae's frames


class _Frame:
  """A rigid local frame in the sagittal plane: origin (p, i, r) mm, tangent leaning `angle` rad posteriorly."""

  def __init__(self, origin, angle: float):
    self.origin = np.asarray(origin, np.float64)
    self.angle = float(angle)
    c, s = np.cos(angle), np.sin(angle)
    self.ev = np.array([-c, s])  # anterior, in (p, i)
    self.ew = np.array([-s, -c])  # superior, in (p, i)

  def to_world(self, u, v, w) -> np.ndarray:
    """(n, 3) world points (p, i, r) of local points."""
    u, v, w = (np.asarray(x, np.float64) for x in (u, v, w))
    p = self.origin[0] + v * self.ev[0] + w * self.ew[0]
    i = self.origin[1] + v * self.ev[1] + w * self.ew[1]
    return np.stack([p, i, self.origin[2] + u], axis=-1)

  def corners(self, lo, hi) -> np.ndarray:
    grid = np.array(np.meshgrid(*zip(lo, hi), indexing='ij')).reshape(3, -1)
    return self.to_world(*grid)


@dataclasses.dataclass
class _Piece:
  """One drawn bone of the column: a vertebra (C1 .. L6), or a sacral segment."""
  name: str  # level ('C1'.. 'S1'), or 'S2'..'S5' for the lower sacral segments
  ident: int  # SPINEPS instance id (26 for every sacral segment)
  kind: str  # 'atlas', 'vertebra' or 'sacral'
  dims: dict
  s: float  # arc length of the body's centre
  frame: _Frame | None = None


def _pieces(rng: np.random.Generator, cfg) -> list[_Piece]:
  """The whole column for one patient with arc positions (body centres; discs between)."""
  names = spine_levels(rng, cfg.t13_probability, cfg.l6_probability)
  scale = rng.uniform(*cfg.size_scale_range)
  dims = {n: level_dims(n, scale, rng) for n in names if n not in ('C1', 'S1')}
  pieces = [_Piece('C1', vertebra_id('C1'), 'atlas', _c1_dims(dims['C2']), 0.0)]
  pieces += [_Piece(n, vertebra_id(n), 'vertebra', dims[n], 0.0) for n in names[1:-1]]
  last_lumbar = dims[names[-2]]
  for k, d in enumerate(_sacral_dims(last_lumbar, rng)):
    pieces.append(_Piece(f'S{k + 1}', vertebra_id('S1'), 'sacral', d, 0.0))
  for prev, cur in zip(pieces[:-1], pieces[1:]):
    cur.s = prev.s + prev.dims['height'] / 2 + prev.dims['disc'] + cur.dims['height'] / 2
  for k, p in enumerate(pieces):  # neighbours' disc heights, for the articular processes
    p.dims['disc_above'] = pieces[k - 1].dims['disc'] if k else _C1_GAP_MM
    p.dims['vc'] = p.dims['depth'] / 2 + p.dims['canal_depth'] / 2 - 2.5  # canal centre behind the body's
  return pieces


def _curvature(pieces: list[_Piece], s: np.ndarray, angles_deg: dict) -> np.ndarray:
  """Curvature (rad/mm, positive = lordosis) along arc length s: each region's angle spread over its length."""
  by_name = {p.name: p for p in pieces}
  last_t = 'T13' if 'T13' in by_name else 'T12'

  def below(name):
    p = by_name[name]
    return p.s + p.dims['height'] / 2 + p.dims['disc'] / 2

  s_c2, s_ct, s_tl = by_name['C2'].s, below('C7'), below(last_t)
  s_sac = by_name['S1'].s - by_name['S1'].dims['height'] / 2
  s_end = by_name['S5'].s + by_name['S5'].dims['height'] / 2
  k = np.full(s.shape, np.deg2rad(angles_deg['cervical']) / (s_ct - s_c2))
  k[s >= s_ct] = -np.deg2rad(angles_deg['thoracic']) / (s_tl - s_ct)
  lumbar = (s >= s_tl) & (s < s_sac)  # most of the lordosis is at L4-S1: weight rising 0.4 -> 1.6
  k[lumbar] = np.deg2rad(angles_deg['lumbar']) / (s_sac - s_tl) * (0.4 + 1.2 * (s[lumbar] - s_tl) / (s_sac - s_tl))
  k[s >= s_sac] = -np.deg2rad(angles_deg['sacral']) / (s_end - s_sac)
  k[s >= s_end] = 0.0
  return k


@dataclasses.dataclass
class _Curve:
  """The body-centre line: arc length s, tangent angle phi (rad, + leaning posteriorly), points (p, i, r) mm."""
  s: np.ndarray
  phi: np.ndarray
  p: np.ndarray
  i: np.ndarray
  r: np.ndarray

  def at(self, values, s_query):
    return np.interp(s_query, self.s, values)


def _field_window(rng, pieces, cfg) -> tuple[float, float, list[int]]:
  """Arc-length window (top, bottom) of the field and the indices of its complete vertebrae."""
  column = [k for k, p in enumerate(pieces) if p.kind != 'sacral' or p.name == 'S1'][1:]  # C2 .. S1
  names = [pieces[k].name for k in column]
  top = levels_lib.normalise_level(str(rng.choice(list(cfg.top_level_choices))))
  if top not in names:
    raise ValueError(f'top level {top} is not drawn in this spine; choose from C2 .. S1 (T13 and L6 are rare)')
  first = names.index(top)
  n = int(rng.integers(cfg.num_vertebrae_range[0], cfg.num_vertebrae_range[1] + 1))
  full = column[first:first + max(n, 1)]
  a, b = pieces[full[0]], pieces[full[-1]]
  above = pieces[full[0] - 1]
  if above.kind == 'atlas':  # over C2: the dens, the atlas and a little of the skull base
    m_top = rng.uniform(18.0, 35.0)
  else:
    m_top = rng.uniform(0.25, 0.9) * (above.dims['disc'] + above.dims['height'])
  if b.kind == 'sacral':
    rest = sum(p.dims['height'] + p.dims['disc'] for p in pieces if p.kind == 'sacral') - b.dims['height']
    m_bot = rng.uniform(0.3, 1.0) * rest
  else:
    below = pieces[full[-1] + 1]
    m_bot = rng.uniform(0.25, 0.9) * (b.dims['disc'] + below.dims['height'])
  return a.s - a.dims['height'] / 2 - m_top, b.s + b.dims['height'] / 2 + m_bot, full


def _curve(rng, pieces, cfg, window) -> _Curve:
  """Integrate the curvature; the mean tangent over the window's mobile spine (above S1) leans by a random tilt."""
  s = np.arange(pieces[0].s - 80.0, pieces[-1].s + 120.0, _STEP_MM)
  angles = dict(cervical=rng.uniform(*cfg.cervical_lordosis_deg), thoracic=rng.uniform(*cfg.thoracic_kyphosis_deg),
                lumbar=rng.uniform(*cfg.lumbar_lordosis_deg), sacral=rng.uniform(*cfg.sacral_kyphosis_deg))
  phi = np.cumsum(_curvature(pieces, s, angles)) * _STEP_MM
  s1 = next(p for p in pieces if p.name == 'S1')
  inside = (s >= window[0]) & (s <= min(window[1], s1.s - s1.dims['height'] / 2))
  if not inside.any():  # a field of the sacrum alone
    inside = (s >= window[0]) & (s <= window[1])
  phi += np.deg2rad(rng.uniform(-1, 1) * cfg.tilt_deg) - phi[inside].mean()
  p = np.cumsum(np.sin(phi)) * _STEP_MM
  i = np.cumsum(np.cos(phi)) * _STEP_MM
  wave = rng.uniform(-1, 1) * cfg.scoliosis_mm * np.sin(2 * np.pi * s / rng.uniform(300, 600) + rng.uniform(0, 6.3))
  r = rng.uniform(-1, 1) * cfg.lateral_shift_mm + wave
  return _Curve(s, phi, p, i, r)


# ---------------------------------------------------------------------------------------------
# The voxel field


class _Field:
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

  def local(self, frame: _Frame, blk):
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
class _Part:
  """A labelled shape in a piece's frame: sdf(u, v, w) within the local box [lo, hi]."""
  label: int
  lo: tuple
  hi: tuple
  sdf: object


def _capsule_part(label, p0, p1, radius, half_height=None) -> _Part:
  """A capsule part; `half_height` flattens (or heightens) its section along w."""
  hh = radius if half_height is None else half_height
  lo = np.minimum(p0, p1) - (radius, radius, hh)
  hi = np.maximum(p0, p1) + (radius, radius, hh)
  return _Part(label, tuple(lo), tuple(hi),
               lambda u, v, w: shapes.capsule_sdf(u, v, w, p0, p1, radius, radius / hh))


def _pedicle_z(h: float) -> tuple[float, float]:
  """(centre, height) along w of the pedicles: the upper part of the body."""
  height = 0.42 * h
  return h / 2 - 0.08 * h - height / 2, height


def _lamina_geometry(h: float) -> tuple[float, float]:
  """(centre, half height) along w of the laminae: from below the pedicles' top to below the body."""
  top, bottom = 0.3 * h, -0.6 * h
  return (top + bottom) / 2, (top - bottom) / 2


def _posterior_parts(d: dict) -> list[_Part]:
  """The arch and processes of a vertebra, in paint order (later parts win where they touch).

  Canal-centred coordinate vv = v + vc (the canal's centre is vc behind the body's centre).
  Left parts (43, 45, 47) lie at u < 0: the patient's left, the low end of the R axis.
  """
  h, cd, cw, pw, lam, vc = d['height'], d['canal_depth'], d['canal_width'], d['pedicle'], d['lamina'], d['vc']
  ped_z, ped_h = _pedicle_z(h)
  lam_c, lam_h = _lamina_geometry(h)
  px = cw / 2 + pw / 2 - 1.5
  parts = []
  for sign in (-1.0, 1.0):
    parts.append(_capsule_part(ARCUS, (sign * px, cd / 2 + 3.0 - vc, ped_z), (sign * px, -0.15 * cd - vc, ped_z),
                               pw / 2, ped_h / 2))

  def lamina(u, v, w):
    vv = v + np.float32(vc)
    ring = np.maximum(shapes.ellipse_sdf(u, vv, cw / 2 + lam, cd / 2 + lam), -shapes.ellipse_sdf(u, vv, cw / 2, cd / 2))
    ring = np.maximum(ring, vv + np.float32(0.1 * cd))
    centre = np.float32(lam_c) + np.float32(0.35) * (vv + np.float32(cd / 2))  # shingled: lower further back
    return np.maximum(ring, np.abs(w - centre) - np.float32(lam_h))
  parts.append(_Part(ARCUS, (-cw / 2 - lam, -cd / 2 - lam - vc, lam_c - 0.35 * lam - lam_h),
                     (cw / 2 + lam, -0.1 * cd - vc, lam_c + 0.2 * cd + lam_h), lamina))
  # Spinous process: a tall thin plate pointing back (and down in the thorax).
  sl, sa = d['spinous_length'], np.deg2rad(d['spinous_angle'])
  s0 = np.array((0.0, -cd / 2 - 0.5 * lam - vc, lam_c - 0.2 * lam))
  s1 = s0 + (0.0, -sl * np.cos(sa), -sl * np.sin(sa))
  tall = {'cervical': 0.25, 'thoracic': 0.25, 'lumbar': 0.32}.get(d['region'], 0.3) * h
  parts.append(_capsule_part(SPINOUS, s0, s1, 2.5 if d['region'] == 'cervical' else 3.0, tall))
  # Transverse (costal) processes: lateral from the pedicle, forward in the neck, backward in the thorax.
  tl, ta = d['transverse_length'], np.deg2rad(d['transverse_angle'])
  t_vv = 0.25 * cd if d['region'] == 'cervical' else -0.15 * cd
  for sign, label in ((-1.0, TRANSVERSE_LEFT), (1.0, TRANSVERSE_RIGHT)):
    t0 = np.array((sign * (cw / 2 + pw / 2), t_vv - vc, ped_z - 0.05 * h))
    t1 = t0 + (sign * (pw / 2 + tl) * np.cos(ta), -(pw / 2 + tl) * np.sin(ta), 0.0)
    parts.append(_capsule_part(label, t0, t1, 3.5, 0.16 * h))
  # Articular processes: superior rising to the level of the vertebra above's lower endplate,
  # inferior reaching down behind the superior process of the vertebra below.
  fr = d['facet']
  for sign, sup, inf in ((-1.0, SUPERIOR_LEFT, INFERIOR_LEFT), (1.0, SUPERIOR_RIGHT, INFERIOR_RIGHT)):
    a0 = (sign * px, -0.3 * cd - vc, ped_z)
    a1 = (sign * px, -0.3 * cd - vc - 1.0, h / 2 + d['disc_above'] - fr)
    parts.append(_capsule_part(sup, a0, a1, fr))
    b_vv = -0.3 * cd - 2.0 * fr - 0.8 - vc
    b0 = (sign * (px - 1.0), b_vv, lam_c)
    b1 = (sign * (px - 1.0), b_vv, -h / 2 - d['disc'] - 0.2 * h + fr)
    parts.append(_capsule_part(inf, b0, b1, fr))
  return parts


def _end_surface(d: dict, u, v, concave: bool):
  """|w| of the body's top/bottom surface: concave endplates dip toward the centre."""
  if not concave:
    return np.float32(d['height'] / 2)
  q2 = np.minimum(np.square(u / np.float32(d['width'] / 2)) + np.square(v / np.float32(d['depth'] / 2)), 1.0)
  return np.float32(d['height'] / 2) - np.float32(d['concavity']) * (1.0 - q2)


def _body_section(d: dict, u, v, w, grow: float = 1.0):
  """Body cross-section: elliptic, waisted at mid-height, its back wall carved by the canal."""
  h = d['height']
  waist = np.float32(grow) * (1.0 - np.float32(d['waist']) * (1.0 - np.square(np.clip(w * np.float32(2 / h), -1, 1))))
  sec = shapes.ellipse_sdf(u, v, np.float32(d['width'] / 2) * waist, np.float32(d['depth'] / 2) * waist)
  return np.maximum(sec, -shapes.ellipse_sdf(u, v + np.float32(d['vc']), d['canal_width'] / 2, d['canal_depth'] / 2))


# ---------------------------------------------------------------------------------------------
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


def _tissue(rng) -> _Tissue:
  return _Tissue(csf=rng.uniform(0.8, 1.0), nucleus=rng.uniform(0.8, 1.0), annulus=rng.uniform(0.05, 0.15),
                 marrow=rng.uniform(0.4, 0.6), cord=rng.uniform(0.4, 0.5), cortex=rng.uniform(0.05, 0.15),
                 fat=rng.uniform(0.7, 0.9), muscle=rng.uniform(0.2, 0.3), air=rng.uniform(0.0, 0.03),
                 root=rng.uniform(0.3, 0.45), vessel=rng.uniform(0.03, 0.12) if rng.random() < 0.8 else
                 rng.uniform(0.6, 0.9), remnant=rng.uniform(0.15, 0.8),
                 viscera=(rng.uniform(0.1, 0.3), rng.uniform(0.4, 0.7)))


def _paint_part(field: _Field, piece: _Piece, part: _Part, cortex: float, marrow: float, cortex_value: float):
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


def _paint_body(field: _Field, piece: _Piece, tis: _Tissue, marrow: float, rng) -> None:
  """Vertebral body (49) with ~1 mm endplates (62, instance 200 + X) at its top and bottom; C2 gets the dens."""
  d, ident = piece.dims, piece.ident
  h, a, b = d['height'], d['width'] / 2, d['depth'] / 2
  top_plate = piece.name != 'C2'  # no disc above C2: the dens rises from its top
  blk = field.block_of(piece.frame.corners((-a * 1.05, -b * 1.05, -h / 2), (a * 1.05, b * 1.05, h / 2)))
  if blk is None:
    return
  u, v, w = field.local(piece.frame, blk)
  sec = _body_section(d, u, v, w)
  top = _end_surface(d, u, v, top_plate)
  bottom = _end_surface(d, u, v, True)
  sdf = np.maximum(sec, np.maximum(w - top, -w - bottom))
  inside = sdf <= 0
  ep = np.float32(d['endplate'])
  plate = inside & ((w < ep - bottom) | ((w > top - ep) if top_plate else False))
  sem, inst, sig = field.sem[blk], field.inst[blk], field.signal[blk]
  sem[inside] = BODY
  inst[inside] = ident
  value = np.where(sec > -np.float32(d['cortex']), np.float32(tis.cortex), np.float32(marrow))
  sig[inside] = _body_marks(rng, d, u, v, w, value, tis)[inside]
  sem[plate] = ENDPLATE
  inst[plate] = ENDPLATE_OFFSET + ident
  sig[plate] = np.float32(tis.cortex)
  if piece.name == 'C2':
    p0 = (0.0, -b + 5.5, h / 2 - 3.0)
    _paint_part(field, piece, _capsule_part(BODY, p0, (0.0, -b + 5.0, h / 2 + 12.0), 5.0), d['cortex'], marrow,
                tis.cortex)


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


def _paint_disc(field: _Field, upper: _Piece, lower: _Piece, tis: _Tissue, rng) -> None:
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
  below_upper = -wu - _end_surface(du, uu, vu, True)  # > 0 under the upper body
  above_lower = wl - _end_surface(dl, ul, vl, lower.kind != 'sacral')  # > 0 over the lower body
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
  nucleus = tis.nucleus * (1.0 - degeneration)
  value = np.float32(tis.annulus) + np.float32(nucleus - tis.annulus) * radial * vertical
  if rng.random() < 0.4:  # intranuclear cleft: a dark horizontal line in adult discs
    value = np.where((np.abs(frac - 0.5) < 0.05) & (rho < 0.8), value * np.float32(0.6), value)
  field.sem[blk][inside] = DISC
  field.inst[blk][inside] = DISC_OFFSET + upper.ident
  field.signal[blk][inside] = value[inside]


def _paint_vertebra(field: _Field, piece: _Piece, tis: _Tissue, rng) -> None:
  """Posterior elements (41-48), then the body and endplates, of one vertebra C2 .. L6."""
  d = piece.dims
  marrow = float(np.clip(tis.marrow * rng.uniform(0.9, 1.1), 0.35, 0.65))
  for part in _posterior_parts(d):
    _paint_part(field, piece, part, d['cortex'], marrow * 0.92, tis.cortex)
  _paint_body(field, piece, tis, marrow, rng)


def _paint_ribs(field: _Field, piece: _Piece, tis: _Tissue) -> None:
  """Rib heads and necks beside a thoracic vertebra: bone signal, but background label (SPINEPS has no ribs)."""
  d = piece.dims
  h, cd, cw, pw, vc = d['height'], d['canal_depth'], d['canal_width'], d['pedicle'], d['vc']
  ta = np.deg2rad(d['transverse_angle'])
  for sign in (-1.0, 1.0):
    p0 = np.array((sign * (d['width'] / 2 - 2.0), -d['depth'] / 2 + 3.0, h / 2))
    reach = pw / 2 + d['transverse_length']
    p1 = np.array((sign * (cw / 2 + pw / 2 + reach * np.cos(ta)), -0.15 * cd - vc - reach * np.sin(ta) + 4.0,
                   _pedicle_z(h)[0]))
    for a, b in ((p0, p1), (p1, p1 + (sign * 25.0, 6.0, -8.0))):
      part = _capsule_part(0, a, b, 4.0, 5.0)
      blk = field.block_of(piece.frame.corners(part.lo, part.hi))
      if blk is None:
        continue
      sdf = part.sdf(*field.local(piece.frame, blk))
      free = (sdf <= 0) & (field.sem[blk] == 0)
      field.signal[blk][free] = np.where(sdf[free] > -1.0, np.float32(tis.cortex), np.float32(tis.marrow * 0.9))


def _paint_atlas(field: _Field, piece: _Piece, tis: _Tissue) -> None:
  """C1: anterior arch, lateral masses and posterior arch around the dens and the canal; all arcus (41)."""
  d = piece.dims
  cd, cw, vc, b2 = d['canal_depth'], d['canal_width'], d['vc'], d['depth'] / 2
  half = _C1_HEIGHT_MM / 2
  parts = [_capsule_part(ARCUS, (-7.0, -b2 + 14.0, 0.0), (7.0, -b2 + 14.0, 0.0), 3.5, half),
           _capsule_part(TRANSVERSE_LEFT, (-cw / 2 - 6.0, -b2 + 2.0, 0.0), (-cw / 2 - 22.0, -b2, 0.0), 3.5, 4.0),
           _capsule_part(TRANSVERSE_RIGHT, (cw / 2 + 6.0, -b2 + 2.0, 0.0), (cw / 2 + 22.0, -b2, 0.0), 3.5, 4.0)]
  for sign in (-1.0, 1.0):
    parts.append(_capsule_part(ARCUS, (sign * (cw / 2 + 1.0), -b2 + 10.0, 0.0), (sign * (cw / 2 + 2.0), -vc, 0.0),
                               6.0, 1.1 * half))
  lam = 5.0

  def posterior_arch(u, v, w):
    vv = v + np.float32(vc)
    ring = np.maximum(shapes.ellipse_sdf(u, vv, cw / 2 + lam, cd / 2 + lam), -shapes.ellipse_sdf(u, vv, cw / 2, cd / 2))
    return np.maximum(np.maximum(ring, vv), np.abs(w) - np.float32(0.7 * half))
  parts.append(_Part(ARCUS, (-cw / 2 - lam, -cd / 2 - lam - vc, -half), (cw / 2 + lam, -vc, half), posterior_arch))
  for part in parts:
    _paint_part(field, piece, part, d['cortex'], tis.marrow * 0.92, tis.cortex)


def _paint_sacral(field: _Field, piece: _Piece, tis: _Tissue, marrow: float) -> None:
  """One fused sacral segment (26, instance 26): body, dorsal wall, median crest; S1 with its articular processes."""
  d = piece.dims
  h, a, b, cd, cw, lam, vc = (d['height'], d['width'] / 2, d['depth'] / 2, d['canal_depth'], d['canal_width'],
                              d['lamina'], d['vc'])
  gap = d['disc'] / 2 if d['segment'] < 5 else 0.0
  top_gap = d['disc_above'] / 2 if d['segment'] > 1 else 0.0

  def body(u, v, w):
    sec = np.maximum(shapes.ellipse_sdf(u, v, a, b), -shapes.ellipse_sdf(u, v + np.float32(vc), cw / 2, cd / 2))
    return np.maximum(sec, np.maximum(w - np.float32(h / 2 + top_gap), -w - np.float32(h / 2 + gap)))

  def dorsal(u, v, w):
    vv = v + np.float32(vc)
    ring = np.maximum(shapes.ellipse_sdf(u, vv, cw / 2 + lam, cd / 2 + lam), -shapes.ellipse_sdf(u, vv, cw / 2, cd / 2))
    return np.maximum(np.maximum(ring, vv), np.maximum(w - np.float32(h / 2 + top_gap), -w - np.float32(h / 2 + gap)))
  parts = [_Part(SACRUM, (-a, -b, -h / 2 - gap), (a, b, h / 2 + top_gap), body),
           _Part(SACRUM, (-cw / 2 - lam, -cd / 2 - lam - vc, -h / 2 - gap), (cw / 2 + lam, -vc, h / 2 + top_gap),
                 dorsal),
           _capsule_part(SACRUM, (0.0, -cd / 2 - lam - vc, 0.3 * h), (0.0, -cd / 2 - lam - vc - 4.0, -0.3 * h), 2.5)]
  if d['segment'] == 1:
    px = cw / 2 + 2.0
    for sign in (-1.0, 1.0):
      parts.append(_capsule_part(SACRUM, (sign * px, -0.3 * cd - vc, 0.2 * h),
                                 (sign * px, -0.3 * cd - vc - 1.0, h / 2 + d['disc_above'] - d['facet']), d['facet']))
  for part in parts:
    _paint_part(field, piece, part, d['cortex'], marrow, tis.cortex)
  if d['segment'] < 5:  # the remnant of the fused disc below: a line of its own signal
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


def _canal_line(curve: _Curve, pieces) -> tuple[np.ndarray, np.ndarray]:
  """(p, i) of the canal's centre along the curve: vc behind the body-centre line."""
  vc = _piece_profile(pieces, 'vc', curve.s)
  return curve.p + vc * np.cos(curve.phi), curve.i - vc * np.sin(curve.phi)


def _rows(curve: _Curve, pieces, i_axis: np.ndarray, keys) -> _Rows:
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


def _skin_line(rng, rows: _Rows) -> tuple[np.ndarray, np.ndarray]:
  """(posterior distance of the skin from the canal's centre, subcutaneous fat thickness) per row, mm."""
  v = rows.values
  tip = v['canal_depth'] / 2 + v['lamina'] + v['spinous_length'] * np.cos(np.deg2rad(v['spinous_angle']))
  cover = v['cover'] * (1.0 + 0.3 * _smooth_1d(rng, rows.s, 400.0))
  fat = rng.uniform(4.0, 20.0) * (1.0 + 0.3 * _smooth_1d(rng, rows.s, 300.0))
  step = max(float(np.median(np.abs(np.diff(rows.s)))) if rows.s.size > 1 else 1.0, 1e-3)
  skin = ndimage.gaussian_filter1d(tip + cover + fat, 25.0 / step, mode='nearest')  # the back is smooth
  return skin, fat


def _paint_soft_tissue(field: _Field, rows: _Rows, tis: _Tissue, skin, fat, anterior, rng) -> None:
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


def _tube(field: _Field, rows: _Rows, d_mm, u_mm, radius, s_range):
  """Boolean mask of a round tube parallel to the canal (posterior offset d_mm, lateral u_mm), tapering at its ends."""
  ends = np.minimum(rows.s - s_range[0], s_range[1] - rows.s)
  r = (radius * np.sqrt(np.clip(ends / 25.0, 0.0, 1.0))).astype(np.float32)
  d = (field.axes[0][:, None] - rows.p[None, :].astype(np.float32)) * rows.cos[None, :].astype(np.float32)
  u = field.axes[2][None, :] - rows.r[:, None].astype(np.float32)
  dist = np.square(d - np.float32(d_mm))[:, :, None] + np.square(u - np.float32(u_mm))[None, :, :]
  return dist <= np.square(r)[None, :, None]


def _paint_vessels(field: _Field, rows: _Rows, pieces, tis: _Tissue, anterior, rng) -> None:
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


def _paint_canal(field: _Field, rows: _Rows, pieces, tis: _Tissue, rng) -> dict:
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
# Image formation


def _interp_axis2(array: np.ndarray, x: np.ndarray, xq: np.ndarray) -> np.ndarray:
  """Linear interpolation along axis 2 from positions x to xq (clamped at the ends)."""
  k = np.clip(np.searchsorted(x, xq) - 1, 0, x.size - 2)
  f = np.clip((xq - x[k]) / (x[k + 1] - x[k]), 0.0, 1.0).astype(np.float32)
  return array[:, :, k] * (1 - f) + array[:, :, k + 1] * f


def _thick_slices(image: np.ndarray, spacing_r: float, thickness: float, phase: float) -> np.ndarray:
  """A thick-slice acquisition resampled to the grid: slice profile blur, sampling every `thickness` mm, back."""
  if image.shape[2] < 2:
    return image
  sigma = np.sqrt(max(thickness ** 2 - spacing_r ** 2, 0.0)) / 2.355 / spacing_r
  blurred = ndimage.gaussian_filter1d(image, sigma, axis=2, mode='nearest', truncate=2.5)
  x = np.arange(image.shape[2]) * spacing_r
  slices = np.arange(-phase * thickness, x[-1] + thickness, thickness)
  return _interp_axis2(_interp_axis2(blurred, x, slices), slices, x)


def _bias_field(rng, shape, strength: float) -> np.ndarray:
  """Smooth multiplicative field: a coarse in-plane pattern, posterior coil falloff, a lateral term."""
  coarse = rng.standard_normal((3, max(shape[1] // 160, 2) + 1))
  plane = ndimage.zoom(coarse, (shape[0] / coarse.shape[0], shape[1] / coarse.shape[1]), order=1)
  plane = plane[:shape[0], :shape[1]] * 0.5
  plane += rng.uniform(0.0, 1.0) * np.linspace(-1.0, 1.0, shape[0])[:, None]  # brighter near the back coil
  lateral = rng.uniform(-0.5, 0.5) * np.linspace(-1.0, 1.0, shape[2])
  log_field = strength * (plane[:, :, None] + lateral[None, None, :])
  return np.exp(log_field).astype(np.float32)


def _form_image(rng, field: _Field, cfg) -> np.ndarray:
  """Texture, partial-volume blur, thick slices, bias field, Rician noise, scanner scale."""
  amplitude = np.full(256, 0.03, np.float32)
  amplitude[list(BONE_IDS)] = 0.12
  fine = ndimage.gaussian_filter(rng.standard_normal(field.shape, dtype=np.float32), (1.0, 1.0, 0.5), truncate=2.5)
  image = field.signal * (1.0 + 2.5 * amplitude[field.sem] * fine)
  blur = rng.uniform(*cfg.blur_voxels_range)
  image = ndimage.gaussian_filter(image, (blur, blur, 0.0), truncate=2.5)
  if rng.random() < cfg.thick_slice_probability:
    image = _thick_slices(image, field.spacing[2], rng.uniform(*cfg.slice_thickness_mm_range), rng.uniform(0, 1))
  image *= _bias_field(rng, field.shape, cfg.bias_strength)
  sigma = np.float32(rng.uniform(*cfg.noise_std_range))
  real = image + sigma * rng.standard_normal(field.shape, dtype=np.float32)
  imag = sigma * rng.standard_normal(field.shape, dtype=np.float32)
  image = np.sqrt(real * real + imag * imag)
  return (image * np.float32(rng.uniform(*cfg.intensity_scale_range))).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Volumes


def _fit_axis(lo: float, hi: float, spacing: float, fixed: int, multiple: int, rng) -> tuple[float, int]:
  """(origin mm, voxels) of one axis covering [lo, hi]; a fixed size is centred, a fitted one rounded up."""
  need = int(np.ceil((hi - lo) / spacing)) + 1
  n = int(fixed) if fixed else int(np.ceil(need / multiple) * multiple)
  spare = (n - need) * spacing
  start = lo - (rng.uniform(0.0, spare) if spare > 0 else spare / 2)
  return start, n


def make_spine(rng: np.random.Generator, cfg=None) -> dict:
  """One phantom sagittal T2w volume in PIR with SPINEPS semantic and instance masks.

  Returns image (X, Y, Z) float32; semantic (X, Y, Z) uint8 (SEMANTIC_IDS, 0 background);
  instance (X, Y, Z) int16 (vertebra X: its SPINEPS id on body and posterior elements, 26 on
  the sacrum, 100 + X on the disc below it, 200 + X on its endplates; 0 elsewhere, canal and
  cord included); affine (4, 4) PIR -> RAS mm; spacing (P, I, R) mm; levels (vertebrae with
  voxels in the field, top to bottom); full_levels (those wholly inside); centroids {instance
  id: voxel centroid}; body_centroids {vertebra id: centroid of its body and endplates, or of
  the sacrum}; vertebrae (per level: id, dims, angle, centre in mm); cord_end_level.
  """
  cfg = default_mri_phantom_config() if cfg is None else cfg
  spacing = np.asarray(cfg.spacing_mm, np.float64)
  pieces = _pieces(rng, cfg)
  s_top, s_bottom, full = _field_window(rng, pieces, cfg)
  curve = _curve(rng, pieces, cfg, (s_top, s_bottom))
  for p in pieces:
    p.frame = _Frame((curve.at(curve.p, p.s), curve.at(curve.i, p.s), curve.at(curve.r, p.s)),
                     curve.at(curve.phi, p.s))
    p.dims.update(endplate=float(rng.uniform(0.9, 1.3)), cortex=float(rng.uniform(0.8, 1.4)),
                  concavity=float(rng.uniform(0.3, 1.0)), waist=float(rng.uniform(0.02, 0.06)))

  # Field: rows from the window; P from the front of the bodies to the skin; R around the midline.
  i_lo, i_hi = curve.at(curve.i, s_top), curve.at(curve.i, s_bottom)
  i0, n_i = _fit_axis(i_lo, i_hi, spacing[1], cfg.shape[1], cfg.shape_multiple, rng)
  i_axis = i0 + spacing[1] * np.arange(n_i)
  keys = ('vc', 'depth', 'canal_depth', 'canal_width', 'lamina', 'spinous_length', 'spinous_angle', 'cover',
          'cord_depth', 'cord_width')
  rows = _rows(curve, pieces, i_axis, keys)
  skin, fat = _skin_line(rng, rows)
  anterior = rows.values['vc'] + rows.values['depth'] / 2
  p_lo = np.min(rows.p - (anterior + rng.uniform(8.0, 30.0)) / rows.cos)
  p_hi = np.max(rows.p + (skin + rng.uniform(0.0, 6.0)) / rows.cos)
  p0, n_p = _fit_axis(p_lo, p_hi, spacing[0], cfg.shape[0], cfg.shape_multiple, rng)
  n_r = int(cfg.shape[2]) if cfg.shape[2] else int(np.ceil(rng.uniform(50.0, 70.0) / spacing[2]))
  r0 = -spacing[2] * (n_r - 1) / 2
  field = _Field((p0, i0, r0), spacing, (n_p, n_i, n_r))

  tis = _tissue(rng)
  _paint_soft_tissue(field, rows, tis, skin, fat, anterior, rng)
  _paint_vessels(field, rows, pieces, tis, anterior, rng)
  ends = _paint_canal(field, rows, pieces, tis, rng)
  sacral_marrow = float(np.clip(tis.marrow * rng.uniform(1.0, 1.15), 0.35, 0.7))
  for upper, lower in zip(pieces[1:-1], pieces[2:]):
    if upper.kind == 'vertebra':
      _paint_disc(field, upper, lower, tis, rng)
  for piece in pieces:
    if piece.kind == 'vertebra' and piece.name.startswith('T'):
      _paint_ribs(field, piece, tis)
  for piece in pieces:
    if piece.kind == 'atlas':
      _paint_atlas(field, piece, tis)
    elif piece.kind == 'vertebra':
      _paint_vertebra(field, piece, tis, rng)
    else:
      _paint_sacral(field, piece, tis, sacral_marrow)

  image = _form_image(rng, field, cfg)
  return _summary(field, image, pieces, full, ends)


def _centroids(labels: np.ndarray) -> dict[int, tuple]:
  """{label: mean voxel index (axis 0, 1, 2)} of every non-zero label (bincount over the labelled voxels only)."""
  flat = np.flatnonzero(labels)
  values = labels.ravel()[flat].astype(np.int64)
  counts = np.bincount(values)
  coords = np.unravel_index(flat, labels.shape)
  sums = [np.bincount(values, weights=c, minlength=counts.size) for c in coords]
  return {int(k): tuple(float(s[k] / counts[k]) for s in sums) for k in np.flatnonzero(counts)}


def _summary(field: _Field, image, pieces, full, ends: dict) -> dict:
  """The volume's dict: arrays, geometry and per-level facts."""
  inst, sem = field.inst, field.sem
  centroids = _centroids(inst)
  body = np.where(sem == ENDPLATE, inst - ENDPLATE_OFFSET, 0).astype(np.int16)
  bone = (sem == BODY) | (sem == SACRUM)
  body[bone] = inst[bone]
  body_centroids = _centroids(body)
  present = set(k for k in centroids if k < DISC_OFFSET)
  levels, vertebrae = [], []
  for p in pieces:
    if p.kind == 'sacral' and p.name != 'S1':
      continue
    if p.ident in present:
      levels.append(p.name)
    vertebrae.append(dict(level=p.name, id=p.ident, s=p.s, centre_mm=tuple(map(float, p.frame.origin)),
                          angle_deg=float(np.rad2deg(p.frame.angle)),
                          dims={k: v for k, v in p.dims.items() if not isinstance(v, str)}))
  cord_end = next((p.name for p in pieces if p.s + p.dims['height'] / 2 + p.dims['disc'] >= ends['conus']), None)
  return dict(image=image, semantic=sem, instance=inst, affine=field.affine(),
              spacing=tuple(float(s) for s in field.spacing), levels=levels,
              full_levels=[pieces[k].name for k in full if pieces[k].ident in present],
              centroids=centroids, body_centroids=body_centroids, vertebrae=vertebrae,
              cord_end_level=cord_end, conus_s=float(ends['conus']))


def split_size(cfg, split: str) -> int:
  """Number of volumes of a split ('train' or 'test')."""
  return int(_split(cfg, split)[0])


def _split(cfg, split: str) -> tuple[int, int]:
  if split == 'train':
    return int(cfg.num_train_volumes), int(cfg.train_seed)
  if split == 'test':
    return int(cfg.num_test_volumes), int(cfg.test_seed)
  raise ValueError(f"unknown phantom split {split!r}; expected 'train' or 'test'")


def make_volume(cfg, split: str, index: int) -> dict:
  """Volume `index` of a split: depends only on (the split's seed, index), so workers can draw it on demand."""
  n, seed = _split(cfg, split)
  if not 0 <= int(index) < n:
    raise IndexError(f'volume {index} outside the {split} split of {n} volumes')
  return make_spine(np.random.default_rng([seed, int(index)]), cfg)


def build_mri_split(cfg, split: str) -> list[dict]:
  """All volumes of a split, in index order."""
  return [make_volume(cfg, split, i) for i in range(split_size(cfg, split))]


class MriPhantomSource:
  """Random-access source (len, getitem) of a split's volumes for grain; picklable for worker processes."""

  def __init__(self, cfg, split: str):
    self._cfg, self._split = cfg, split
    self._n = split_size(cfg, split)

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index: int) -> dict:
    return make_volume(self._cfg, self._split, index)


MANIFEST_COLUMNS = ('image', 'semantic', 'instance', 'split')


def write_mri_phantom_nifti(out_dir, n: int, seed: int, axcodes=('L', 'P', 'S'), cfg=None, *,
                            split: str = 'train', manifest_name: str = 'manifest.csv', name: str = 'phantom') -> dict:
  """A user-style MRI data set: n phantoms as T2w image, semantic and instance NIfTIs in `axcodes`.

  Files sub-<name>NNN_T2w.nii.gz (int16), ..._seg-spine_msk.nii.gz (uint8) and
  ..._seg-vert_msk.nii.gz (int16), written in a non-PIR orientation (LPS by default) as users'
  files usually are, plus a CSV manifest (image, semantic, instance, split; paths relative to
  out_dir). Volume j is make_spine(default_rng([seed, j]), cfg). Returns the manifest path and
  per volume the paths and the PIR arrays as written (image rounded to int16) with their affine.
  """
  cfg = default_mri_phantom_config() if cfg is None else cfg
  if n <= 0:
    raise ValueError(f'need at least one volume, got {n}')
  out_dir = pathlib.Path(out_dir)
  volumes, rows = [], []
  for j in range(n):
    vol = make_spine(np.random.default_rng([seed, j]), cfg)
    image = np.clip(np.rint(vol['image']), 0, np.iinfo(np.int16).max).astype(np.int16)
    stem = f'sub-{name}{j:03d}'
    paths = dict(image=out_dir / f'{stem}_T2w.nii.gz', semantic=out_dir / f'{stem}_seg-spine_msk.nii.gz',
                 instance=out_dir / f'{stem}_seg-vert_msk.nii.gz')
    for key, array in (('image', image), ('semantic', vol['semantic']), ('instance', vol['instance'])):
      out, affine, _ = nifti.reorient(array, vol['affine'], axcodes)
      nifti.atomic_save_nifti(out, affine, paths[key])
    rows.append(dict(image=paths['image'].name, semantic=paths['semantic'].name, instance=paths['instance'].name,
                     split=split))
    volumes.append(dict(paths, image_pir=image, semantic_pir=vol['semantic'], instance_pir=vol['instance'],
                        affine_pir=vol['affine'], levels=vol['levels']))
  buffer = io.StringIO(newline='')
  writer = csv.DictWriter(buffer, fieldnames=list(MANIFEST_COLUMNS), lineterminator='\n')
  writer.writeheader()
  writer.writerows(rows)
  manifest = out_dir / manifest_name
  nifti.atomic_write_text(manifest, buffer.getvalue())
  return dict(manifest=manifest, volumes=volumes)

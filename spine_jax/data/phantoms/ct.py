"""Procedural CT vertebrae with metastatic lesions: the default training and test data.

No patient data can be shipped, so each vertebra is drawn from a seed: a body (elliptic cylinder,
concave posterior wall, flared endplates) with a cortical shell and textured trabecular bone,
pedicles, laminae, spinous and transverse processes, articular processes, the canal with CSF
(and the cord above L2), discs above and below, parts of the neighbouring vertebrae, muscle and
fat; then partial-volume blur and CT noise. Dimensions follow SPEC section 7 by level, HU values
the typical adult ranges. Lesions follow the clinical definitions: blastic = dense sclerotic foci
inside the body, lytic = soft-tissue-density destruction that may break the cortex, mixed = both
in the same slices, posterolateral involvement = a lesion reaching the pedicle and posterior
elements on one or both sides.

Geometry is built from signed distance functions (mm, negative inside) in a local frame
(u: to the patient's right, v: anterior, w: superior; origin at the canal's centre at mid-body
height) that is slightly rotated against the RAS voxel grid. Each part is evaluated only in the
voxel block its bounding box covers, which keeps a vertebra at a few tens of milliseconds.

Over 400 lines on purpose: it is one drawing. Anatomy, tissues, lesions and the slice labels all
work in the private frame and canvas (`_Canvas`, `_Part`, `_geometry`); callers use `make_vertebra`
and the data-set builders at the end. Split, those internals would become public with no second user.
"""
from __future__ import annotations

import itertools
import pathlib

import ml_collections
import numpy as np
from scipy import ndimage

from spine_jax.data import classes
from spine_jax.data import levels as levels_lib
from spine_jax.data import manifest as manifest_lib
from spine_jax.data import nifti
from spine_jax.data import slices as slices_lib
from spine_jax.data.classes import BLASTIC, LYTIC, MIXED, NORMAL, POSTEROLATERAL_CLASSES, QUALITY_CLASSES
from spine_jax.data.phantoms import shapes

DEFAULT_LEVELS = tuple(f'T{i}' for i in range(1, 13)) + tuple(f'L{i}' for i in range(1, 6))

# Regions in the returned `region` volume (used by tests and for per-slice labels).
REGION_BODY, REGION_POSTERIOR_RIGHT, REGION_POSTERIOR_LEFT, REGION_POSTERIOR_MIDLINE = 1, 2, 3, 4

_RAMP_MM = 1.0  # width of the partial-volume edge of every structure
_FAR = 1.0e3  # "outside everything" signed distance (mm)
_LESION_MIN_AREA_MM2 = 10.0  # lesion area that makes a slice abnormal
_POSTEROLATERAL_MIN_AREA_MM2 = 8.0  # lesion area in the posterior elements of one side
_MIDLINE_MM = 2.0  # |u| below this is neither side (spinous process)
_NOISE_GAIN = 2.4  # white noise loses about this factor of its std in the partial-volume blur
_MAX_ATTEMPTS = 50

# Per region: (value at the region's first level, value at its last), mm or degrees.
_DIMS = {
    'cervical': dict(height=(14, 15), depth=(15, 16), width=(17, 25), disc=(5, 6), canal_depth=(16, 14),
                     canal_width=(24, 22), pedicle_width=(5, 6), lamina=(4, 5), spinous_length=(12, 30),
                     spinous_angle=(15, 20), transverse_length=(8, 12), transverse_angle=(0, 0), facet=(4, 4.5)),
    'thoracic': dict(height=(17, 23), depth=(25, 30), width=(28, 40), disc=(4, 8), canal_depth=(15, 15),
                     canal_width=(17, 19), pedicle_width=(6, 8), lamina=(5, 6), spinous_length=(28, 26),
                     spinous_angle=(20, 12), transverse_length=(20, 14), transverse_angle=(25, 20), facet=(4, 5)),
    'lumbar': dict(height=(25, 28), depth=(33, 35), width=(40, 50), disc=(9, 12), canal_depth=(16, 17),
                   canal_width=(21, 25), pedicle_width=(9, 13), lamina=(6, 7), spinous_length=(28, 22),
                   spinous_angle=(5, 0), transverse_length=(16, 18), transverse_angle=(5, 5), facet=(5, 6)),
}
_REGION_SIZE = {'cervical': 7, 'thoracic': 12, 'lumbar': 5}


def default_phantom_config() -> ml_collections.ConfigDict:
  """Phantom data set settings; `slices` is the slice extraction used for the phantoms (and must be for real data)."""
  cfg = ml_collections.ConfigDict()
  cfg.num_train_vertebrae = 600
  cfg.num_test_vertebrae = 150
  cfg.train_seed = 0
  cfg.test_seed = 1  # held-out split: its own seed, so no vertebra is shared with training
  # Per-VERTEBRA class frequencies (normal, blastic, mixed, lytic), drawn as exact counts. The values
  # are the authors' training-SLICE ratios after capping normals at 18,000: 18000:3078:3387:3565.
  # Abnormal vertebrae also have normal slices, so the slice-level normal share comes out higher.
  cfg.quality_freqs = (0.64, 0.11, 0.12, 0.13)
  cfg.test_quality_freqs = ()  # the held-out split's, when it should differ (empty: quality_freqs)
  cfg.posterolateral_freqs = (0.5, 0.3, 0.2)  # none, unilateral, bilateral, among abnormal vertebrae
  cfg.spacing_mm = (1.0, 1.0, 2.5)
  cfg.levels = DEFAULT_LEVELS
  cfg.elderly_fraction = 0.2  # osteoporotic trabecular bone (90-140 HU instead of 150-350)
  cfg.lookalike_fraction = 0.15  # normal vertebrae with a small benign bone island
  cfg.slices = slices_lib.default_slice_config()
  return cfg


def level_dims(level: str, rng: np.random.Generator) -> dict:
  """Dimensions (mm, degrees) of one vertebra of `level`: SPEC section 7 by level, randomly varied."""
  name = levels_lib.normalise_level(level)
  region = levels_lib.level_region(name)
  if region == 'sacral':  # S1 only ever appears as the neighbour below L5: a large lumbar body.
    region, t = 'lumbar', 1.0
  else:
    t = min((int(name[1:]) - 1) / (_REGION_SIZE[region] - 1), 1.0)  # T13 and L6 as the region's last
  scale = rng.uniform(0.93, 1.07)
  dims = {}
  for key, (first, last) in _DIMS[region].items():
    value = first + (last - first) * t
    dims[key] = value if key.endswith('angle') else value * scale * rng.uniform(0.95, 1.05)
  dims['cord'] = region != 'lumbar' or name == 'L1'  # the cord ends at L1-L2
  return dims


def _rotation(rng: np.random.Generator) -> np.ndarray:
  """Small random rotation: axial twist up to 6 degrees, sagittal tilt 8, coronal tilt 4."""
  a, b, c = np.deg2rad(rng.uniform(-1, 1, 3) * (8.0, 4.0, 6.0))
  rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
  ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
  rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
  return rz @ rx @ ry


class _Canvas:
  """The voxel grid and the vertebra's local frame: blocks of local coordinates on demand."""

  def __init__(self, shape, spacing, origin, rotation):
    self.shape, self.spacing = tuple(shape), np.asarray(spacing, np.float64)
    self.origin = np.asarray(origin, np.float64)  # local origin, mm from the grid's centre
    self.rotation = np.asarray(rotation, np.float64)  # columns: local axes in RAS
    self.axes = [((np.arange(n) - (n - 1) / 2.0) * s - o).astype(np.float32)
                 for n, s, o in zip(self.shape, self.spacing, self.origin)]

  def block(self, lo, hi, pad: float = 2.0):
    """Voxel slices covering the local box [lo, hi] (mm) plus `pad`; None when it misses the grid."""
    corners = np.array(list(itertools.product(*zip(lo, hi))), np.float64)
    world = corners @ self.rotation.T
    out = []
    for a in range(3):
      n, s, o = self.shape[a], self.spacing[a], self.origin[a]
      first = int(np.floor((world[:, a].min() - pad + o) / s + (n - 1) / 2.0))
      last = int(np.ceil((world[:, a].max() + pad + o) / s + (n - 1) / 2.0))
      first, last = max(first, 0), min(last + 1, n)
      if first >= last:
        return None
      out.append(slice(first, last))
    return tuple(out)

  def lateral(self) -> np.ndarray:
    """u (mm toward the patient's right in the local frame) on the whole grid."""
    r = self.rotation.astype(np.float32)
    return r[0, 0] * self.axes[0][:, None, None] + r[1, 0] * self.axes[1][None, :, None] + r[2, 0] * self.axes[
        2][None, None, :]

  def local(self, blk=(slice(None),) * 3):
    """(u, v, w) float32 arrays of the block's voxel centres in the local frame."""
    d = (self.axes[0][blk[0]][:, None, None], self.axes[1][blk[1]][None, :, None],
         self.axes[2][blk[2]][None, None, :])
    r = self.rotation.astype(np.float32)
    return tuple(r[0, k] * d[0] + r[1, k] * d[1] + r[2, k] * d[2] for k in range(3))


def _capsule_box(p0, p1, radius, w_radius):
  """Local bounding box (lo, hi) of a capsule."""
  lo = np.minimum(p0, p1) - (radius, radius, w_radius)
  hi = np.maximum(p0, p1) + (radius, radius, w_radius)
  return lo, hi


class _Part:
  """A signed distance function in the local frame with its local bounding box."""

  def __init__(self, fn, lo, hi):
    self.fn, self.lo, self.hi = fn, np.asarray(lo, np.float64), np.asarray(hi, np.float64)


def _body_centre(d: dict) -> float:
  """v of the body's centre: the body overlaps the canal by 2.5 mm, which carves its concave back wall."""
  return d['canal_depth'] / 2 + d['depth'] / 2 - 2.5


def _pedicle_z(h: float) -> tuple[float, float]:
  """(centre, height) along w of the pedicles: the upper part of the body's height."""
  height = 0.42 * h
  return h / 2 - 0.08 * h - height / 2, height


def _anatomy(d: dict) -> dict[str, list[_Part]]:
  """The parts of one vertebra (and its discs, canal, cord) from its dimensions."""
  h, depth, width, disc = d['height'], d['depth'], d['width'], d['disc']
  cd, cw, pw, lam = d['canal_depth'], d['canal_width'], d['pedicle_width'], d['lamina']
  by = _body_centre(d)
  flare = 0.05

  def canal(u, v, w):
    return shapes.ellipse_sdf(u, v, cw / 2, cd / 2)

  def body_section(u, v, w, grow=1.0):
    f = grow * (1.0 + flare * np.square(np.clip(2.0 * w / h, -1.0, 1.0)))
    return np.maximum(shapes.ellipse_sdf(u, v - by, width / 2 * f, depth / 2 * f), 1.0 - canal(u, v, w))

  def body(u, v, w):
    return np.maximum(body_section(u, v, w), np.abs(w) - h / 2)

  def disc_part(sign):
    def fn(u, v, w):
      return np.maximum(body_section(u, v, np.full_like(w, h / 2), 1.02),
                        np.abs(w - sign * (h + disc) / 2) - disc / 2)
    zc = sign * (h + disc) / 2
    a, b = width / 2 * 1.08, depth / 2 * 1.08
    return _Part(fn, (-a, by - b, zc - disc / 2), (a, by + b, zc + disc / 2))

  a, b = width / 2 * (1 + flare), depth / 2 * (1 + flare)
  body_box = ((-a, by - b, -h / 2), (a, by + b, h / 2))
  ped_z, ped_h = _pedicle_z(h)
  px = cw / 2 + pw / 2 - 1.5
  parts = {'body': [_Part(body, *body_box)], 'posterior': [], 'disc': [disc_part(1), disc_part(-1)],
           'canal': [_Part(canal, (-cw / 2, -cd / 2, -1e4), (cw / 2, cd / 2, 1e4))]}
  post = parts['posterior']
  for s in (1.0, -1.0):
    # Pedicle: from inside the body back to the lamina, upper part of the body's height.
    p0, p1 = (s * px, cd / 2 + 3.0, ped_z), (s * px, -0.15 * cd, ped_z)
    post.append(_Part(lambda u, v, w, p0=p0, p1=p1: shapes.capsule_sdf(u, v, w, p0, p1, pw / 2, pw / ped_h),
                      *_capsule_box(p0, p1, pw / 2, ped_h / 2)))
    # Transverse process: lateral from the pedicle-lamina junction, tilted backwards.
    tl, ta, tr = d['transverse_length'], np.deg2rad(d['transverse_angle']), 4.0
    t0 = np.array((s * (cw / 2 + pw / 2), -0.2 * cd, ped_z - 0.1 * h))
    t1 = t0 + (s * (pw / 2 + tl) * np.cos(ta), -(pw / 2 + tl) * np.sin(ta), 0.0)
    tz = 0.17 * h
    post.append(_Part(lambda u, v, w, t0=t0, t1=t1: shapes.capsule_sdf(u, v, w, t0, t1, tr, tr / tz),
                      *_capsule_box(t0, t1, tr, tz)))
    # Articular processes: superior reaches up into the disc level, inferior down into it.
    fr = d['facet']
    a0, a1 = (s * px, -0.35 * cd, ped_z), (s * px, -0.35 * cd, h / 2 + 0.45 * disc - fr)
    post.append(_Part(lambda u, v, w, a0=a0, a1=a1: shapes.capsule_sdf(u, v, w, a0, a1, fr), *_capsule_box(a0, a1, fr, fr)))
    b0, b1 = (s * (px - 2.0), -0.35 * cd - 4.0, -0.1 * h), (s * (px - 2.0), -0.35 * cd - 4.0,
                                                             -h / 2 - 0.45 * disc + fr)
    post.append(_Part(lambda u, v, w, b0=b0, b1=b1: shapes.capsule_sdf(u, v, w, b0, b1, fr), *_capsule_box(b0, b1, fr, fr)))
  # Laminae: the ring behind the canal, from below the pedicles to just below the body.
  lam_top, lam_bottom = h / 2 - 0.15 * h, -h / 2 - 0.05 * h
  lam_c, lam_h = (lam_top + lam_bottom) / 2, (lam_top - lam_bottom) / 2

  def lamina(u, v, w):
    ring = np.maximum(shapes.ellipse_sdf(u, v, cw / 2 + lam, cd / 2 + lam), -canal(u, v, w))
    return np.maximum(np.maximum(ring, v + 0.05 * cd), np.abs(w - lam_c) - lam_h)
  post.append(_Part(lamina, (-cw / 2 - lam, -cd / 2 - lam, lam_bottom), (cw / 2 + lam, 0.0, lam_top)))
  # Spinous process: a tall, thin plate pointing back (and down in the thorax).
  sl, sa = d['spinous_length'], np.deg2rad(d['spinous_angle'])
  sr, sh = 3.0, 0.25 * h
  s0 = np.array((0.0, -cd / 2 - lam / 2, -0.1 * h))
  s1 = s0 + (0.0, -(lam / 2 + sl) * np.cos(sa), -(lam / 2 + sl) * np.sin(sa))
  post.append(_Part(lambda u, v, w: shapes.capsule_sdf(u, v, w, s0, s1, sr, sr / sh), *_capsule_box(s0, s1, sr, sh)))
  return parts


def _paint_min(canvas: _Canvas, target: np.ndarray, part: _Part, shift: float = 0.0) -> None:
  """target = min(target, part) over the part's block; `shift` moves the part along w (neighbours)."""
  blk = canvas.block(part.lo + (0, 0, shift), part.hi + (0, 0, shift))
  if blk is not None:
    u, v, w = canvas.local(blk)
    target[blk] = np.minimum(target[blk], part.fn(u, v, w - shift))


def _ramp(sdf):
  """Inside fraction of a voxel from the signed distance: the partial-volume edge."""
  out = np.multiply(sdf, np.float32(-1.0 / _RAMP_MM))
  out += np.float32(0.5)
  return np.clip(out, 0.0, 1.0, out=out)


class _Blob:
  """A lesion: an ellipsoid whose w profile has exponent `power` (4: flat ends, spanning whole slices)."""

  def __init__(self, centre, radii, power=4):
    self.centre, self.radii, self.power = np.asarray(centre, np.float64), np.asarray(radii, np.float64), power

  def paint(self, canvas: _Canvas, target: np.ndarray, allowed: np.ndarray) -> None:
    blk = canvas.block(self.centre - self.radii * 1.1, self.centre + self.radii * 1.1)
    if blk is None:
      return
    u, v, w = canvas.local(blk)
    c, r = self.centre.astype(np.float32), self.radii.astype(np.float32)
    f = np.square((u - c[0]) / r[0]) + np.square((v - c[1]) / r[1]) + np.abs((w - c[2]) / r[2]) ** self.power
    weight = np.clip((1.15 - f) / 0.3, 0.0, 1.0) * allowed[blk]
    target[blk] = np.maximum(target[blk], weight)


def _body_blobs(rng, d, size_range, count, z_centre, z_half):
  """`count` lesion blobs inside the body, all spanning the same slices (z_centre +- z_half)."""
  by = _body_centre(d)
  a_body, b_body = d['width'] / 2, d['depth'] / 2
  blobs = []
  for _ in range(count):
    a = max(rng.uniform(*size_range) * a_body, 4.5)
    b = max(rng.uniform(*size_range) * b_body, 4.5)
    cu = rng.uniform(-1, 1) * max(a_body - a, 0.0) * 0.7
    cv = by + rng.uniform(-1, 1) * max(b_body - b, 0.0) * 0.7
    zj = z_half * rng.uniform(0.9, 1.0)
    blobs.append(_Blob((cu, cv, z_centre + rng.uniform(-1, 1) * (z_half - zj)), (a, b, zj)))
  return blobs


def _blastic_blobs(rng, d, z_centre, z_half):
  """One large sclerotic focus or 2-4 smaller ones in the body."""
  if rng.random() < 0.5:
    return _body_blobs(rng, d, (0.3, 0.55), 1, z_centre, z_half)
  return _body_blobs(rng, d, (0.18, 0.3), int(rng.integers(2, 5)), z_centre, z_half)


def _lytic_blobs(rng, d, z_centre, z_half):
  """One or two areas of destruction in the body."""
  return _body_blobs(rng, d, (0.35, 0.65), int(rng.integers(1, 3)), z_centre, z_half)


def _lesion_blobs(rng, d, quality, posterolateral):
  """(blastic blobs, lytic blobs, posterolateral blobs with their side and kind) for one vertebra."""
  h = d['height']
  z_half = rng.uniform(0.7, 1.0) * h / 2
  z_centre = rng.uniform(-1, 1) * (h / 2 - z_half)
  # A mixed lesion is a blastic and a lytic lesion drawn by the same generators as the pure ones:
  # mixed = blastic and lytic at once, the premise of the paper's sub-task decomposition.
  blastic = _blastic_blobs(rng, d, z_centre, z_half) if quality in (BLASTIC, MIXED) else []
  lytic = _lytic_blobs(rng, d, z_centre, z_half) if quality in (LYTIC, MIXED) else []
  sides = {0: (), 1: (float(rng.choice((1.0, -1.0))),), 2: (1.0, -1.0)}[posterolateral]
  cd, cw, pw = d['canal_depth'], d['canal_width'], d['pedicle_width']
  ped_z, _ = _pedicle_z(h)
  pl = []
  for side in sides:
    kind = {BLASTIC: BLASTIC, LYTIC: LYTIC}.get(quality, int(rng.choice((BLASTIC, LYTIC))))
    pz = rng.uniform(0.3, 0.45) * h
    centre = (side * (cw / 2 + pw / 2 - 1.5), rng.uniform(-0.1, 0.1) * cd, ped_z - rng.uniform(0.0, 0.15) * h)
    pl.append((side, kind, _Blob(centre, (pw / 2 + rng.uniform(3.0, 6.0), cd / 2 + rng.uniform(4.0, 8.0), pz))))
  return blastic, lytic, pl


def _soft_tissue(rng, shape) -> np.ndarray:
  """Muscle with patches of fat, smooth in-plane and constant along z (2D field, broadcast)."""
  coarse = rng.standard_normal((8, 8))
  field = ndimage.zoom(coarse, (shape[0] / 8, shape[1] / 8), order=3)[:shape[0], :shape[1]]
  fat = np.clip((field - 0.6) / 0.5, 0.0, 1.0).astype(np.float32)
  muscle_hu, fat_hu = rng.uniform(35, 50), rng.uniform(-120, -80)
  return (muscle_hu + (fat_hu - muscle_hu) * fat)[:, :, None]


def _slice_labels(main, body_sdf, u, w_blastic, w_lytic, spacing):
  """Per-slice quality and posterolateral labels from the lesion voxels inside the vertebra."""
  area = spacing[0] * spacing[1]
  blastic = (w_blastic > 0.5) & main
  lytic = (w_lytic > 0.5) & main & ~blastic
  has_b = blastic.sum(axis=(0, 1)) * area >= _LESION_MIN_AREA_MM2
  has_l = lytic.sum(axis=(0, 1)) * area >= _LESION_MIN_AREA_MM2
  quality = np.where(has_b & has_l, MIXED, np.where(has_b, BLASTIC, np.where(has_l, LYTIC, NORMAL)))
  lesion_post = (blastic | lytic) & (body_sdf > 0)
  right = (lesion_post & (u > _MIDLINE_MM)).sum(axis=(0, 1)) * area >= _POSTEROLATERAL_MIN_AREA_MM2
  left = (lesion_post & (u < -_MIDLINE_MM)).sum(axis=(0, 1)) * area >= _POSTEROLATERAL_MIN_AREA_MM2
  return quality.astype(np.int32), (right.astype(np.int32) + left.astype(np.int32))


def _geometry(canvas: _Canvas, parts: dict, level: str, h: float, disc: float) -> dict:
  """Signed distances (body, posterior elements, this vertebra, all bone) and the SPINEPS label mask."""
  def union(kinds, shift=0.0):
    out = np.full(canvas.shape, _FAR, np.float32)
    for kind in kinds:
      for part in parts[kind]:
        _paint_min(canvas, out, part, shift)
    return out

  body, posterior = union(('body',)), union(('posterior',))
  main = np.minimum(body, posterior)
  mask = np.zeros(canvas.shape, np.int16)
  bone = main
  for step in (-1, 1):  # -1: the vertebra above (shifted up), 1: the one below
    neighbour = levels_lib.neighbour_level(level, step)
    if neighbour is not None:
      other = union(('body', 'posterior'), shift=-step * (h + disc))
      mask[other <= 0] = levels_lib.level_to_label(neighbour, 'spineps')
      bone = np.minimum(bone, other)
  mask[main <= 0] = levels_lib.level_to_label(level, 'spineps')
  return dict(body=body, posterior=posterior, main=main, bone=bone, mask=mask,
              disc=union(('disc',)), canal=union(('canal',)))


def _tissue_hu(rng, canvas: _Canvas, d: dict, geo: dict, trabecular: float, cortex_mm: float):
  """HU of muscle and fat, discs, CSF (and cord), cortical and trabecular bone; texture amplitude."""
  hu = np.broadcast_to(_soft_tissue(rng, canvas.shape), canvas.shape).astype(np.float32)
  hu += _ramp(geo['disc']) * (rng.uniform(70, 100) - hu)
  hu += _ramp(geo['canal']) * (rng.uniform(0, 15) - hu)
  if d['cord']:
    cord = _Part(lambda u, v, w: shapes.ellipse_sdf(u, v, d['canal_width'] * 0.3, d['canal_depth'] * 0.25),
                 (-20, -20, -1e4), (20, 20, 1e4))
    cord_sdf = np.full(canvas.shape, _FAR, np.float32)
    _paint_min(canvas, cord_sdf, cord)
    hu += _ramp(cord_sdf) * (rng.uniform(30, 40) - hu)
  f_in, f_core = _ramp(geo['bone']), _ramp(geo['bone'] + cortex_mm)
  hu = hu * (1 - f_in) + (f_in - f_core) * rng.uniform(700, 1300) + f_core * trabecular
  return hu, f_core * rng.uniform(20, 45)


def _add_benign(rng, canvas: _Canvas, d: dict, hu: np.ndarray, body_core: np.ndarray, island: bool) -> None:
  """Benign look-alikes, in place: the basivertebral vein channel (any vertebra), a small bone island."""
  if rng.random() < 0.4:
    back = _body_centre(d) - d['depth'] / 2
    front = back + 0.35 * d['depth']
    vein = _Part(lambda u, v, w: shapes.capsule_sdf(u, v, w, (0, back, 0), (0, front, 0), 1.5, 0.8),
                 (-2, back - 2, -3), (2, front + 2, 3))
    vein_sdf = np.full(canvas.shape, _FAR, np.float32)
    _paint_min(canvas, vein_sdf, vein)
    hu += _ramp(vein_sdf) * body_core * (rng.uniform(50, 90) - hu)
  if island:
    centre = (rng.uniform(-0.4, 0.4) * d['width'] / 2, _body_centre(d) + rng.uniform(-0.3, 0.3) * d['depth'] / 2,
              rng.uniform(-0.3, 0.3) * d['height'])
    weight = np.zeros(canvas.shape, np.float32)
    _Blob(centre, (rng.uniform(2, 3.5), rng.uniform(2, 3.5), rng.uniform(2, 4)), power=2).paint(
        canvas, weight, body_core)
    hu += weight * (rng.uniform(700, 1100) - hu)


def _lesion_weights(rng, canvas: _Canvas, d: dict, geo: dict, body_core, u, quality: int, posterolateral: int):
  """(blastic, lytic) weights in [0, 1] per voxel: where each lesion replaces the tissue."""
  blastic_blobs, lytic_blobs, pl_blobs = _lesion_blobs(rng, d, quality, posterolateral)
  w_blastic = np.zeros(canvas.shape, np.float32)
  w_lytic = np.zeros(canvas.shape, np.float32)
  if lytic_blobs:
    if rng.random() < 0.5:  # breaks the cortex: bulges a few mm out of the body, never into the arch
      away_from_arch = np.maximum(_ramp(geo['body']), 1.0 - _ramp(geo['posterior'] - 1.5))
      allowed = _ramp(geo['body'] - rng.uniform(1.5, 4.0)) * away_from_arch
    else:
      allowed = body_core
    for blob in lytic_blobs:
      blob.paint(canvas, w_lytic, allowed)
  for blob in blastic_blobs:
    blob.paint(canvas, w_blastic, body_core)
  for side, kind, blob in pl_blobs:  # the bone of one side: pedicle, arch, back of the body
    allowed = _ramp(geo['main'] - 0.5) * np.clip(0.5 + (side * u - 1.0) / _RAMP_MM, 0.0, 1.0)
    blob.paint(canvas, w_blastic if kind == BLASTIC else w_lytic, allowed)
  return w_blastic, w_lytic


def _regions(main, body_sdf, u) -> np.ndarray:
  """REGION_* of every voxel of this vertebra: body, or posterior elements by side (u)."""
  region = np.zeros(main.shape, np.int8)
  posterior = main & (body_sdf > 0)
  region[main & (body_sdf <= 0)] = REGION_BODY
  region[posterior & (u > _MIDLINE_MM)] = REGION_POSTERIOR_RIGHT
  region[posterior & (u < -_MIDLINE_MM)] = REGION_POSTERIOR_LEFT
  region[posterior & (np.abs(u) <= _MIDLINE_MM)] = REGION_POSTERIOR_MIDLINE
  return region


def make_vertebra(rng: np.random.Generator, quality: int, posterolateral: int, level: str,
                  spacing_mm=(1.0, 1.0, 2.5), *, elderly_fraction: float = 0.2,
                  lookalike_fraction: float = 0.15, grid_mm: float = 112.0) -> dict:
  """One phantom vertebra of `level` with the given bone quality (0-3) and posterolateral involvement (0-2).

  Returns volume_hu (X, Y, Z) float32 and mask (X, Y, Z) int16 in RAS (SPINEPS labels: this
  vertebra's and its neighbours'), label, level, spacing, slice_quality (Z,) and
  slice_posterolateral (Z,) (0 where the vertebra is absent), and for checks: region (X, Y, Z)
  int8 (REGION_*), lesion (X, Y, Z) int8 (1 blastic, 2 lytic), origin (mm from the grid's centre),
  rotation and dims. The grid is grid_mm square in-plane (the vertebra with the slice margin fits
  in 112 mm) and spans the body, both discs and 5 mm of each neighbour.
  """
  quality, posterolateral = int(quality), int(posterolateral)
  if quality not in range(4) or posterolateral not in range(3):
    raise ValueError(f'quality must be 0-3 and posterolateral 0-2, got {quality}, {posterolateral}')
  if quality == NORMAL and posterolateral:
    raise ValueError('a normal vertebra has no posterolateral involvement')
  level = levels_lib.normalise_level(level)
  spacing = np.asarray(spacing_mm, np.float64)
  d = level_dims(level, rng)
  h, disc = d['height'], d['disc']
  shape = (int(round(grid_mm / spacing[0])), int(round(grid_mm / spacing[1])),
           int(np.ceil((h + 2 * disc + 10.0) / spacing[2])))
  canvas = _Canvas(shape, spacing, (rng.uniform(-3, 3), rng.uniform(-3, 3), rng.uniform(-0.5, 0.5) * spacing[2]),
                   _rotation(rng))
  geo = _geometry(canvas, _anatomy(d), level, h, disc)
  u = canvas.lateral()

  trabecular = rng.uniform(90, 140) if rng.random() < elderly_fraction else rng.uniform(150, 350)
  cortex_mm = rng.uniform(1.0, 2.0)
  hu, texture = _tissue_hu(rng, canvas, d, geo, trabecular, cortex_mm)
  body_core = _ramp(geo['body'] + cortex_mm)
  _add_benign(rng, canvas, d, hu, body_core, quality == NORMAL and rng.random() < lookalike_fraction)
  w_blastic, w_lytic = _lesion_weights(rng, canvas, d, geo, body_core, u, quality, posterolateral)
  # Lytic: soft-tissue density, kept at least 60 HU below the trabecular bone (elderly bone ~100 HU).
  hu += w_lytic * (max(min(rng.uniform(0, 100), trabecular - 60.0), 0.0) - hu)
  hu += w_blastic * (rng.uniform(500, 1500) - hu)
  texture = texture * (1 - np.maximum(w_lytic, w_blastic)) + w_blastic * rng.uniform(60, 120) + w_lytic * 10.0

  # Texture, partial-volume blur, CT noise.
  hu += _NOISE_GAIN * texture * rng.standard_normal(shape, dtype=np.float32)
  blur_mm = rng.uniform(0.5, 0.8)
  hu = ndimage.gaussian_filter(hu, sigma=(blur_mm / spacing[0], blur_mm / spacing[1], 0.3), truncate=3.0)
  hu += rng.uniform(10, 30) * rng.standard_normal(shape, dtype=np.float32)

  main = geo['main'] <= 0
  slice_quality, slice_posterolateral = _slice_labels(main, geo['body'], u, w_blastic, w_lytic, spacing)
  lesion = np.zeros(shape, np.int8)
  lesion[w_lytic > 0.5] = 2
  lesion[w_blastic > 0.5] = 1
  return dict(volume_hu=hu.astype(np.float32), mask=geo['mask'], label=levels_lib.level_to_label(level, 'spineps'),
              level=level, spacing=tuple(spacing.tolist()), slice_quality=slice_quality,
              slice_posterolateral=slice_posterolateral, region=_regions(main, geo['body'], u), lesion=lesion,
              origin=canvas.origin, rotation=canvas.rotation, dims=d, quality=quality, posterolateral=posterolateral)


def _exact_counts(freqs, n: int) -> np.ndarray:
  """Class counts summing to n, proportional to freqs (largest remainder)."""
  freqs = np.asarray(freqs, np.float64)
  if freqs.ndim != 1 or np.any(freqs < 0) or freqs.sum() <= 0:
    raise ValueError(f'class frequencies must be non-negative with a positive sum, got {freqs.tolist()}')
  raw = freqs / freqs.sum() * n
  counts = np.floor(raw).astype(np.int64)
  counts[np.argsort(-(raw - counts), kind='stable')[:n - counts.sum()]] += 1
  return counts


def labels_consistent(quality: int, posterolateral: int, slice_quality, slice_posterolateral) -> bool:
  """Whether the slice labels give back the vertebra's labels under the evaluation's rules, with margin.

  The rules are metrics.classification's; the margin: an abnormal vertebra needs at least 40% lesion
  slices (normal share 0.6 instead of 0.7), and a posterolateral class at least 25% of the slices.
  """
  sq, sp = np.asarray(slice_quality), np.asarray(slice_posterolateral)
  if quality == NORMAL:
    return not sq.any() and not sp.any()
  pl_counts = np.bincount(sp, minlength=3)
  return (classes.quality_from_counts(np.bincount(sq, minlength=4), normal_fraction=0.6) == quality
          and classes.posterolateral_from_counts(pl_counts, min_fraction=0.2) == posterolateral
          and (posterolateral == 0 or pl_counts[posterolateral:].sum() / sp.size >= 0.25))


def _vertebra_with_slices(seed_seq, quality, posterolateral, levels, cfg):
  """Draw a level and a vertebra until its slice labels agree with its vertebra labels."""
  rng = np.random.default_rng(seed_seq)
  level = str(rng.choice(list(levels)))
  for _ in range(_MAX_ATTEMPTS):
    v = make_vertebra(rng, quality, posterolateral, level, cfg.spacing_mm,
                      elderly_fraction=cfg.elderly_fraction, lookalike_fraction=cfg.lookalike_fraction)
    images, z = slices_lib.extract_vertebra_slices(v['volume_hu'], v['mask'], v['label'], v['spacing'], cfg.slices)
    sq, sp = v['slice_quality'][z], v['slice_posterolateral'][z]
    if labels_consistent(quality, posterolateral, sq, sp):
      return level, images, z, sq, sp
  raise RuntimeError(f'no consistent phantom for {level}, quality {quality}, posterolateral {posterolateral} '
                     f'in {_MAX_ATTEMPTS} attempts')


def vertebra_classes(cfg, n: int, seed: int, quality_freqs=None) -> tuple[np.ndarray, np.ndarray]:
  """(quality, posterolateral) of n vertebrae: exact counts from the configured frequencies, shuffled."""
  rng = np.random.default_rng([seed, 2**31 - 1])
  freqs = cfg.quality_freqs if quality_freqs is None else quality_freqs
  quality = np.repeat(np.arange(4), _exact_counts(freqs, n))
  rng.shuffle(quality)
  posterolateral = np.zeros(n, np.int64)
  abnormal = np.flatnonzero(quality != NORMAL)
  pl = np.repeat(np.arange(3), _exact_counts(cfg.posterolateral_freqs, abnormal.size))
  rng.shuffle(pl)
  posterolateral[abnormal] = pl
  return quality, posterolateral


def build_phantom_slices(cfg, split: str) -> dict[str, np.ndarray]:
  """The phantom data set of one split ('train' or 'test') as arrays of slices and vertebrae.

  image (N, S, S) float32 from `extract_vertebra_slices` with cfg.slices; quality, posterolateral,
  vertebra (index into the vert_* arrays), z_index (N,) int32; vert_quality, vert_posterolateral,
  vert_label (SPINEPS) (V,) int32, vert_level (V,) str. The classes are exact counts from the
  configured frequencies, shuffled with the split's seed; vertebra i is then drawn from the seed
  (split seed, i), redrawn until its slice labels give back its classes (see labels_consistent).
  """
  if split == 'train':
    n, seed = int(cfg.num_train_vertebrae), int(cfg.train_seed)
  elif split == 'test':
    n, seed = int(cfg.num_test_vertebrae), int(cfg.test_seed)
  else:
    raise ValueError(f"unknown phantom split {split!r}; expected 'train' or 'test'")
  if n <= 0:
    raise ValueError(f'the {split} split needs at least one vertebra, got {n}')
  for level in cfg.levels:
    levels_lib.normalise_level(level)
  test_freqs = tuple(cfg.get('test_quality_freqs') or ())
  quality, posterolateral = vertebra_classes(cfg, n, seed, test_freqs if split == 'test' and test_freqs else None)
  out = {k: [] for k in ('image', 'quality', 'posterolateral', 'vertebra', 'z_index')}
  vert_level = []
  for i in range(n):
    level, images, z, sq, sp = _vertebra_with_slices([seed, i], quality[i], posterolateral[i], cfg.levels, cfg)
    vert_level.append(level)
    out['image'].append(images)
    out['quality'].append(sq)
    out['posterolateral'].append(sp)
    out['vertebra'].append(np.full(z.size, i))
    out['z_index'].append(z)
  data = {'image': np.concatenate(out['image']).astype(np.float32)}
  for k in ('quality', 'posterolateral', 'vertebra', 'z_index'):
    data[k] = np.concatenate(out[k]).astype(np.int32)
  data['vert_quality'] = quality.astype(np.int32)
  data['vert_posterolateral'] = posterolateral.astype(np.int32)
  data['vert_level'] = np.array(vert_level)
  data['vert_label'] = np.array([levels_lib.level_to_label(v, 'spineps') for v in vert_level], np.int32)
  return data


def write_phantom_nifti(out_dir, n: int, seed: int, *, top_level: str = 'L1', spacing_mm=(1.0, 1.0, 2.5),
                        axcodes=('L', 'P', 'S'), manifest_name: str = 'manifest.csv', split: str | None = None,
                        qualities=None, posterolaterals=None, name: str = 'phantom') -> dict:
  """A user-style data set: n consecutive phantom vertebrae (top_level downward) as one CT + label mask.

  Writes <name>_ct.nii.gz (int16 HU), <name>_seg.nii.gz (uint8, SPINEPS labels) in `axcodes`
  orientation (LPS by default, as DICOM converters often write) and a manifest (.csv or .jsonl,
  by its name) with one row per vertebra and paths relative to out_dir. Classes are drawn
  uniformly unless given. Returns the paths, the per-vertebra records, and the RAS arrays
  (volume_hu before int16 rounding, mask) and spacing for checking.
  """
  out_dir = pathlib.Path(out_dir)
  rng = np.random.default_rng(seed)
  names = [levels_lib.normalise_level(top_level)]
  while 0 < len(names) < n and names[-1] is not None:
    names.append(levels_lib.neighbour_level(names[-1], 1))
  if n <= 0 or None in names:
    raise ValueError(f'cannot take {n} vertebrae downward from {top_level}')
  quality = rng.integers(0, 4, n) if qualities is None else np.asarray(qualities)
  if posterolaterals is None:
    pl = np.where(quality == NORMAL, 0, rng.integers(0, 3, n))
  else:
    pl = np.asarray(posterolaterals)
  pieces, masks, records = [], [], []
  for k in range(n - 1, -1, -1):  # from the bottom up: RAS axis 2 points superior
    v = make_vertebra(np.random.default_rng([seed, k]), int(quality[k]), int(pl[k]), names[k], spacing_mm)
    # Keep the vertebra between the middles of its discs, so that the pieces stack without overlap.
    d, sz = v['dims'], v['spacing'][2]
    zs = (np.arange(v['mask'].shape[2]) - (v['mask'].shape[2] - 1) / 2.0) * sz - v['origin'][2]
    keep = (zs >= -(d['height'] + d['disc']) / 2) & (zs < (d['height'] + d['disc']) / 2)
    pieces.append(v['volume_hu'][:, :, keep])
    masks.append(v['mask'][:, :, keep])
    records.append(dict(label=v['label'], level=v['level'], quality=int(quality[k]), posterolateral=int(pl[k])))
  records.reverse()
  volume, mask = np.concatenate(pieces, axis=2), np.concatenate(masks, axis=2)
  spacing = np.asarray(spacing_mm, np.float64)
  affine_ras = np.diag([*spacing, 1.0])
  affine_ras[:3, 3] = -spacing * (np.array(volume.shape) - 1) / 2.0
  ct, affine, _ = nifti.reorient(np.rint(volume).astype(np.int16), affine_ras, axcodes)
  seg, _, _ = nifti.reorient(mask.astype(np.uint8), affine_ras, axcodes)
  image_path, mask_path = out_dir / f'{name}_ct.nii.gz', out_dir / f'{name}_seg.nii.gz'
  nifti.atomic_save_nifti(ct, affine, image_path)
  nifti.atomic_save_nifti(seg, affine, mask_path)
  rows = [dict(image=image_path.name, mask=mask_path.name, label=r['label'], quality=QUALITY_CLASSES[r['quality']],
               posterolateral=POSTEROLATERAL_CLASSES[r['posterolateral']], scheme='spineps',
               **({'split': split} if split else {})) for r in records]
  manifest_path = out_dir / manifest_name
  manifest_lib.write_manifest(manifest_path, rows)
  return dict(manifest=manifest_path, image=image_path, mask=mask_path, records=records,
              volume_hu=volume, mask_ras=mask, spacing=tuple(spacing.tolist()), affine_ras=affine_ras)

"""Procedural sagittal T2-weighted spines with SPINEPS labels: the default MRI training and test data.

No patient scans can be shipped, so each volume is drawn from a seed: a spine of C1 to the sacrum
(T13 or L6 now and then; `labeling_phantom_config()` adds eleven thoracic vertebrae and lumbosacral
transitional forms) whose sizes follow SPEC section 7 by level, laid along a sagittal curve
with cervical lordosis, thoracic kyphosis, lumbar lordosis and sacral kyphosis; a field of view
over a random run of vertebrae cuts it, with parts of the neighbours at the edges as real scans do
(for naming vertebrae: cervical, thoracic, lumbar or whole-spine fields, by which anchors they hold).
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

This module holds the settings (one function per data set) and draws volumes and data sets, which
is why it runs past 400 lines; the anatomy (ids, sizes, pieces, transitional forms, curve, field of
view) is `mri_anatomy.py`, the voxel field and the parts' shapes `mri_parts.py`, the painting of
labels and intensities `mri_painting.py`.
"""
from __future__ import annotations

import csv
import io
import pathlib

import ml_collections
import numpy as np
from scipy import ndimage

from spine_jax.data import nifti
from spine_jax.data import spatial
from spine_jax.data.phantoms.mri_anatomy import (BONE_IDS, TRANSITION_RATE_FIELDS, ColumnPlan, Frame, column_rates,
                                                 draw_pieces, field_kind, field_window,
                                                 make_curve, vertebra_id)
from spine_jax.data.spine_labels import CORPUS, DISC_OFFSET, ENDPLATE, ENDPLATE_OFFSET, SACRUM
from spine_jax.data.phantoms.mri_parts import Field, piece_rows
from spine_jax.data.phantoms.mri_painting import (draw_tissue, paint_atlas, paint_canal, paint_disc, paint_ribs,
                                                  paint_sacral, paint_soft_tissue, paint_vertebra, paint_vessels,
                                                  row_profiles, skin_line)


def default_mri_phantom_config() -> ml_collections.ConfigDict:
  """Phantom MRI data set settings; the default fits CPU training (about 128 x 300 x 32 voxels, 6-9 vertebrae)."""
  cfg = ml_collections.ConfigDict()
  cfg.num_train_volumes = 64
  cfg.num_test_volumes = 8
  cfg.train_seed = 0
  cfg.test_seed = 1  # held-out split: its own seed, so no volume is shared with training
  cfg.spacing_mm = spatial.REFERENCE_SPACING  # (P, I, R)
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
  # Transitional anatomy (ids in mri_anatomy's docstring). The thoracic rates exclude each other, as do the
  # lumbosacral ones. Rates of 0 and degenerate rib ranges draw nothing, which keeps these volumes as they were.
  cfg.t13_probability = 0.03  # a 13th thoracic vertebra (SPINEPS id 28)
  cfg.t11_probability = 0.0  # eleven thoracic vertebrae: T11 (18), then L1 (20)
  cfg.l6_probability = 0.03  # a supernumerary 6th lumbar vertebra (SPINEPS id 25)
  cfg.lumbarised_s1_probability = 0.0  # S1 freed as an L6 (25) above a four-segment sacrum
  cfg.sacralised_l5_probability = 0.0  # L5 with broad costal processes reaching the sacral alae
  # The training split's own rates, by the fields above (None: as above; e.g.
  # --config.data.phantom.train_transition_rates.t13_probability=0.09); held-out splits keep the rates above: the
  # rare forms oversampled in training, so that a network sees enough of them.
  cfg.train_transition_rates = ml_collections.ConfigDict(
      {name: ml_collections.FieldReference(None, field_type=float) for name in TRANSITION_RATE_FIELDS})
  cfg.last_rib_length_range = (1.0, 1.0)  # rib length of T12 (T11 with eleven), relative to a typical rib
  cfg.t13_rib_length_range = (1.0, 1.0)
  cfg.sacral_alae = False
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


def labeling_phantom_config() -> ml_collections.ConfigDict:
  """Fields for naming vertebrae: a mixture of study kinds that start anywhere from C1 to L3, with the
  transitional forms at a few percent each (roughly their reported prevalence) and the level cues of
  the last thoracic ribs and the sacral alae. Everything else is `default_mri_phantom_config()`.

  Kinds (mri_anatomy.FIELD_KINDS) by their anchors: 'cervical' from C1/C2 down (no sacrum), 'thoracic'
  (neither: tops from C4 to about T11, C2 and the sacrum kept wholly out of the field), 'lumbar' (the
  sacrum and 3 to 10 vertebrae above it, tops from T8 to L3, no C2), 'whole' (C1 to the sacrum in one
  stitched field at the reference spacing and R extent: about 250 x 900 x 32 voxels, 1.2 s of CPU, about
  4x a default volume; the mixture averages 0.4 s). `top_level_choices` is not used.
  """
  cfg = default_mri_phantom_config()
  cfg.field_kind_weights = ml_collections.ConfigDict(dict(cervical=0.25, thoracic=0.3, lumbar=0.3, whole=0.15))
  cfg.lumbar_num_vertebrae_range = (4, 11)  # complete vertebrae of a lumbar field, the sacrum counted
  cfg.whole_tilt_deg = 4.0  # a whole-spine field leans less: the stations are aligned on the spine
  cfg.t13_probability = 0.03
  cfg.t11_probability = 0.02
  cfg.l6_probability = 0.02
  cfg.lumbarised_s1_probability = 0.03
  cfg.sacralised_l5_probability = 0.04
  cfg.last_rib_length_range = (0.3, 1.0)  # the 12th rib ranges from a stub to full length
  cfg.t13_rib_length_range = (0.0, 0.4)  # T13: rudimentary ribs, down to the head and neck alone
  cfg.sacral_alae = True
  return cfg


def labeling_smoke_config() -> ml_collections.ConfigDict:
  """`labeling_phantom_config()` small for tests: 3-5 vertebrae at twice the reference spacing, 16 slices."""
  cfg = labeling_phantom_config()
  cfg.num_train_volumes = 2
  cfg.num_test_volumes = 1
  cfg.spacing_mm = tuple(2.0 * s for s in spatial.REFERENCE_SPACING)
  cfg.shape = (0, 0, 16)
  cfg.shape_multiple = 8
  cfg.num_vertebrae_range = (3, 5)
  cfg.lumbar_num_vertebrae_range = (3, 6)
  return cfg


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
  blurred = ndimage.gaussian_filter1d(image, sigma, axis=2, mode='nearest', truncate=2.5) if sigma > 1e-3 else image
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


def _form_image(rng, field: Field, cfg) -> np.ndarray:
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


def _fit_axis(lo: float, hi: float, spacing: float, fixed: int, multiple: int, rng,
              limits: tuple[float, float] | None = None) -> tuple[float, int]:
  """(origin mm, voxels) of one axis covering [lo, hi]; a fixed size is centred, a fitted one rounded up.

  `limits` (mm) bound every voxel centre and win over covering [lo, hi]; where even they cannot hold
  the axis, it is placed as without them.
  """
  need = int(np.ceil((hi - lo) / spacing)) + 1
  n = int(fixed) if fixed else int(np.ceil(need / multiple) * multiple)
  spare = (n - need) * spacing
  if limits is not None and limits[1] - limits[0] >= (n - 1) * spacing:
    last = limits[1] - (n - 1) * spacing  # the latest start that keeps the far end within the limits
    covering = (hi - (n - 1) * spacing, lo) if spare >= 0 else ((lo + hi - (n - 1) * spacing) / 2,) * 2
    a, b = max(covering[0], limits[0]), min(covering[1], last)
    if a > b:  # rounding made the axis longer than the room around the window: keep the limits
      a = b = float(np.clip(covering[0], limits[0], last))
    return (float(rng.uniform(a, b)) if b > a else float(a)), n
  start = lo - (rng.uniform(0.0, spare) if spare > 0 else spare / 2)
  return start, n


def _anchor_free_rows(pieces, kind: str | None) -> tuple[float, float] | None:
  """(top, bottom) world i (mm) that keep every voxel of an anchor a kind lacks out of the field: C1 and C2
  for 'thoracic' and 'lumbar' fields, the sacrum for 'thoracic' and 'cervical' ones; None without a kind."""
  if kind is None:
    return None
  top, bottom = -np.inf, np.inf
  pad = 0.5  # mm beyond the parts' boxes, against rounding
  if kind in ('thoracic', 'lumbar'):
    top = max(piece_rows(p)[1] for p in pieces if p.name in ('C1', 'C2')) + pad
  if kind in ('thoracic', 'cervical'):
    bottom = min(piece_rows(p)[0] for p in pieces if p.kind == 'sacral') - pad
  return top, bottom


def make_spine(rng: np.random.Generator, cfg=None) -> dict:
  """One phantom sagittal T2w volume in PIR with SPINEPS semantic and instance masks.

  Returns image (X, Y, Z) float32; semantic (X, Y, Z) uint8 (SEMANTIC_IDS, 0 background);
  instance (X, Y, Z) int16 (vertebra X: its SPINEPS id on body and posterior elements, 26 on
  the sacrum, 100 + X on the disc below it, 200 + X on its endplates; 0 elsewhere, canal and
  cord included); affine (4, 4) PIR -> RAS mm; spacing (P, I, R) mm; levels (vertebrae with
  voxels in the field, top to bottom); full_levels (those wholly inside); centroids {instance
  id: voxel centroid}; body_centroids {vertebra id: centroid of its body and endplates, or of
  the sacrum}; vertebrae (per level of the patient, in the field or not, top to bottom: id, dims,
  angle, centre in mm, form ('typical', 't13' or the last lumbar's lumbosacral form), rib_voxels
  (background voxels its ribs show)); cord_end_level.

  For naming vertebrae: level_ids (the SPINEPS id of each of `levels`); has_c2 / has_sacrum (the
  anchor has voxels in the field; fields of a drawn kind hold an anchor wholly or not at all);
  field_kind ('cervical', 'thoracic', 'lumbar' or 'whole', from the anchors); thoracic_count (11, 12,
  13), lumbar_count (5, 6) and lumbosacral (mri_anatomy.LUMBOSACRAL_FORMS) of the patient.
  """
  cfg = default_mri_phantom_config() if cfg is None else cfg
  spacing = np.asarray(cfg.spacing_mm, np.float64)
  pieces, plan = draw_pieces(rng, cfg)
  s_top, s_bottom, full, kind = field_window(rng, pieces, cfg)
  curve = make_curve(rng, pieces, cfg, (s_top, s_bottom), cfg.get('whole_tilt_deg') if kind == 'whole' else None)
  for p in pieces:
    p.frame = Frame((curve.at(curve.p, p.s), curve.at(curve.i, p.s), curve.at(curve.r, p.s)),
                     curve.at(curve.phi, p.s))
    p.dims.update(endplate=float(rng.uniform(0.9, 1.3)), cortex=float(rng.uniform(0.8, 1.4)),
                  concavity=float(rng.uniform(0.3, 1.0)), waist=float(rng.uniform(0.02, 0.06)))

  # Field: rows from the window; P from the front of the bodies to the skin; R around the midline.
  i_lo, i_hi = curve.at(curve.i, s_top), curve.at(curve.i, s_bottom)
  limits = _anchor_free_rows(pieces, kind)
  if limits is not None:
    i_lo, i_hi = max(i_lo, limits[0]), min(i_hi, limits[1])
  i0, n_i = _fit_axis(i_lo, i_hi, spacing[1], cfg.shape[1], cfg.shape_multiple, rng, limits)
  i_axis = i0 + spacing[1] * np.arange(n_i)
  if limits is not None:  # the limits can cut into the run's end vertebrae: complete ones keep their whole body
    full = [k for k in full if i_axis[0] <= piece_rows(pieces[k], True)[0] and
            piece_rows(pieces[k], True)[1] <= i_axis[-1]]
  keys = ('vc', 'depth', 'canal_depth', 'canal_width', 'lamina', 'spinous_length', 'spinous_angle', 'cover',
          'cord_depth', 'cord_width')
  rows = row_profiles(curve, pieces, i_axis, keys)
  skin, fat = skin_line(rng, rows)
  anterior = rows.values['vc'] + rows.values['depth'] / 2
  p_lo = np.min(rows.p - (anterior + rng.uniform(8.0, 30.0)) / rows.cos)
  p_hi = np.max(rows.p + (skin + rng.uniform(0.0, 6.0)) / rows.cos)
  p0, n_p = _fit_axis(p_lo, p_hi, spacing[0], cfg.shape[0], cfg.shape_multiple, rng)
  n_r = int(cfg.shape[2]) if cfg.shape[2] else int(np.ceil(rng.uniform(50.0, 70.0) / spacing[2]))
  r0 = -spacing[2] * (n_r - 1) / 2
  field = Field((p0, i0, r0), spacing, (n_p, n_i, n_r))

  tis = draw_tissue(rng)
  paint_soft_tissue(field, rows, tis, skin, fat, anterior, rng)
  paint_vessels(field, rows, pieces, tis, anterior, rng)
  ends = paint_canal(field, rows, pieces, tis, rng)
  sacral_marrow = float(np.clip(tis.marrow * rng.uniform(1.0, 1.15), 0.35, 0.7))
  for upper, lower in zip(pieces[1:-1], pieces[2:]):
    if upper.kind == 'vertebra':
      paint_disc(field, upper, lower, tis, rng)
  ribs = {p.name: paint_ribs(field, p, tis) for p in pieces if p.kind == 'vertebra' and p.name.startswith('T')}
  for piece in pieces:
    if piece.kind == 'atlas':
      paint_atlas(field, piece, tis)
    elif piece.kind == 'vertebra':
      paint_vertebra(field, piece, tis, rng)
    else:
      paint_sacral(field, piece, tis, sacral_marrow)

  rib_voxels = {name: sum(int((field.sem[blk][mask] == 0).sum()) for blk, mask in painted)
                for name, painted in ribs.items()}
  image = _form_image(rng, field, cfg)
  return _summary(field, image, pieces, full, ends, plan, rib_voxels)


def _centroids(labels: np.ndarray) -> dict[int, tuple]:
  """{label: mean voxel index (axis 0, 1, 2)} of every non-zero label (bincount over the labelled voxels only)."""
  flat = np.flatnonzero(labels)
  values = labels.ravel()[flat].astype(np.int64)
  counts = np.bincount(values)
  coords = np.unravel_index(flat, labels.shape)
  sums = [np.bincount(values, weights=c, minlength=counts.size) for c in coords]
  return {int(k): tuple(float(s[k] / counts[k]) for s in sums) for k in np.flatnonzero(counts)}


def _summary(field: Field, image, pieces, full, ends: dict, plan: ColumnPlan, rib_voxels: dict) -> dict:
  """The volume's dict: arrays, geometry, per-level facts and the field's kind and anatomy."""
  inst, sem = field.inst, field.sem
  centroids = _centroids(inst)
  body = np.where(sem == ENDPLATE, inst - ENDPLATE_OFFSET, 0).astype(np.int16)
  bone = (sem == CORPUS) | (sem == SACRUM)
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
                          angle_deg=float(np.rad2deg(p.frame.angle)), form=p.form,
                          rib_voxels=rib_voxels.get(p.name, 0),
                          dims={k: v for k, v in p.dims.items() if not isinstance(v, str)}))
  cord_end = next((p.name for p in pieces if p.s + p.dims['height'] / 2 + p.dims['disc'] >= ends['conus']), None)
  has_c2, has_sacrum = 'C2' in levels, 'S1' in levels
  return dict(image=image, semantic=sem, instance=inst, affine=field.affine(),
              spacing=tuple(float(s) for s in field.spacing), levels=levels,
              level_ids=[vertebra_id(level) for level in levels],
              full_levels=[pieces[k].name for k in full if pieces[k].ident in present],
              centroids=centroids, body_centroids=body_centroids, vertebrae=vertebrae,
              cord_end_level=cord_end, conus_s=float(ends['conus']),
              field_kind=field_kind(has_c2, has_sacrum), has_c2=has_c2, has_sacrum=has_sacrum,
              thoracic_count=plan.thoracic, lumbar_count=plan.lumbar, lumbosacral=plan.lumbosacral)


def split_size(cfg, split: str) -> int:
  """Number of volumes of a split ('train' or 'test')."""
  return int(_split(cfg, split)[0])


def _split(cfg, split: str) -> tuple[int, int]:
  if split == 'train':
    return int(cfg.num_train_volumes), int(cfg.train_seed)
  if split == 'test':
    return int(cfg.num_test_volumes), int(cfg.test_seed)
  raise ValueError(f"unknown phantom split {split!r}; expected 'train' or 'test'")


def split_config(cfg, split: str):
  """The phantom settings a split is drawn with: the training split with `train_transition_rates` in place of
  those rates (each group must still sum to at most 1), every other split as configured."""
  overrides = {k: v for k, v in dict(cfg.get('train_transition_rates') or {}).items() if v is not None}
  if split != 'train' or not overrides:
    return cfg
  unknown = sorted(set(overrides) - set(TRANSITION_RATE_FIELDS))
  if unknown:
    raise ValueError(f'train_transition_rates: unknown field(s) {", ".join(unknown)}; known: '
                     f'{", ".join(TRANSITION_RATE_FIELDS)}')
  scaled = cfg.copy_and_resolve_references()
  for name, rate in overrides.items():
    scaled[name] = float(rate)
  try:
    column_rates(scaled)
  except ValueError as e:
    raise ValueError(f'train_transition_rates: {e}') from None
  return scaled


def make_volume(cfg, split: str, index: int) -> dict:
  """Volume `index` of a split: depends only on (the split's seed, index), so workers can draw it on demand."""
  n, seed = _split(cfg, split)
  cfg = split_config(cfg, split)
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

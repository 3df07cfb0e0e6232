"""The MRI phantoms' anatomy: SPINEPS label ids, sizes by level (SPEC section 7), the spine's pieces
with their transitional forms, the sagittal curve they are laid along (cervical lordosis, thoracic
kyphosis, lumbar lordosis, sacral kyphosis), and the field of view that cuts them. Part of `mri.py`'s
phantoms.

Transitional forms and their SPINEPS ids (as SPINEPS' labelling names them: `read_labels.get_subject_info`
and `phase_labeling.fpath_post_processing`): a 13th thoracic vertebra is T13 (28) between T12 (19) and
L1 (20); with eleven thoracic vertebrae the last is T11 (18) and the next L1 (20), id 19 unused; a sixth
lumbar vertebra, supernumerary or a lumbarised S1 above a four-segment sacrum, is L6 (25); a sacralised
L5 keeps L5 (24). The sacrum is always 'S1' (26), whatever its first segment.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from spine_jax.data import levels as levels_lib
from spine_jax.data.spine_labels import ENDPLATE, SACRUM, VERTEBRA_PARTS


BONE_IDS = (SACRUM, *VERTEBRA_PARTS, ENDPLATE)  # painted with bone's intensity texture

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
C1_HEIGHT_MM, _C1_GAP_MM = 10.0, 3.0  # atlas ring height, its gap above C2's body (the dens fills it)
_STEP_MM = 0.5  # arc-length sampling of the spine curve
_FAR = np.float32(1.0e3)
# The config's rate of each transitional form; thoracic counts and lumbosacral forms exclude each other.
TRANSITION_RATE_FIELDS = ('t13_probability', 't11_probability', 'l6_probability', 'lumbarised_s1_probability',
                          'sacralised_l5_probability')
# 'l6': a supernumerary lumbar vertebra above a whole sacrum; 'lumbarised_s1': the first sacral segment
# free as an L6 (rudimentary disc below, broad costal processes) above a four-segment sacrum;
# 'sacralised_l5': L5 with broad costal processes reaching down to the sacral alae, rudimentary disc below.
LUMBOSACRAL_FORMS = ('typical', 'l6', 'lumbarised_s1', 'sacralised_l5')
_RUDIMENTARY_DISC = (0.3, 0.5)  # height of a transitional vertebra's disc to the sacrum, relative to a lumbar disc


# ---------------------------------------------------------------------------------------------
# Levels and sizes


@dataclasses.dataclass(frozen=True)
class ColumnPlan:
  """One patient's count of thoracic vertebrae (11, 12 or 13) and lumbosacral form (LUMBOSACRAL_FORMS)."""
  thoracic: int = 12
  lumbosacral: str = 'typical'

  @property
  def lumbar(self) -> int:
    return 6 if self.lumbosacral in ('l6', 'lumbarised_s1') else 5

  @property
  def levels(self) -> list[str]:
    """C1 .. S1 by SPINEPS' names, top to bottom."""
    return ([f'C{i}' for i in range(1, 8)] + [f'T{i}' for i in range(1, self.thoracic + 1)]
            + [f'L{i}' for i in range(1, self.lumbar + 1)] + ['S1'])


def column_rates(cfg) -> dict:
  """The transitional forms' rates of a phantom config (absent fields: 0)."""
  rates = {name: float(cfg.get(name, 0.0)) for name in TRANSITION_RATE_FIELDS}
  for group in (TRANSITION_RATE_FIELDS[:2], TRANSITION_RATE_FIELDS[2:]):
    values = [rates[name] for name in group]
    if min(values) < 0.0 or sum(values) > 1.0:
      raise ValueError(f'phantom config: {", ".join(group)} must be probabilities summing to at most 1, got {values}')
  return rates


def draw_column(rng: np.random.Generator, rates: dict) -> ColumnPlan:
  """Thoracic count and lumbosacral form: one uniform draw each, so zero rates leave the random stream as it was."""
  u = rng.random()
  t13, t11 = rates.get('t13_probability', 0.0), rates.get('t11_probability', 0.0)
  thoracic = 13 if u < t13 else 11 if u < t13 + t11 else 12
  edges = np.cumsum([rates.get(f'{form}_probability', 0.0) for form in LUMBOSACRAL_FORMS[1:]])
  k = int(np.searchsorted(edges, rng.random(), side='right'))
  return ColumnPlan(thoracic, LUMBOSACRAL_FORMS[k + 1] if k < len(edges) else 'typical')


def spine_levels(rng: np.random.Generator, t13_probability: float = 0.0, l6_probability: float = 0.0):
  """C1 .. S1 of one patient: 12 thoracic and 5 lumbar vertebrae, now and then T13 or L6."""
  return draw_column(rng, dict(t13_probability=t13_probability, l6_probability=l6_probability)).levels


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
  return dict(c2, height=C1_HEIGHT_MM, disc=_C1_GAP_MM, canal_depth=c2['canal_depth'] + 1.0,
              canal_width=c2['canal_width'] + 2.0, region='cervical')


def _sacral_dims(l5: dict, rng: np.random.Generator, first: int = 0) -> list[dict]:
  """Sacral segments from S{first + 1} down to S5: shrinking bodies with a dorsal wall around a narrowing canal."""
  h1 = rng.uniform(26.0, 30.0)
  scales = _SACRAL_SCALE[first:]
  out = []
  for k, (fh, fd, fw) in enumerate(scales):
    out.append(dict(l5, height=h1 * fh, depth=l5['depth'] * fd * rng.uniform(0.98, 1.05), width=l5['width'] * fw,
                    disc=_FUSED_GAP_MM, canal_depth=max(13.0 - 2.5 * k, 4.0), canal_width=max(24.0 - 3.5 * k, 8.0),
                    lamina=max(6.0 - k, 3.0), region='sacral', segment=k + 1, segments=len(scales)))
  return out


def _draw_range(rng: np.random.Generator, bounds) -> float:
  """A uniform draw from (lo, hi); a degenerate range draws nothing, so the random stream stays as it was."""
  lo, hi = (float(b) for b in bounds)
  return lo if lo == hi else float(rng.uniform(lo, hi))


def _apply_forms(plan: ColumnPlan, pieces: list, rng: np.random.Generator, cfg) -> None:
  """Transitional shapes: rib lengths of the last thoracic levels, the lumbosacral junction's costal processes
  and rudimentary disc. Typical spines with the default rib ranges draw nothing."""
  by_name = {p.name: p for p in pieces}
  for p in pieces:
    if p.dims['region'] == 'thoracic':
      p.dims['rib'] = 1.0
  last_rib = by_name[f'T{min(plan.thoracic, 12)}']
  last_rib.dims['rib'] = _draw_range(rng, cfg.get('last_rib_length_range', (1.0, 1.0)))
  if 'T13' in by_name:
    by_name['T13'].form = 't13'
    by_name['T13'].dims['rib'] = _draw_range(rng, cfg.get('t13_rib_length_range', (1.0, 1.0)))
  if plan.lumbosacral == 'typical':
    return
  last = by_name[f'L{plan.lumbar}']
  last.form = plan.lumbosacral
  if plan.lumbosacral == 'l6':
    return
  last.dims['disc'] *= rng.uniform(*_RUDIMENTARY_DISC)
  last.dims['disc_below'] = 'rudimentary'
  last.dims['costal'] = 'alar' if plan.lumbosacral == 'sacralised_l5' else 'broad'
  if plan.lumbosacral == 'lumbarised_s1':
    last.dims['height'] *= rng.uniform(0.88, 0.96)  # the freed segment: squarer and lower than a lumbar body


# ---------------------------------------------------------------------------------------------
# The spine's curve and the vertebrae's frames


class Frame:
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
class Piece:
  """One drawn bone of the column: a vertebra (C1 .. L6), or a sacral segment."""
  name: str  # level ('C1'.. 'S1'), or 'S2'..'S5' for the lower sacral segments
  ident: int  # SPINEPS instance id (26 for every sacral segment)
  kind: str  # 'atlas', 'vertebra' or 'sacral'
  dims: dict
  s: float  # arc length of the body's centre
  frame: Frame | None = None
  form: str = 'typical'  # or 't13', or the last lumbar's LUMBOSACRAL_FORMS


def draw_pieces(rng: np.random.Generator, cfg) -> tuple[list[Piece], ColumnPlan]:
  """The whole column for one patient with arc positions (body centres; discs between), and its plan."""
  plan = draw_column(rng, column_rates(cfg))
  names = plan.levels
  scale = rng.uniform(*cfg.size_scale_range)
  dims = {n: level_dims(n, scale, rng) for n in names if n not in ('C1', 'S1')}
  pieces = [Piece('C1', vertebra_id('C1'), 'atlas', _c1_dims(dims['C2']), 0.0)]
  pieces += [Piece(n, vertebra_id(n), 'vertebra', dims[n], 0.0) for n in names[1:-1]]
  last_lumbar = dims[names[-2]]
  first = 1 if plan.lumbosacral == 'lumbarised_s1' else 0  # its S1 is the L6 above
  for k, d in enumerate(_sacral_dims(last_lumbar, rng, first)):
    pieces.append(Piece(f'S{k + 1}', vertebra_id('S1'), 'sacral', d, 0.0))
  _apply_forms(plan, pieces, rng, cfg)
  if cfg.get('sacral_alae', False):
    next(p for p in pieces if p.kind == 'sacral').dims['alae'] = True
  for prev, cur in zip(pieces[:-1], pieces[1:]):
    cur.s = prev.s + prev.dims['height'] / 2 + prev.dims['disc'] + cur.dims['height'] / 2
  for k, p in enumerate(pieces):  # neighbours' disc heights, for the articular processes
    p.dims['disc_above'] = pieces[k - 1].dims['disc'] if k else _C1_GAP_MM
    p.dims['vc'] = p.dims['depth'] / 2 + p.dims['canal_depth'] / 2 - 2.5  # canal centre behind the body's
  return pieces, plan


def _curvature(pieces: list[Piece], s: np.ndarray, angles_deg: dict) -> np.ndarray:
  """Curvature (rad/mm, positive = lordosis) along arc length s: each region's angle spread over its length."""
  by_name = {p.name: p for p in pieces}
  last_t = [p.name for p in pieces if p.dims['region'] == 'thoracic'][-1]

  def below(name):
    p = by_name[name]
    return p.s + p.dims['height'] / 2 + p.dims['disc'] / 2

  s_c2, s_ct, s_tl = by_name['C2'].s, below('C7'), below(last_t)
  s_sac = by_name['S1'].s - by_name['S1'].dims['height'] / 2
  s_end = pieces[-1].s + pieces[-1].dims['height'] / 2
  k = np.full(s.shape, np.deg2rad(angles_deg['cervical']) / (s_ct - s_c2))
  k[s >= s_ct] = -np.deg2rad(angles_deg['thoracic']) / (s_tl - s_ct)
  lumbar = (s >= s_tl) & (s < s_sac)  # most of the lordosis is at L4-S1: weight rising 0.4 -> 1.6
  k[lumbar] = np.deg2rad(angles_deg['lumbar']) / (s_sac - s_tl) * (0.4 + 1.2 * (s[lumbar] - s_tl) / (s_sac - s_tl))
  k[s >= s_sac] = -np.deg2rad(angles_deg['sacral']) / (s_end - s_sac)
  k[s >= s_end] = 0.0
  return k


@dataclasses.dataclass
class Curve:
  """The body-centre line: arc length s, tangent angle phi (rad, + leaning posteriorly), points (p, i, r) mm."""
  s: np.ndarray
  phi: np.ndarray
  p: np.ndarray
  i: np.ndarray
  r: np.ndarray

  def at(self, values, s_query):
    return np.interp(s_query, self.s, values)


FIELD_KINDS = ('cervical', 'thoracic', 'lumbar', 'whole')


def field_kind(has_c2: bool, has_sacrum: bool) -> str:
  """A field's kind by its anchors: 'cervical' (C2, no sacrum), 'lumbar' (sacrum, no C2), 'whole' (both), 'thoracic'."""
  return ('whole' if has_sacrum else 'cervical') if has_c2 else ('lumbar' if has_sacrum else 'thoracic')


def draw_field_kind(rng: np.random.Generator, weights) -> str:
  """A kind from `field_kind_weights` (a mapping over FIELD_KINDS; missing kinds weigh 0)."""
  unknown = sorted(set(weights) - set(FIELD_KINDS))
  w = np.array([float(weights.get(k, 0.0)) for k in FIELD_KINDS])
  if unknown or w.min() < 0 or w.sum() <= 0:
    raise ValueError(f'phantom config field_kind_weights: need non-negative weights over {", ".join(FIELD_KINDS)} '
                     f'with a positive sum, got {dict(weights)}')
  return FIELD_KINDS[int(rng.choice(len(FIELD_KINDS), p=w / w.sum()))]


def _kind_run(rng, kind: str, last: int, cfg) -> tuple[int, int]:
  """(first, last) index into the column C2 .. S1 (S1 at `last`) of a kind's complete vertebrae.

  Fields without C2 start at C4 or below (C3, the vertebra above, is cut); fields without the sacrum end
  two levels above it (the vertebra below is cut and is not the sacrum).
  """
  if kind == 'whole':
    return 0, last
  if kind == 'lumbar':
    lo, hi = cfg.get('lumbar_num_vertebrae_range') or (None, None)
    if lo is None:
      raise ValueError('phantom config: lumbar fields (field_kind_weights.lumbar) need lumbar_num_vertebrae_range')
    n = int(rng.integers(lo, hi + 1))
    return max(last - n + 1, 2), last
  n = int(rng.integers(cfg.num_vertebrae_range[0], cfg.num_vertebrae_range[1] + 1))
  n = int(np.clip(n, 1, last - 3))
  first = 0 if kind == 'cervical' else int(rng.integers(2, last - n))
  return first, first + n - 1


def field_window(rng, pieces, cfg) -> tuple[float, float, list[int], str | None]:
  """Arc-length window (top, bottom) of the field, the indices of its complete vertebrae, and its drawn kind.

  With `field_kind_weights` in the config the kind is drawn first and the run of vertebrae fits it;
  without, the top level comes from `top_level_choices` and the kind is None (it follows from the content).
  """
  column = [k for k, p in enumerate(pieces) if p.kind != 'sacral' or p.name == 'S1'][1:]  # C2 .. S1
  names = [pieces[k].name for k in column]
  weights = cfg.get('field_kind_weights')
  if weights:
    kind = draw_field_kind(rng, weights)
    first, stop = _kind_run(rng, kind, len(column) - 1, cfg)
    full = column[first:stop + 1]
  else:
    kind = None
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
  return a.s - a.dims['height'] / 2 - m_top, b.s + b.dims['height'] / 2 + m_bot, full, kind


def make_curve(rng, pieces, cfg, window, tilt_deg: float | None = None) -> Curve:
  """Integrate the curvature; the mean tangent over the window's mobile spine (above S1) leans by a random tilt
  of up to `tilt_deg` (default: the config's)."""
  s = np.arange(pieces[0].s - 80.0, pieces[-1].s + 120.0, _STEP_MM)
  angles = dict(cervical=rng.uniform(*cfg.cervical_lordosis_deg), thoracic=rng.uniform(*cfg.thoracic_kyphosis_deg),
                lumbar=rng.uniform(*cfg.lumbar_lordosis_deg), sacral=rng.uniform(*cfg.sacral_kyphosis_deg))
  phi = np.cumsum(_curvature(pieces, s, angles)) * _STEP_MM
  s1 = next(p for p in pieces if p.name == 'S1')
  inside = (s >= window[0]) & (s <= min(window[1], s1.s - s1.dims['height'] / 2))
  if not inside.any():  # a field of the sacrum alone
    inside = (s >= window[0]) & (s <= window[1])
  tilt = cfg.tilt_deg if tilt_deg is None else tilt_deg
  phi += np.deg2rad(rng.uniform(-1, 1) * tilt) - phi[inside].mean()
  p = np.cumsum(np.sin(phi)) * _STEP_MM
  i = np.cumsum(np.cos(phi)) * _STEP_MM
  wave = rng.uniform(-1, 1) * cfg.scoliosis_mm * np.sin(2 * np.pi * s / rng.uniform(300, 600) + rng.uniform(0, 6.3))
  r = rng.uniform(-1, 1) * cfg.lateral_shift_mm + wave
  return Curve(s, phi, p, i, r)


# ---------------------------------------------------------------------------------------------

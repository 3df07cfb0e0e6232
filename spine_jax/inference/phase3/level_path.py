"""The level path: the labelling network's softmaxes per vertebra (top to bottom) -> one SPINEPS id per vertebra.

SPINEPS 2.1.3 (`phase_labeling.find_vert_path_from_predictions`, `utils/find_min_cost_path`) in three steps:
1. `cost_matrix`: every head becomes one score per (vertebra, class) on the VERT axis (24 classes, a T13 as a
   repeated T12, an L6 as a repeated L5) or the VERTEXACT axis (26, T13 and L6 classes of their own); VERTREL
   and VERTT13 become terms that the path adds at region boundaries and at a repeated T12.
2. `min_cost_path`: the cheapest path that moves one class down per vertebra, with the allowed repeats and skips.
3. `post_process`: classes -> SPINEPS ids (T12, T12 -> T12, T13 = 28; a trailing L5, L5 -> L5, L6 = 25).
`solve` runs all three. `dens_forced_indices` is SPINEPS' dens rule that pins C2 (and C1 above it).
`force_last_lumbar_index` is ours (the sacrum anchor of inference/phase3/naming.py, not in SPINEPS): the vertebra
resting on the sacrum is the last lumbar one, L5 (or an L6, a repeated L5 on the 24-class axis).

Parity with SPINEPS is the point (tests/inference/test_level_path_vs_spineps.py), so the arithmetic follows
SPINEPS' order and scalar types: the heads keep their dtype (a float32 softmax is smoothed in float32), the path's
costs are Python floats and the VERTREL and VERTT13 terms numpy scalars, because NumPy rounds `float + float32`
in float32, and a tie goes to SPINEPS' first option only where both sides hold the same bits. SPINEPS' solver
is a memoised recursion whose best sub-path per (vertebra, class) is kept even where it breaks the two-repeat
limit (that cell is then lost, not re-chosen); `min_cost_path` is the same table filled bottom-up.
The module is over 400 lines because the three steps and their checks only make sense together.
"""
from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

from spine_jax.data import level_classes as lc
from spine_jax.data import levels as levels_lib

HeadError = lc.HeadError

C1_CLASS = lc.VERT_CLASSES.index('C1')
C2_CLASS = lc.VERT_CLASSES.index('C2')
T11_CLASS = lc.VERT_CLASSES.index('T11')  # eleven thoracic vertebrae: the 24-class path may skip T12
T12_CLASS = lc.VERT_CLASSES.index('T12')  # a T13: the 24-class path repeats T12
L5_CLASS = lc.VERT_CLASSES.index('L5')  # an L6: the 24-class path repeats L5
L5_EXACT_CLASS = lc.VERTEXACT_CLASSES.index('L5')
L6_EXACT_CLASS = lc.VERTEXACT_CLASSES.index('L6')
T12_EXACT_CLASS = lc.VERTEXACT_CLASSES.index('T12')
T13_EXACT_CLASS = lc.VERTEXACT_CLASSES.index('T13')
L6_ID = levels_lib.level_to_label('L6', 'spineps')
MAX_REPEATS = 2  # a repeatable class appears at most twice in a path
FORCED_LABEL_SCORE = 1e6  # a forced C1/C2 (or last lumbar) row's score: beats any path of softmax scores
MIN_DENS_VOLUME_MM3 = 250.0  # dens overlap above which an instance is C2
_DIVIDE_BY_ZERO_OFFSET = 1e-8
# SPINEPS' fixed Gaussian radii (in classes or vertebrae) and the visibility chain's sigma (in vertebrae).
_CLASS_RADIUS, _REGION_RADIUS, _VERTREL_RADIUS, _VISIBLE_RADIUS, _VISIBLE_SIGMA = 2, 1, 1, 2, 0.8
_VISIBLE = lc.FULLYVISIBLE_CLASSES.index('visible')
_T13_COLUMN = lc.VERTT13_CLASSES.index('T13')
METHOD = ('SPINEPS 2.1.3 phase_labeling.find_vert_path_from_predictions: weighted head softmaxes as a cost matrix, '
          'the min-cost monotone class path (utils/find_min_cost_path), fpath_post_processing')


def region_starts(n_classes: int) -> tuple[int, ...]:
  """The first class of the cervical, thoracic and lumbar regions on a 24- or 26-class axis."""
  return tuple(s.start for s in lc.REGION_SLICES[n_classes])


@dataclasses.dataclass(frozen=True)
class PathOptions:
  """find_vert_path_from_predictions' settings, with its defaults (as SPINEPS' pipeline calls it).

  `enforce_12_thoracic` is SPINEPS' `--enforce-12-thoracic` (`proc_lab_force_no_tl_anomaly`): no T13, no
  eleven thoracic vertebrae. `disable_c1` True (SPINEPS' models without C1) starts the path at C2.
  `force_c1_index` / `force_c2_index` pin a vertebra (its position, top = 0) to C1 / C2 (the dens rule,
  `dens_forced_indices`). `force_last_lumbar_index` pins a vertebra to the last lumbar level: L5 on the
  24-class axis (the one above may repeat it: an L6), L5 or L6 on the 26-class axis (the network's scores
  choose). `exact_classes` None picks the 26-class axis when a VERTEX/VERTEXACT head comes
  without a VERT head. `spineps_defects` True reproduces what SPINEPS gets wrong here: on the 26-class axis its
  `enforce_12_thoracic` makes T13 mandatory (no class may be skipped) instead of forbidding it."""
  visible_w: float = 0.5
  vert_w: float = 0.9
  vertgrp_w: float = 0.8
  region_w: float = 1.1
  vertrel_w: float = 0.6
  vertt13_w: float = 0.4
  disable_c1: bool = True
  boost_c2: float = 1.0
  allow_cervical_skip: bool = False
  allow_thoracic_skip: bool = False
  allow_lumbar_skip: bool = False
  punish_multiple_sequence: float = 0.0
  punish_skip_sequence: float = 0.0
  punish_skip_at_region_sequence: float = 0.0
  region_gaussian_sigma: float = 0.0
  vert_gaussian_sigma: float = 0.8
  vert_gaussian_regionwise: bool = True
  vertgrp_gaussian_sigma: float = 0.8
  vertgrp_gaussian_regionwise: bool = True
  vertrel_column_norm: bool = True
  vertrel_gaussian_sigma: float = 0.6
  enforce_12_thoracic: bool = False
  force_c1_index: int | None = None
  force_c2_index: int | None = None
  force_last_lumbar_index: int | None = None
  exact_classes: bool | None = None
  punish_skip_t12: float = 0.0
  punish_skip_t13: float = 0.0
  spineps_defects: bool = False

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.name.startswith('force_'):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0):
          raise ValueError(f'PathOptions.{field.name}: a vertebra position (0 = top) or None, got {value!r}')
      elif field.type == 'float' and not (isinstance(value, numbers.Real) and np.isfinite(value)):
        raise ValueError(f'PathOptions.{field.name}: a finite number, got {value!r}')
    for name in ('visible_w', 'vert_w', 'region_w', 'vertrel_w', 'boost_c2'):  # SPINEPS asserts these
      if getattr(self, name) < 0:
        raise ValueError(f'PathOptions.{name}: must be >= 0, got {getattr(self, name)}')
    if self.visible_w > 1:
      raise ValueError(f'PathOptions.visible_w: must be <= 1, got {self.visible_w}')
    forced = [(name, i) for name in ('force_c1_index', 'force_c2_index', 'force_last_lumbar_index')
              if (i := getattr(self, name)) is not None]
    for k, (name, index) in enumerate(forced):
      for other, other_index in forced[k + 1:]:
        if index == other_index:
          raise ValueError(f'PathOptions: {name} and {other} are both vertebra {index}')


@dataclasses.dataclass(frozen=True, eq=False)
class LevelPath:
  """One solved spine: `ids` (SPINEPS ids, top to bottom), the path's `cost` (lower is better), the raw class
  path `classes` on the axis that `exact_classes` names, the cost matrix `costs` (vertebrae x classes, higher is
  preferred), each vertebra's head probabilities as read (canonical head names), the options and the method."""
  ids: tuple[int, ...]
  cost: float
  classes: tuple[int, ...]
  exact_classes: bool
  costs: np.ndarray
  probabilities: tuple[Mapping[str, np.ndarray], ...]
  options: PathOptions
  method: str = METHOD

  @property
  def levels(self) -> tuple[str, ...]:
    """Level names (C2, ..., T13, L6) of `ids`."""
    return tuple(levels_lib.label_to_level(i, 'spineps') for i in self.ids)


# --- Reading the network's outputs. ---------------------------------------------------------------------------


def _vector(value, where: str) -> np.ndarray:
  """A head's probabilities: float32 and float64 stay as given (SPINEPS computes in their dtype), others float64."""
  try:
    array = np.asarray(value)
    if array.dtype not in (np.float32, np.float64):
      array = array.astype(np.float64)
  except (TypeError, ValueError) as error:
    raise ValueError(f'{where}: not a vector of probabilities ({error})') from None
  if array.ndim != 1:
    raise HeadError(f'{where}: a vector of class probabilities, got shape {array.shape}')
  if not np.all(np.isfinite(array)):
    raise ValueError(f'{where}: probabilities must be finite')
  return array


def read_predictions(predictions) -> list[dict[str, np.ndarray]]:
  """Per vertebra (top to bottom), {canonical head name: probabilities}; HeadError or ValueError naming the
  vertebra and head for an empty list, an unknown or missing head, a wrong size or a non-finite value."""
  if isinstance(predictions, (Mapping, str, bytes)) or not isinstance(predictions, Sequence):
    raise ValueError('predictions: a list (top to bottom) of {head name: softmax vector}, one per vertebra; '
                     f'got {type(predictions).__name__}')
  if not predictions:
    raise ValueError('predictions: no vertebrae to label')
  out = []
  for i, heads in enumerate(predictions):
    if not isinstance(heads, Mapping) or not heads:
      raise ValueError(f'predictions[{i}]: a {{head name: softmax vector}} mapping, got {heads!r:.80}')
    vertebra = {}
    for name, value in heads.items():
      key = lc.canonical_head(name)
      if key in vertebra:
        raise HeadError(f'predictions[{i}]: head {key} given twice ({name!r} and an alias)')
      vertebra[key] = _vector(value, f'predictions[{i}] head {name}')
    try:
      lc.check_heads([(key, len(v)) for key, v in vertebra.items()])
    except HeadError as error:
      raise HeadError(f'predictions[{i}]: {error}') from None
    if out and set(vertebra) != set(out[0]):
      raise HeadError(f'predictions[{i}]: heads {sorted(vertebra)}, but vertebra 0 has {sorted(out[0])}')
    out.append(vertebra)
  return out


# --- 1. The cost matrix (phase_labeling's prepare_* functions). -----------------------------------------------


def _smoothed(values: np.ndarray, sigma: float, regionwise: bool, slices, radius: int = _CLASS_RADIUS) -> np.ndarray:
  """prepare_vert: a Gaussian along the classes, within each region or across them, then a sum of one."""
  values = values.copy()
  if sigma > 0.0:
    if regionwise:
      for s in slices:
        values[s] = ndimage.gaussian_filter1d(values[s], sigma=sigma, mode='nearest', radius=radius)
    else:
      values = ndimage.gaussian_filter1d(values, sigma=sigma, mode='nearest', radius=radius)
  values /= np.sum(values) + _DIVIDE_BY_ZERO_OFFSET
  return values


def _exact_on_vert_axis(values: np.ndarray, sigma: float, regionwise: bool) -> np.ndarray:
  """prepare_vertexact: a 26-class vector folded onto the 24-class axis (T13 into T12, L6 into L5)."""
  values = values.copy()
  values[lc.VERTEXACT_CLASSES.index('T12')] += values[T13_EXACT_CLASS]
  values[lc.VERTEXACT_CLASSES.index('L5')] += values[lc.VERTEXACT_CLASSES.index('L6')]
  values = np.delete(values, [T13_EXACT_CLASS, lc.VERTEXACT_CLASSES.index('L6')], axis=0)
  return _smoothed(values, sigma, regionwise, lc.REGION_SLICES[len(lc.VERT_CLASSES)])


def _groups_on_vert_axis(values: np.ndarray, sigma: float, regionwise: bool) -> np.ndarray:
  """prepare_vertgrp: each group's probability given to every member class."""
  spread = np.zeros(len(lc.VERT_CLASSES))
  for group, members in enumerate(lc.VERTGRP_MEMBERS):
    spread[list(members)] = values[group]
  return _smoothed(spread, sigma, regionwise, lc.REGION_SLICES[len(lc.VERT_CLASSES)])


def _regions_on_axis(values: np.ndarray, sigma: float, n_classes: int) -> np.ndarray:
  """prepare_region: each region's probability given to its classes."""
  spread = np.zeros(n_classes)
  for region, s in enumerate(lc.REGION_SLICES[n_classes]):
    spread[s] = values[region]
  if sigma > 0.0 and np.sum(spread) > 0.0:
    spread = ndimage.gaussian_filter1d(spread, sigma=sigma, mode='nearest', radius=_REGION_RADIUS)
  spread /= np.sum(spread) + _DIVIDE_BY_ZERO_OFFSET
  return spread


def _visible_chain(vertebrae, visible_w: float) -> np.ndarray:
  """prepare_visible: a weight per vertebra that lowers the scores of vertebrae the field cuts (and their
  neighbours'), from FULLYVISIBLE's 'visible' probability, smoothed along the spine and rounded to 3 decimals."""
  if lc.FULLYVISIBLE in vertebrae[0]:
    chain = np.asarray([v[lc.FULLYVISIBLE][_VISIBLE] for v in vertebrae])
  else:
    chain = np.ones(len(vertebrae))
  chain = ndimage.gaussian_filter1d(chain, sigma=_VISIBLE_SIGMA, mode='constant', radius=_VISIBLE_RADIUS)
  chain = 1 - np.round(chain, 3)
  return np.clip(1 - np.multiply(chain, visible_w), 0, 1)


def _vertrel_columns(matrix: np.ndarray, sigma: float) -> np.ndarray:
  """prepare_vertrel_columns: each boundary's column smoothed along the spine and scaled to a sum below one."""
  for i in range(1, min(len(lc.VERTREL_CLASSES), matrix.shape[1])):
    if sigma > 0.0 and np.sum(matrix) > 0.0:
      matrix[:, i] = ndimage.gaussian_filter1d(matrix[:, i], sigma=sigma, mode='nearest', radius=_VERTREL_RADIUS)
    total = np.sum(matrix[:, i]) + _DIVIDE_BY_ZERO_OFFSET
    if total > 1.0:
      matrix[:, i] = matrix[:, i] / total
    elif total < 1.0:
      matrix[:, i] = matrix[:, i] / (1.0 + total)
  return matrix


def _stacked(vertebrae, head: str, n_columns: int) -> np.ndarray:
  if head in vertebrae[0]:
    return np.asarray([v[head] for v in vertebrae])
  return np.zeros((len(vertebrae), n_columns))


def cost_matrix(predictions, options: PathOptions | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
  """(costs, relative_costs, t13_costs, exact_classes) as find_vert_path_from_predictions builds them.

  costs (vertebrae x 24 or 26): per vertebra the weighted sum of the VERT (or, on the 26-class axis, the
  VERTEX/VERTEXACT), VERTEX folded, VERTGRP spread and REGION spread terms, summed to one, times `boost_c2`
  where C2 is its best class, times the visibility weight; forced rows are FORCED_LABEL_SCORE at C1/C2 and 0
  elsewhere (a forced last lumbar row: its own score + FORCED_LABEL_SCORE at L5, and L6 on the 26-class axis).
  Higher is preferred. relative_costs (vertebrae x 6): -vertrel_w x VERTREL (column-normalised).
  t13_costs (vertebrae x 2): -vertt13_w x VERTT13 (its T13 column normalised to a sum of one). On the 24-class
  axis only a head named VERTEX adds the folded 26-class term, as in SPINEPS."""
  options = PathOptions() if options is None else options
  vertebrae = read_predictions(predictions)
  heads, n = set(vertebrae[0]), len(vertebrae)
  exact_head = next((k for k in lc.EXACT_HEADS if k in heads), None)
  exact = options.exact_classes
  if exact is None:
    exact = exact_head is not None and lc.VERT not in heads
  if exact and exact_head is None:
    raise HeadError(f'exact_classes needs a {" or ".join(lc.EXACT_HEADS)} head; heads: {", ".join(sorted(heads))}')
  for name in ('force_c1_index', 'force_c2_index', 'force_last_lumbar_index'):
    index = getattr(options, name)
    if index is not None and index >= n:
      raise ValueError(f'PathOptions.{name}: vertebra {index}, but there are {n} vertebrae')
  n_classes = len(lc.VERTEXACT_CLASSES if exact else lc.VERT_CLASSES)
  slices = lc.REGION_SLICES[n_classes]
  o = options

  visible = _visible_chain(vertebrae, o.visible_w)
  vertrel = _stacked(vertebrae, lc.VERTREL, len(lc.VERTREL_CLASSES))
  if o.vertrel_column_norm:
    vertrel = _vertrel_columns(vertrel, o.vertrel_gaussian_sigma)
  vertt13 = _stacked(vertebrae, lc.VERTT13, len(lc.VERTT13_CLASSES))
  for i in range(1, min(len(lc.VERTT13_CLASSES), vertt13.shape[1])):  # prepare_vertt13_columns
    vertt13[:, i] = vertt13[:, i] / (np.sum(vertt13[:, i]) + _DIVIDE_BY_ZERO_OFFSET)
  t13_costs = np.multiply(-vertt13, o.vertt13_w)

  costs = np.zeros((n, n_classes))
  relative = np.zeros((n, len(lc.VERTREL_CLASSES)))
  for idx, v in enumerate(vertebrae):
    if exact:
      level = v[exact_head]
    else:
      level = v[lc.VERT] if lc.VERT in heads else np.zeros(len(lc.VERT_CLASSES))
    score = np.add(_regions_on_axis(v[lc.REGION] if lc.REGION in heads else np.zeros(len(lc.REGIONS)),
                                    o.region_gaussian_sigma, n_classes) * o.region_w,
                   np.multiply(_smoothed(level, o.vert_gaussian_sigma, o.vert_gaussian_regionwise, slices), o.vert_w))
    if exact:
      folded = groups = np.zeros(n_classes)
    else:
      vertex = v[lc.VERTEX] if lc.VERTEX in heads else np.zeros(len(lc.VERTEXACT_CLASSES))
      folded = np.multiply(_exact_on_vert_axis(vertex, o.vert_gaussian_sigma, o.vert_gaussian_regionwise), o.vert_w)
      group = v[lc.VERTGRP] if lc.VERTGRP in heads else np.zeros(len(lc.VERTGRP_CLASSES))
      groups = np.multiply(_groups_on_vert_axis(group, o.vertgrp_gaussian_sigma, o.vertgrp_gaussian_regionwise),
                           o.vertgrp_w)
    score = np.add(np.add(score, folded), groups)
    score /= np.sum(score) + _DIVIDE_BY_ZERO_OFFSET
    if o.boost_c2 > 0.0 and np.argmax(score) == C2_CLASS:
      score = np.multiply(score, o.boost_c2)
    costs[idx] = np.multiply(score, visible[idx])
    relative[idx] = vertrel[idx].copy()
  for index, cls in ((o.force_c2_index, C2_CLASS), (o.force_c1_index, C1_CLASS)):  # C1 last, as SPINEPS
    if index is not None:
      costs[index, :] = 0.0
      costs[index, cls] = FORCED_LABEL_SCORE
  if o.force_last_lumbar_index is not None:
    row = costs[o.force_last_lumbar_index]
    allowed = [L5_EXACT_CLASS, L6_EXACT_CLASS] if exact else [L5_CLASS]
    kept = row[allowed] + FORCED_LABEL_SCORE
    row[:] = 0.0
    row[allowed] = kept
  return costs, np.multiply(-relative, o.vertrel_w), t13_costs, bool(exact)


# --- 2. The min-cost path (utils/find_min_cost_path.find_most_probably_sequence). -----------------------------


def _matrix(value, name: str, rows: int, min_columns: int) -> np.ndarray:
  array = np.asanyarray(value)
  if array.ndim != 2 or array.shape[0] != rows or array.shape[1] < min_columns:
    raise ValueError(f'{name}: expected {rows} rows and {min_columns} columns, got shape {array.shape}')
  if not np.all(np.isfinite(array)):
    raise ValueError(f'{name}: values must be finite')
  return array


def min_cost_path(cost, min_start_class: int = 0, region_rel_cost=None, vertt13_cost=None,
                  regions: Sequence[int] | None = None, invert_cost: bool = True,
                  allow_multiple_at_class: Sequence[int] | None = None, punish_multiple_sequence: float = 0.0,
                  allow_skip_at_class: Sequence[int] | None = None, punish_skip_sequence: float = 0.0,
                  allow_skip_at_region: Sequence[int] | None = None, punish_skip_at_region_sequence: float = 0.2,
                  skippable_classes: Sequence[int] | None = None,
                  punish_skip_class: Mapping[int, float] | float = 0.0,
                  excluded_classes: Sequence[int] | None = None) -> tuple[float, list[int]]:
  """(cost, class per vertebra) of find_most_probably_sequence's path, with its parameters and defaults.

  `cost` (vertebrae x classes; negated first when `invert_cost`, so that high scores are preferred). A path
  starts at any class >= `min_start_class` and goes one row down per step: to the next class; to the same class
  for one in `allow_multiple_at_class` (at most twice; + `punish_multiple_sequence`, + the next row's
  `vertt13_cost[:, 1]` at T12); two classes on from one in `allow_skip_at_class` (+ `punish_skip_sequence`) or
  from a class of a region in `allow_skip_at_region` other than the region's second-to-last (+
  `punish_skip_at_region_sequence`); over a run of `skippable_classes` (+ `punish_skip_class` per skipped
  class). No path visits `excluded_classes` (not a SPINEPS parameter: the 26-class axis without T13 when
  twelve thoracic vertebrae are enforced). `region_rel_cost` (vertebrae x 2 per region: first, last) is added where a vertebra is its region's
  first class and where the path's next class lies in a later region (never the cervical 'first' column).

  Each cell (vertebra, class) keeps the best next step by the steps' costs alone (the region-boundary term of
  the cell itself is added after the choice), the first one on a tie in the order above, and a cell whose
  best sub-path holds a repeatable class three times is lost: SPINEPS' memoised recursion. ValueError where no
  path fits (more vertebrae than the axis and its repeats allow)."""
  cost = np.asarray(cost)
  if cost.dtype.kind != 'f':
    cost = cost.astype(np.float64)
  if cost.ndim != 2 or 0 in cost.shape:
    raise ValueError(f'cost: a (vertebrae, classes) matrix, got shape {cost.shape}')
  if not np.all(np.isfinite(cost)):
    raise ValueError('cost: values must be finite')
  n, n_classes = cost.shape
  if not 0 <= min_start_class < n_classes:
    raise ValueError(f'min_start_class: {min_start_class} is not a class of {n_classes}')
  regions = list(region_starts(len(lc.VERT_CLASSES)) if regions is None else regions)
  if not regions or regions[0] != 0 or any(b <= a for a, b in zip(regions, regions[1:])) or regions[-1] >= n_classes:
    raise ValueError(f'regions: increasing region starts from 0 below {n_classes} classes, got {regions}')
  multiple = set([T12_CLASS, L5_CLASS] if allow_multiple_at_class is None else allow_multiple_at_class)
  skip_at_class = set([T11_CLASS] if allow_skip_at_class is None else allow_skip_at_class)
  skip_at_region = set([0] if allow_skip_at_region is None else allow_skip_at_region)
  skippable = set(skippable_classes or ())
  excluded = set(excluded_classes or ())
  if not isinstance(punish_skip_class, Mapping):
    punish_skip_class = dict.fromkeys(skippable, float(punish_skip_class))
  if region_rel_cost is not None:
    region_rel_cost = _matrix(region_rel_cost, 'region_rel_cost', n, 2 * len(regions))
    if region_rel_cost.shape[1] != 2 * len(regions):
      raise ValueError(f'region_rel_cost: {2 * len(regions)} columns (first, last per region), '
                       f'got {region_rel_cost.shape[1]}')
  if vertt13_cost is not None:
    vertt13_cost = _matrix(vertt13_cost, 'vertt13_cost', n, 2)

  bounds = [*regions, n_classes]
  region_of = [next(k for k in range(len(regions)) if c < bounds[k + 1]) for c in range(n_classes)]
  costlist = (-cost if invert_cost else cost).tolist()

  def boundary_cost(r: int, c: int, nxt: int):
    """rel_cost: the 'first of region' column where c opens its region, the 'last' one where nxt is beyond it."""
    add = 0
    if region_rel_cost is None:
      return add
    region = region_of[c]
    for last in (0, 1):
      if region + last == 0:
        continue
      value = region_rel_cost[r][region * 2 + last]
      if value == 0:
        continue
      if last == 0 and c == bounds[region]:
        add += value
      elif last == 1 and region_of[nxt] >= region + 1:
        add += value
    return add

  # best[r][c]: (cost from here to the bottom, next class, how many times c opens that sub-path) or None.
  best = [[None] * n_classes for _ in range(n)]
  best[n - 1] = [None if c in excluded else (costlist[n - 1][c] + boundary_cost(n - 1, c, c), None, 1)
                 for c in range(n_classes)]
  for r in range(n - 2, -1, -1):
    below = best[r + 1]
    for c in range(n_classes):
      if c in excluded:
        continue
      options = []

      def offer(nxt: int, extra, options=options, below=below):
        if nxt < n_classes and below[nxt] is not None:
          options.append((below[nxt][0] + extra, nxt))

      offer(c + 1, 0)
      if c in multiple:
        extra = punish_multiple_sequence
        if c == T12_CLASS:
          extra += 0 + vertt13_cost[r + 1][_T13_COLUMN] if vertt13_cost is not None else 0
        offer(c, extra)
      if c in skip_at_class:
        offer(c + 2, punish_skip_sequence)
      region = region_of[c]
      if region in skip_at_region and c != bounds[region + 1] - 2:
        offer(c + 2, punish_skip_at_region_sequence)
      extra, nxt = 0.0, c + 1
      while nxt in skippable and nxt < n_classes:
        extra += punish_skip_class.get(nxt, 0.0)
        if nxt + 1 not in skippable:
          offer(nxt + 1, extra)
        nxt += 1
      if not options:
        continue
      values = [value for value, _ in options]
      minimum = min(values)
      nxt = options[values.index(minimum)][1]
      run = below[nxt][2] + 1 if nxt == c else 1
      if c in multiple and run > MAX_REPEATS:
        continue
      total = minimum + costlist[r][c]
      total += boundary_cost(r, c, nxt)
      best[r][c] = (total, nxt, run)

  starts = [(best[0][c][0] + 0, c) for c in range(min_start_class, n_classes) if best[0][c] is not None]
  if not starts:
    raise ValueError(f'no level path fits {n} vertebrae on {n_classes} classes from class {min_start_class} '
                     'with these repeats and skips')
  values = [value for value, _ in starts]
  total = min(values)
  path = [starts[values.index(total)][1]]
  for r in range(n - 1):
    path.append(best[r][path[-1]][1])
  return float(total), path


# --- 3. Classes to ids (phase_labeling.fpath_post_processing). -------------------------------------------------


def post_process(path: Sequence[int], exact_classes: bool) -> list[int]:
  """SPINEPS ids of a class path: on the 26-class axis one id per class; on the 24-class axis class + 1, the
  second of two T12s T13 (28) and a trailing second L5 L6 (25)."""
  n_classes = len(lc.VERTEXACT_CLASSES if exact_classes else lc.VERT_CLASSES)
  path = [int(c) for c in path]
  if any(not 0 <= c < n_classes for c in path):
    raise ValueError(f'path: classes must lie in 0..{n_classes - 1}, got {path}')
  if exact_classes:
    return [lc.vertexact_to_id(c) for c in path]
  ids = [c + 1 for c in path]
  if T12_CLASS in path:
    first = path.index(T12_CLASS)
    if first + 1 < len(path) and path[first + 1] == T12_CLASS:
      ids[first + 1] = lc.T13_ID
  if len(path) >= 2 and path[-1] == path[-2] == L5_CLASS:
    ids[-1] = L6_ID
  return ids


# --- The whole step, and the dens rule. ------------------------------------------------------------------------


def solver_arguments(options: PathOptions, exact_classes: bool) -> dict:
  """min_cost_path's arguments (other than the matrices) as find_vert_path_from_predictions sets them (but for
  `enforce_12_thoracic` on the 26-class axis without `spineps_defects`)."""
  excluded = None
  if exact_classes:  # T13 and L6 are classes: nothing repeats; omitting T13 (or T12 and T13) is the anomaly
    multiple, skip_at_class = [], []
    skippable = [T12_EXACT_CLASS, T13_EXACT_CLASS]
    if options.enforce_12_thoracic and options.spineps_defects:
      skippable = []  # SPINEPS: then every path that reaches L1 passes T13
    elif options.enforce_12_thoracic:
      skippable, excluded = [T13_EXACT_CLASS], [T13_EXACT_CLASS]  # T12 always, T13 never
    punish_skip_class = {T12_EXACT_CLASS: options.punish_skip_t12, T13_EXACT_CLASS: options.punish_skip_t13}
  else:
    multiple = [L5_CLASS] if options.enforce_12_thoracic else [T12_CLASS, L5_CLASS]
    skip_at_class = [] if options.enforce_12_thoracic else [T11_CLASS]
    skippable, punish_skip_class = None, 0.0
  skip_at_region = [k for k, allowed in enumerate(
      (options.allow_cervical_skip, options.allow_thoracic_skip, options.allow_lumbar_skip)) if allowed]
  return dict(min_start_class=C2_CLASS if options.disable_c1 else C1_CLASS, invert_cost=True,
              punish_multiple_sequence=options.punish_multiple_sequence,
              punish_skip_sequence=options.punish_skip_sequence,
              regions=list(region_starts(len(lc.VERTEXACT_CLASSES if exact_classes else lc.VERT_CLASSES))),
              allow_multiple_at_class=multiple, allow_skip_at_class=skip_at_class,
              allow_skip_at_region=skip_at_region,
              punish_skip_at_region_sequence=options.punish_skip_at_region_sequence,
              skippable_classes=skippable, punish_skip_class=punish_skip_class, excluded_classes=excluded)


def _frozen(array: np.ndarray) -> np.ndarray:
  array = np.array(array)
  array.setflags(write=False)
  return array


def solve(predictions, options: PathOptions | None = None) -> LevelPath:
  """The levels of a spine's vertebrae from the labelling network's softmaxes: `predictions` is a list, top to
  bottom, of {head name: softmax vector} (VERT, VERTEX/VERTEXACT, VERTGRP, REGION, VERTREL, VERTT13 or VT13,
  FULLYVISIBLE; at least one of VERT, VERTEX, VERTEXACT, VERTGRP)."""
  options = PathOptions() if options is None else options
  if not isinstance(options, PathOptions):
    raise ValueError(f'options: a PathOptions, got {type(options).__name__}')
  costs, relative, t13_costs, exact = cost_matrix(predictions, options)
  total, classes = min_cost_path(costs, region_rel_cost=relative, vertt13_cost=t13_costs,
                                 **solver_arguments(options, exact))
  probabilities = tuple({k: _frozen(v) for k, v in vertebra.items()} for vertebra in read_predictions(predictions))
  return LevelPath(ids=tuple(post_process(classes, exact)), cost=total, classes=tuple(classes), exact_classes=exact,
                   costs=_frozen(costs), probabilities=probabilities, options=options)


def dens_forced_indices(instance_ids: Sequence[int], dens_volumes_mm3: Sequence[float], *,
                        disable_c1: bool) -> tuple[int | None, int | None]:
  """(force_c1_index, force_c2_index) by perform_labeling_step's dens rule, for PathOptions.

  `instance_ids` top to bottom (as numbered, ascending), `dens_volumes_mm3` each one's overlap with the dens
  (semantic 'Dens_axis', within the corpus mask). Unless C1 is disabled, the instance with the largest overlap
  (the lowest id on a tie) is C2 when that overlap exceeds MIN_DENS_VOLUME_MM3, and the instance numbered one
  less, if there is one, C1; positions are in `instance_ids`."""
  ids = [int(i) for i in instance_ids]
  volumes = [float(v) for v in dens_volumes_mm3]
  if len(ids) != len(volumes):
    raise ValueError(f'dens_volumes_mm3: {len(volumes)} volumes for {len(ids)} instances')
  if len(set(ids)) != len(ids) or any(i < 1 for i in ids):
    raise ValueError(f'instance_ids: distinct positive instance ids, got {ids}')
  if any(not np.isfinite(v) or v < 0 for v in volumes):
    raise ValueError(f'dens_volumes_mm3: finite volumes >= 0, got {volumes}')
  present = sorted((i, v) for i, v in zip(ids, volumes) if v > 0)
  if disable_c1 or not present:
    return None, None
  c2, volume = max(present, key=lambda item: item[1])
  if volume <= MIN_DENS_VOLUME_MM3:
    return None, None
  c1 = c2 - 1 if c2 != 1 else None
  return (ids.index(c1) if c1 in ids else None), ids.index(c2)

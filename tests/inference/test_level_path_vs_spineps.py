"""The level path (inference/phase3/level_path.py) against SPINEPS 2.1.3 itself, in one worker call:
`find_most_probably_sequence` on random and adversarial cost matrices of both class axes (24 and 26), and
`find_vert_path_from_predictions` (with its `fpath_post_processing`) on raw head softmaxes. Same path, same
ids, the cost to 1e-9 relative; where SPINEPS finds no whole path (its cost sys.maxsize), ours refuses."""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from spine_jax.data import level_classes as lc
from spine_jax.inference.phase3 import level_path as lp
from tests import spineps_oracle

N_SOLVER_CASES = 1000  # find_most_probably_sequence, half on each axis
N_PREDICTION_CASES = 250  # find_vert_path_from_predictions
NO_PATH_COST = 1e17  # SPINEPS' cost of a path through a lost cell: about sys.maxsize

# Whole spines (SPINEPS ids) with and without transitional anatomy.
_CERVICAL_THORACIC = list(range(1, 20))  # C1..T12
SPINES = {
    'normal': _CERVICAL_THORACIC + list(range(20, 25)),
    't13': _CERVICAL_THORACIC + [lc.T13_ID] + list(range(20, 25)),
    'l6': _CERVICAL_THORACIC + list(range(20, 26)),
    't13_l6': _CERVICAL_THORACIC + [lc.T13_ID] + list(range(20, 26)),
    'eleven_thoracic': list(range(1, 19)) + list(range(20, 25)),
}
ALL_HEADS = tuple(lc.HEAD_CLASSES)


def _window(rng, spine: list[int], long: bool = False) -> list[int]:
  """A run of a spine as a field of view shows it: from C1 or C2, or anywhere, and for `long` nearly whole."""
  n = len(spine)
  length = int(rng.integers(max(1, n - 3), n + 1)) if long else int(rng.integers(1, n + 1))
  start = int(rng.choice([0, 1, rng.integers(0, n - length + 1)])) if length < n else 0
  start = min(start, n - length)
  return spine[start:start + length]


def _sharp(rng, index: int, size: int, noise: float) -> np.ndarray:
  """A near-one-hot softmax: (1 - noise) at the index, the rest a Dirichlet draw."""
  values = noise * rng.dirichlet(np.full(size, 0.5))
  values[index] += 1.0 - noise
  return values


def _sequence_costs(rng, classes: list[int], n_classes: int) -> np.ndarray:
  noise = float(rng.choice([0.02, 0.2, 0.5]))
  return np.stack([_sharp(rng, c, n_classes, noise) for c in classes])


def _true_classes(ids: list[int], exact: bool) -> list[int]:
  return [lc.vertexact_class(v) if exact else lc.vert_class(v) for v in ids]


def _solver_case(rng, k: int, exact: bool) -> tuple[dict, dict]:
  """A random or adversarial matrix with solver arguments, as SPINEPS' phase_labeling or beyond it."""
  n_classes = 26 if exact else 24
  kind = ('dirichlet', 'sharp', 'ties', 'forced', 'single', 'long', 'zeros')[k % 7]
  spine = SPINES[list(SPINES)[int(rng.integers(len(SPINES)))]]
  if kind == 'dirichlet':
    n = int(rng.integers(1, 27))
    cost = rng.dirichlet(np.full(n_classes, float(rng.choice([0.1, 1.0]))), size=n)
  elif kind in ('sharp', 'long'):
    cost = _sequence_costs(rng, _true_classes(_window(rng, spine, long=kind == 'long'), exact), n_classes)
  elif kind == 'ties':  # few distinct values: equal options everywhere
    n = int(rng.integers(1, 27))
    cost = rng.choice([0.0, 0.5, 1.0], size=(n, n_classes))
  elif kind == 'forced':  # SPINEPS' forced C1/C2 rows over a sharp sequence
    cost = _sequence_costs(rng, _true_classes(_window(rng, spine), exact), n_classes)
    row = int(rng.integers(0, len(cost)))
    cost[row] = 0.0
    cost[row, lp.C2_CLASS] = lp.FORCED_LABEL_SCORE
    if row > 0 and rng.random() < 0.7:
      cost[row - 1] = 0.0
      cost[row - 1, lp.C1_CLASS] = lp.FORCED_LABEL_SCORE
  elif kind == 'single':
    cost = rng.dirichlet(np.ones(n_classes), size=1)
  else:
    cost = np.zeros((int(rng.integers(1, 27)), n_classes))
  cost = cost.astype(rng.choice([np.float64, np.float32]))
  arrays = {'cost': cost}
  n = len(cost)
  if rng.random() < 0.7:
    arrays['rel'] = (-rng.dirichlet(np.ones(6), size=n) * rng.choice([0.3, 0.6])).astype(
        rng.choice([np.float64, np.float32]))
    if rng.random() < 0.3:
      arrays['rel'][rng.random((n, 6)) < 0.5] = 0.0
  if rng.random() < 0.7:
    arrays['t13'] = (-rng.dirichlet(np.ones(2), size=n) * 0.4).astype(rng.choice([np.float64, np.float32]))
  punish = lambda: float(rng.choice([0.0, 0.0, 0.1, 0.35]))  # noqa: E731
  enforce = rng.random() < 0.25
  kwargs = {
      'min_start_class': int(rng.choice([0, 1, 1, int(rng.integers(0, n_classes))])),
      'regions': list(lp.region_starts(n_classes)),
      'invert_cost': bool(rng.random() < 0.85),
      'punish_multiple_sequence': punish(), 'punish_skip_sequence': punish(),
      'allow_skip_at_region': [r for r in range(3) if rng.random() < 0.25],
      'punish_skip_at_region_sequence': punish(),
  }
  if exact:
    kwargs.update(allow_multiple_at_class=[], allow_skip_at_class=[],
                  skippable_classes=[] if enforce else [lp.T12_EXACT_CLASS, lp.T13_EXACT_CLASS],
                  punish_skip_class=({lp.T12_EXACT_CLASS: punish(), lp.T13_EXACT_CLASS: punish()}
                                     if rng.random() < 0.7 else punish()))
  else:
    kwargs.update(allow_multiple_at_class=[lp.L5_CLASS] if enforce else [lp.T12_CLASS, lp.L5_CLASS],
                  allow_skip_at_class=[] if enforce else [lp.T11_CLASS])
  return arrays, kwargs


def _head_outputs(rng, ids: list[int], heads, spine: list[int], mode: str) -> dict[str, np.ndarray]:
  """Each head's softmaxes for vertebrae `ids`: Dirichlet draws, or near-one-hot at read_labels' targets."""
  anatomy = lc.Anatomy.of(spine)
  sizes = [(h, len(lc.HEAD_CLASSES[h])) for h in heads]
  out = {h: [] for h in heads}
  for k, v in enumerate(ids):
    visible = not (k in (0, len(ids) - 1) and rng.random() < 0.5)
    targets = lc.targets(v, anatomy, visible, sizes)
    for h, size in sizes:
      if mode == 'dirichlet':
        out[h].append(rng.dirichlet(np.full(size, float(rng.choice([0.2, 1.0])))))
      else:
        out[h].append(_sharp(rng, targets[h], size, float(rng.choice([0.02, 0.15, 0.4]))))
  dtype = rng.choice([np.float32, np.float64])
  return {h: np.asarray(v).astype(dtype) for h, v in out.items()}


def _prediction_case(rng, k: int) -> tuple[dict, lp.PathOptions]:
  exact_layout = k % 2 == 1
  vital = [lc.VERTEX if rng.random() < 0.5 else lc.VERTEXACT] if exact_layout else [lc.VERT]
  extra = [h for h in (lc.VERTGRP, lc.REGION, lc.VERTREL, lc.VERTT13, lc.FULLYVISIBLE) if rng.random() < 0.7]
  if not exact_layout and rng.random() < 0.4:
    extra.append(lc.VERTEX)
  if k % 11 == 0:  # levels from the groups alone
    vital = [lc.VERTGRP]
  heads = sorted(set(vital + extra))
  spine = SPINES[list(SPINES)[int(rng.integers(len(SPINES)))]]
  ids = _window(rng, spine, long=k % 5 == 0)
  if k % 13 == 0:
    ids = ids[:1]
  mode = 'dirichlet' if k % 4 == 0 else 'sharp'
  arrays = _head_outputs(rng, ids, heads, spine, mode)
  has_exact_head = any(h in heads for h in lc.EXACT_HEADS)
  flip = lambda p: bool(rng.random() < p)  # noqa: E731
  sigma = lambda: float(rng.choice([0.0, 0.6, 0.8, 1.2]))  # noqa: E731
  force_c2 = int(rng.integers(0, len(ids))) if flip(0.15) else None
  force_c1 = force_c2 - 1 if force_c2 and flip(0.7) else None
  options = lp.PathOptions(
      visible_w=float(rng.choice([0.0, 0.5, 1.0])), vert_w=float(rng.choice([0.9, 0.5])),
      vertgrp_w=float(rng.choice([0.8, 0.3])), region_w=float(rng.choice([1.1, 0.4])),
      vertrel_w=float(rng.choice([0.6, 0.0, 1.5])), vertt13_w=float(rng.choice([0.4, 1.0])),
      disable_c1=flip(0.6), boost_c2=float(rng.choice([1.0, 0.0, 3.0])),
      allow_cervical_skip=flip(0.2), allow_thoracic_skip=flip(0.15), allow_lumbar_skip=flip(0.15),
      punish_multiple_sequence=float(rng.choice([0.0, 0.1])), punish_skip_sequence=float(rng.choice([0.0, 0.1])),
      punish_skip_at_region_sequence=float(rng.choice([0.0, 0.2])), region_gaussian_sigma=sigma(),
      vert_gaussian_sigma=sigma(), vert_gaussian_regionwise=flip(0.8), vertgrp_gaussian_sigma=sigma(),
      vertgrp_gaussian_regionwise=flip(0.8), vertrel_column_norm=flip(0.8), vertrel_gaussian_sigma=sigma(),
      enforce_12_thoracic=flip(0.25), force_c1_index=force_c1, force_c2_index=force_c2,
      exact_classes=(None if flip(0.7) else (True if has_exact_head and flip(0.5) else False)),
      punish_skip_t12=float(rng.choice([0.0, 0.2])), punish_skip_t13=float(rng.choice([0.0, 0.05])),
      spineps_defects=True)
  return arrays, options


OURS_ONLY = ('spineps_defects', 'force_last_lumbar_index')  # PathOptions' fields SPINEPS has no argument for


def spineps_kwargs(options: lp.PathOptions) -> dict:
  """find_vert_path_from_predictions' keyword arguments for PathOptions (with spineps_defects, SPINEPS' own)."""
  renamed = {'enforce_12_thoracic': 'proc_lab_force_no_tl_anomaly', 'force_c1_index': 'force_c1_instance',
             'force_c2_index': 'force_c2_instance'}
  return {renamed.get(k, k): v for k, v in dataclasses.asdict(options).items() if k not in OURS_ONLY}


def _build_cases(seed: int = 0):
  rng = np.random.default_rng(seed)
  cases, arrays, ours = [], {}, []
  for k in range(N_SOLVER_CASES):
    exact = k % 2 == 1
    case_arrays, kwargs = _solver_case(rng, k // 2, exact)
    arrays.update({f'{len(cases)}/{name}': a for name, a in case_arrays.items()})
    cases.append({'solver': kwargs, 'exact': exact})
    ours.append(('solver', case_arrays, kwargs, exact))
  for k in range(N_PREDICTION_CASES):
    head_arrays, options = _prediction_case(rng, k)
    arrays.update({f'{len(cases)}/head/{h}': a for h, a in head_arrays.items()})
    cases.append({'predictions': spineps_kwargs(options)})
    ours.append(('predictions', head_arrays, options, None))
  return cases, arrays, ours


def _ours(case):
  """(cost, path, ids, cost matrix or None) of our implementation, or the ValueError it raised."""
  kind, arrays, settings, exact = case
  try:
    if kind == 'solver':
      cost, path = lp.min_cost_path(arrays['cost'], region_rel_cost=arrays.get('rel'),
                                    vertt13_cost=arrays.get('t13'), **settings)
      return cost, path, lp.post_process(path, exact), None
    n = len(next(iter(arrays.values())))
    result = lp.solve([{h: a[v] for h, a in arrays.items()} for v in range(n)], settings)
    return result.cost, list(result.classes), list(result.ids), result.costs
  except ValueError as error:
    return error


@pytest.fixture(scope='module')
def compared():
  reason = spineps_oracle.available()
  if reason:
    pytest.skip(reason)
  cases, arrays, ours = _build_cases()
  start = time.perf_counter()
  theirs = spineps_oracle.call('worker.level_paths', arrays, cases=cases)
  oracle_s = time.perf_counter() - start
  start = time.perf_counter()
  mine = [_ours(case) for case in ours]
  ours_s = time.perf_counter() - start
  return cases, theirs, mine, ours, oracle_s, ours_s


def test_same_paths_ids_and_costs_as_spineps(compared):
  cases, theirs, mine, ours, oracle_s, ours_s = compared
  spineps_s = sum(float(theirs[f'{i}/seconds']) for i in range(len(cases)) if f'{i}/seconds' in theirs)
  print(f'\n{len(cases)} cases: worker call {oracle_s:.1f} s (SPINEPS itself {spineps_s:.2f} s), ours {ours_s:.2f} s')
  counts = {'solver': [0, 0], 'predictions': [0, 0]}  # [paths compared, no path on both sides]
  for i, (case, result) in enumerate(zip(ours, mine)):
    kind = case[0]
    assert f'{i}/error' not in theirs, (i, str(theirs[f'{i}/error']))
    n = len(case[1]['cost']) if kind == 'solver' else len(next(iter(case[1].values())))
    their_cost, their_path = float(theirs[f'{i}/cost']), theirs[f'{i}/path'].tolist()
    if their_cost >= NO_PATH_COST:
      assert isinstance(result, ValueError) and 'no level path fits' in str(result), (i, result)
      counts[kind][1] += 1
      continue
    assert not isinstance(result, ValueError), (i, result, their_path)
    cost, path, ids, matrix = result
    assert len(their_path) == n, (i, their_path)
    assert path == their_path, (i, case[2], path, their_path)
    assert ids == theirs[f'{i}/ids'].tolist(), (i, ids, theirs[f'{i}/ids'])
    assert cost == pytest.approx(their_cost, rel=1e-9, abs=1e-12), (i, cost, their_cost)
    if matrix is not None:
      np.testing.assert_array_equal(matrix, theirs[f'{i}/costs'])
    counts[kind][0] += 1
  print(f'compared (paths, no path on both sides): {counts}')
  assert counts['solver'][0] >= 800 and counts['solver'][1] >= 50 and counts['predictions'][0] >= 200


def test_the_cases_cover_both_axes_and_the_anomalies(compared):
  """The batch holds what it is meant to: both axes, T13s, L6s, eleven thoracic, forced rows, whole spines."""
  cases, theirs, mine, ours, _, _ = compared
  found = {'t13': 0, 'l6': 0, 't11_then_l1': 0, 'forced_c2': 0, 'long': 0, 'single': 0, 'exact_paths': 0}
  for i, result in enumerate(mine):
    if isinstance(result, ValueError):
      continue
    _, path, ids, _ = result
    found['t13'] += lc.T13_ID in ids
    found['l6'] += lp.L6_ID in ids
    found['t11_then_l1'] += any(a == 18 and b == lc.L1_ID for a, b in zip(ids, ids[1:]))
    found['long'] += len(ids) >= 24
    found['single'] += len(ids) == 1
    found['forced_c2'] += ours[i][0] == 'predictions' and ours[i][2].force_c2_index is not None
    found['exact_paths'] += bool(cases[i].get('exact')) or (ours[i][0] == 'predictions' and len(result[3][0]) == 26)
  assert all(v >= 10 for v in found.values()), found

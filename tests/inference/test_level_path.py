"""The level path (inference/phase3/level_path.py) on hand-made spines with known answers, and its refusals."""
from __future__ import annotations

import numpy as np
import pytest

from spine_jax.data import level_classes as lc
from spine_jax.inference.phase3 import level_path as lp

C2_TO_L5 = list(range(2, 25))
T13_SPINE = list(range(2, 20)) + [lc.T13_ID] + list(range(20, 25))  # C2..T12, T13, L1..L5
L6_SPINE = list(range(2, 26))  # C2..L6
ELEVEN_THORACIC = list(range(2, 19)) + list(range(20, 25))  # C2..T11, L1..L5


def _sharp(index: int, size: int, noise: float = 0.05) -> np.ndarray:
  values = np.full(size, noise / (size - 1))
  values[index] = 1.0 - noise
  return values


def _predictions(ids, heads=('VERT',)):
  """Softmaxes that name each vertebra of `ids` clearly on every head (read_labels' targets)."""
  anatomy = lc.Anatomy.of(ids)
  sizes = [(h, len(lc.HEAD_CLASSES[lc.canonical_head(h)])) for h in heads]
  return [{h: _sharp(lc.targets(v, anatomy, True, sizes)[h], size) for h, size in sizes} for v in ids]


def test_a_clean_spine_from_c2_to_l5():
  result = lp.solve(_predictions(C2_TO_L5, heads=('VERT', 'VERTGRP', 'REGION', 'VERTREL', 'FULLYVISIBLE')))
  assert list(result.ids) == C2_TO_L5
  assert result.levels[0] == 'C2' and result.levels[-1] == 'L5'
  assert list(result.classes) == [v - 1 for v in C2_TO_L5] and not result.exact_classes
  assert result.costs.shape == (23, 24) and not result.costs.flags.writeable
  assert result.cost < 0 and result.options == lp.PathOptions() and 'find_vert_path_from_predictions' in result.method
  assert set(result.probabilities[0]) == {'VERT', 'VERTGRP', 'REGION', 'VERTREL', 'FULLYVISIBLE'}


def test_t13_as_a_repeated_t12_and_l6_as_a_trailing_repeated_l5():
  t13 = lp.solve(_predictions(T13_SPINE, heads=('VERT', 'VT13', 'VERTREL')))  # VT13: read_labels' name
  assert list(t13.ids) == T13_SPINE
  assert t13.classes[17:19] == (lp.T12_CLASS, lp.T12_CLASS)
  l6 = lp.solve(_predictions(L6_SPINE))
  assert list(l6.ids) == L6_SPINE and l6.classes[-2:] == (lp.L5_CLASS, lp.L5_CLASS)


def test_eleven_thoracic_vertebrae_skip_t12():
  result = lp.solve(_predictions(ELEVEN_THORACIC, heads=('VERT', 'REGION')))
  assert list(result.ids) == ELEVEN_THORACIC
  t11 = result.ids.index(18)
  assert result.ids[t11 + 1] == lc.L1_ID


def test_the_26_class_axis_names_t13_and_l6_itself():
  spine = list(range(2, 20)) + [lc.T13_ID] + list(range(20, 26))  # T13 and L6: 25 vertebrae
  result = lp.solve(_predictions(spine, heads=('VERTEXACT', 'REGION')))
  assert result.exact_classes and result.costs.shape == (25, 26)
  assert list(result.ids) == spine
  assert result.classes[18] == lp.T13_EXACT_CLASS and result.classes[-1] == lc.VERTEXACT_CLASSES.index('L6')
  normal = lp.solve(_predictions(C2_TO_L5, heads=('VERTEX',)))  # twelve thoracic: T13 skipped
  assert list(normal.ids) == C2_TO_L5
  with_vert = lp.solve(_predictions(C2_TO_L5, heads=('VERT', 'VERTEX')))  # a VERT head keeps the 24-class axis
  assert not with_vert.exact_classes and list(with_vert.ids) == C2_TO_L5


def test_forced_c1_and_c2_rows_win():
  ids = list(range(3, 10))  # the network says C3..T2
  options = lp.PathOptions(disable_c1=False, force_c1_index=0, force_c2_index=1)
  result = lp.solve(_predictions(ids), options)
  assert list(result.ids) == list(range(1, 8))
  assert result.costs[1, lp.C2_CLASS] == lp.FORCED_LABEL_SCORE and result.costs[1].sum() == lp.FORCED_LABEL_SCORE
  assert list(lp.solve(_predictions(ids)).ids) == ids


def test_a_forced_last_lumbar_row_counts_from_the_sacrum():
  ids = list(range(20, 24))  # the network says L1..L4; the lowest rests on the sacrum: L2..L5
  options = lp.PathOptions(force_last_lumbar_index=3)
  result = lp.solve(_predictions(ids), options)
  assert list(result.ids) == list(range(21, 25))
  row = result.costs[3]
  assert row[lp.L5_CLASS] > lp.FORCED_LABEL_SCORE and np.count_nonzero(row) == 1
  # An L6: the network's L5, L6 above the sacrum stay (a trailing repeated L5 on the 24-class axis; the
  # network's choice between L5 and L6 on the 26-class axis).
  assert list(lp.solve(_predictions(L6_SPINE[-4:]), lp.PathOptions(force_last_lumbar_index=3)).ids) == L6_SPINE[-4:]
  exact = lp.solve(_predictions(L6_SPINE[-4:], heads=('VERTEXACT',)), lp.PathOptions(force_last_lumbar_index=3))
  assert list(exact.ids) == L6_SPINE[-4:]
  assert np.count_nonzero(exact.costs[3]) == 2
  with pytest.raises(ValueError, match='force_c2_index and force_last_lumbar_index are both vertebra 1'):
    lp.PathOptions(force_c2_index=1, force_last_lumbar_index=1)
  with pytest.raises(ValueError, match='force_last_lumbar_index: vertebra 4, but there are 4 vertebrae'):
    lp.solve(_predictions(ids), lp.PathOptions(force_last_lumbar_index=4))


def test_the_dens_rule():
  ids = [4, 5, 6, 7]
  assert lp.dens_forced_indices(ids, [0.0, 400.0, 20.0, 0.0], disable_c1=False) == (0, 1)
  assert lp.dens_forced_indices(ids, [300.0, 0.0, 0.0, 0.0], disable_c1=False) == (None, 0)  # id 3 is absent
  assert lp.dens_forced_indices([1, 2], [300.0, 0.0], disable_c1=False) == (None, 0)  # C2 as instance 1: no C1
  assert lp.dens_forced_indices(ids, [0.0, 250.0, 0.0, 0.0], disable_c1=False) == (None, None)  # not above 250
  assert lp.dens_forced_indices(ids, [0.0, 400.0, 400.0, 0.0], disable_c1=False) == (0, 1)  # tie: the lower id
  assert lp.dens_forced_indices(ids, [0.0, 400.0, 20.0, 0.0], disable_c1=True) == (None, None)
  with pytest.raises(ValueError, match='3 volumes for 4 instances'):
    lp.dens_forced_indices(ids, [0.0, 1.0, 2.0], disable_c1=False)


def test_enforce_12_thoracic():
  assert list(lp.solve(_predictions(T13_SPINE)).ids) == T13_SPINE
  enforced = lp.solve(_predictions(T13_SPINE), lp.PathOptions(enforce_12_thoracic=True))
  assert list(enforced.ids) == L6_SPINE  # 24 vertebrae from C2 without a T13: the last one is L6
  eleven = lp.solve(_predictions(ELEVEN_THORACIC), lp.PathOptions(enforce_12_thoracic=True))
  assert 19 in eleven.ids and lc.T13_ID not in eleven.ids  # T12 may not be skipped
  # On the 26-class axis T13 is never on an enforced path; SPINEPS makes it mandatory there instead.
  window = list(range(14, 22))  # T7..L2
  exact = lp.solve(_predictions(window, heads=('VERTEX',)), lp.PathOptions(enforce_12_thoracic=True))
  assert list(exact.ids) == window
  spineps = lp.solve(_predictions(window, heads=('VERTEX',)),
                     lp.PathOptions(enforce_12_thoracic=True, spineps_defects=True))
  assert list(spineps.ids) == [14, 15, 16, 17, 18, 19, lc.T13_ID, 20]


def test_a_single_vertebra():
  result = lp.solve(_predictions([lc.L1_ID], heads=('VERT', 'VERTREL', 'VERTT13', 'FULLYVISIBLE')))
  assert result.ids == (lc.L1_ID,) and result.costs.shape == (1, 24)
  assert lp.solve([{'VERT': _sharp(0, 24)}]).ids == (2,)  # C1 disabled: the path starts at C2


def test_solver_ties_go_to_the_first_option():
  assert lp.min_cost_path(np.zeros((3, 24)), min_start_class=1) == (0.0, [1, 2, 3])  # lowest start, next class
  assert lp.min_cost_path(np.zeros((2, 24)), min_start_class=1, allow_skip_at_region=[0],
                          punish_skip_at_region_sequence=0.0) == (0.0, [1, 2])  # not the equal skip to 3
  cost = np.zeros((4, 24))
  cost[:, lp.T12_CLASS] = 1.0
  assert lp.min_cost_path(cost, allow_skip_at_region=[]) == (-2.0, [16, 17, 18, 18])
  # From T12 the best path is T12, T12, L1, L2 (-2), but the cell (vertebra 1, T12) keeps its own best
  # continuation T12, T12, which makes three T12s: that cell is lost, and SPINEPS' path is T12, L1, L2, L3.
  assert lp.min_cost_path(cost, min_start_class=lp.T12_CLASS, allow_skip_at_region=[]) == (-1.0, [18, 19, 20, 21])


def test_post_process():
  assert lp.post_process([17, 18, 18, 19], exact_classes=False) == [18, 19, lc.T13_ID, 20]
  assert lp.post_process([21, 22, 23, 23], exact_classes=False) == [22, 23, 24, 25]
  assert lp.post_process([23, 23], exact_classes=False) == [24, 25]
  assert lp.post_process([18, 19, 20, 25], exact_classes=True) == [19, lc.T13_ID, 20, 25]
  with pytest.raises(ValueError, match='classes must lie in 0..23'):
    lp.post_process([24], exact_classes=False)


def test_bad_inputs_are_refused_clearly():
  good = _predictions(C2_TO_L5[:3])
  with pytest.raises(ValueError, match='no vertebrae'):
    lp.solve([])
  with pytest.raises(ValueError, match='a list'):
    lp.solve({'VERT': _sharp(1, 24)})
  with pytest.raises(lc.HeadError, match='no labelling head gives levels'):
    lp.solve([{'REGION': _sharp(0, 3)}])
  with pytest.raises(lc.HeadError, match=r'predictions\[1\]: labelling head VERT: 23 classes, expected 24'):
    lp.solve([good[0], {'VERT': np.ones(23) / 23}, good[2]])
  with pytest.raises(lc.HeadError, match=r'predictions\[2\]: heads'):
    lp.solve([good[0], good[1], {**good[2], 'REGION': _sharp(0, 3)}])
  with pytest.raises(lc.HeadError, match="unknown labelling head 'LEVEL'"):
    lp.solve([{'LEVEL': _sharp(0, 24)}])
  with pytest.raises(lc.HeadError, match='given twice'):
    lp.solve([{'VERT': _sharp(1, 24), 'VT13': _sharp(0, 2), 'VERTT13': _sharp(0, 2)}])
  with pytest.raises(ValueError, match='finite'):
    lp.solve([{'VERT': np.full(24, np.nan)}])
  with pytest.raises(lc.HeadError, match='shape'):
    lp.solve([{'VERT': np.ones((2, 24))}])
  with pytest.raises(lc.HeadError, match='exact_classes needs a VERTEX or VERTEXACT head'):
    lp.solve(good, lp.PathOptions(exact_classes=True))
  with pytest.raises(ValueError, match='force_c2_index: vertebra 3, but there are 3 vertebrae'):
    lp.solve(good, lp.PathOptions(force_c2_index=3))
  with pytest.raises(ValueError, match=r'visible_w: must be <= 1'):
    lp.PathOptions(visible_w=1.5)
  with pytest.raises(ValueError, match=r'vert_w: must be >= 0'):
    lp.PathOptions(vert_w=-1.0)
  with pytest.raises(ValueError, match='force_c1_index: a vertebra position'):
    lp.PathOptions(force_c1_index=-1)
  with pytest.raises(ValueError, match='no level path fits 26 vertebrae'):  # C2..L5, a T13 and an L6 make 25
    lp.solve([{'VERT': _sharp(min(k, 23), 24)} for k in range(26)])
  with pytest.raises(ValueError, match='min_start_class'):
    lp.min_cost_path(np.zeros((2, 24)), min_start_class=24)
  with pytest.raises(ValueError, match='region_rel_cost: expected 2 rows'):
    lp.min_cost_path(np.zeros((2, 24)), region_rel_cost=np.zeros((3, 6)))

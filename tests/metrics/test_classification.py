"""Confusion-matrix metrics worked by hand, JSON safety, and the vertebra decisions."""
import json

import numpy as np
import pytest

from spine_jax.data import classes
from spine_jax.metrics import classification as cls

# Rows truth, columns prediction; normal, blastic, mixed, lytic. Total 102.
CM = np.array([
    [50, 3, 1, 1],
    [4, 10, 2, 0],
    [2, 3, 8, 2],
    [1, 0, 3, 12],
])


def _labels_from(cm):
  pairs = [(t, p) for (t, p), n in np.ndenumerate(cm) for _ in range(n)]
  y_true, y_pred = zip(*pairs)
  return np.array(y_true), np.array(y_pred)


def test_confusion_matrix_counts_rows_truth_columns_prediction():
  y_true, y_pred = _labels_from(CM)
  rng = np.random.default_rng(0)
  order = rng.permutation(len(y_true))
  cm = cls.confusion_matrix(y_true[order], y_pred[order], 4)
  assert cm.dtype == np.int64
  np.testing.assert_array_equal(cm, CM)
  small = cls.confusion_matrix([0, 0, 1], [1, 1, 1], 3)
  np.testing.assert_array_equal(small, [[0, 2, 0], [0, 1, 0], [0, 0, 0]])
  with pytest.raises(ValueError):
    cls.confusion_matrix([0, 4], [0, 1], 4)


def test_per_class_metrics_by_hand():
  m = cls.per_class_metrics(CM)
  np.testing.assert_array_equal(m['support'], [55, 16, 15, 16])
  np.testing.assert_allclose(m['sensitivity'], [50 / 55, 10 / 16, 8 / 15, 12 / 16])
  # Entries outside row c and column c over entries outside row c, e.g. class 0:
  # rows 1-3 x cols 1-3 = 12 + 13 + 15 = 40 out of 102 - 55 = 47.
  np.testing.assert_allclose(m['specificity'], [40 / 47, 80 / 86, 81 / 87, 83 / 86])
  np.testing.assert_allclose(m['precision'], [50 / 57, 10 / 16, 8 / 14, 12 / 15])
  np.testing.assert_allclose(m['f1'], [100 / 112, 20 / 32, 16 / 29, 24 / 31])
  np.testing.assert_allclose(m['balanced_accuracy'], np.mean([50 / 55, 10 / 16, 8 / 15, 12 / 16]))
  np.testing.assert_allclose(m['accuracy'], 80 / 102)


def test_zero_division_is_nan_and_absent_classes_leave_balanced_accuracy():
  cm = np.array([[3, 1, 0], [0, 0, 0], [1, 0, 0]])  # class 1 never true, class 2 never predicted.
  m = cls.per_class_metrics(cm)
  assert np.isnan(m['sensitivity'][1])
  assert m['sensitivity'][2] == 0.0
  assert np.isnan(m['precision'][2])
  assert m['f1'][2] == 0.0
  np.testing.assert_allclose(m['balanced_accuracy'], (3 / 4 + 0.0) / 2)
  empty = cls.per_class_metrics(np.zeros((2, 2), np.int64))
  assert np.isnan(empty['accuracy']) and np.isnan(empty['balanced_accuracy'])


def test_classification_report_is_json_safe_and_table_prints():
  names = ['none', 'unilateral', 'bilateral']
  report = cls.classification_report([0, 0, 2, 0], [0, 1, 2, 0], names)
  text = json.dumps(report, allow_nan=False)
  assert json.loads(text) == report
  assert report['confusion_matrix'] == [[2, 1, 0], [0, 0, 0], [0, 0, 1]]
  assert report['per_class']['unilateral']['sensitivity'] is None
  assert report['per_class']['unilateral']['precision'] == 0.0
  assert report['per_class']['none']['support'] == 3
  assert report['accuracy'] == 0.75
  table = cls.format_table(report, 'posterolateral, per slice')
  lines = table.splitlines()
  assert lines[0] == 'posterolateral, per slice'
  header = lines[2]
  assert header.split() == ['class', 'support', 'sensitivity', 'specificity', 'precision', 'F1']
  unilateral = next(l for l in lines if l.startswith('unilateral '))
  assert 'n/a' in unilateral
  # Columns are aligned: each metrics row ends where the header ends.
  rows = [l for l in lines[2:6]]
  assert len({len(r) for r in rows}) == 1
  assert 'truth \\ pred' in table and 'balanced accuracy' in table


def _decide(groups, **kwargs):
  """Per-vertebra decisions from {vertebra id: slice predictions}."""
  preds = np.concatenate([np.asarray(v) for v in groups.values()])
  ids = np.concatenate([[k] * len(v) for k, v in groups.items()])
  got_ids, decisions = cls.vertebra_quality_decision(preds, ids, **kwargs)
  return dict(zip(got_ids.tolist(), decisions.tolist()))


N, B, M, L = classes.NORMAL, classes.BLASTIC, classes.MIXED, classes.LYTIC


def test_vertebra_normal_needs_more_than_seventy_percent():
  got = _decide({
      1: [N] * 7 + [L] * 3,        # exactly 70% normal: not normal.
      2: [N] * 71 + [B] * 29,      # 71%: normal.
      3: [N] * 8 + [M] * 3,        # 72.7%: normal.
      4: [N] * 69 + [M] * 31,      # 69%: the lesion slices decide.
  })
  assert got == {1: L, 2: N, 3: N, 4: M}


def test_vertebra_blastic_lytic_mixed_and_ties():
  got = _decide({
      10: [N, N] + [B] * 8 + [L],  # blastic share 8/9.
      11: [L] * 9 + [B],           # lytic share 0.9.
      12: [B] * 5 + [L] * 5,       # 0.5 each: mixed.
      13: [M] * 4,                 # all mixed: share 4/8 each.
      14: [B] * 7 + [L] * 3,       # blastic share exactly 0.7: not above, mixed.
      15: [L] * 7 + [B] * 3,       # lytic share exactly 0.7: mixed.
      16: [B] * 3 + [M] * 2,       # (3 + 2) / (3 + 4) = 0.714: blastic.
      17: [B] * 2 + [M] * 2,       # 4 / 6: mixed.
  })
  assert got == {10: B, 11: L, 12: M, 13: M, 14: M, 15: M, 16: B, 17: M}


def test_vertebra_decision_ids_sorted_and_parameters():
  ids, decisions = cls.vertebra_quality_decision([L, N, B, N], ['L2', 'L1', 'L2', 'L1'])
  assert ids.tolist() == ['L1', 'L2'] and decisions.tolist() == [N, M]
  got = _decide({1: [N] * 6 + [B] * 4}, normal_fraction=0.5)
  assert got == {1: N}
  got = _decide({1: [B] * 6 + [L] * 4}, dominant_share=0.55)
  assert got == {1: B}
  with pytest.raises(ValueError):
    cls.vertebra_quality_decision([0], [1], dominant_share=0.4)


def test_vertebra_posterolateral_rule():
  preds = {
      1: [0] * 8 + [2] * 2,            # 20% bilateral: not above 0.2; ≥ unilateral also 20%: none.
      2: [0] * 7 + [1] + [2] * 2,      # bilateral 20%, ≥ unilateral 30%: unilateral.
      3: [0] * 7 + [2] * 3,            # bilateral 30%.
      4: [0] * 6 + [1] * 4,            # unilateral 40%.
      5: [0] * 10,
  }
  slices = np.concatenate([v for v in preds.values()])
  ids = np.concatenate([[k] * len(v) for k, v in preds.items()])
  got_ids, decisions = cls.vertebra_posterolateral_decision(slices, ids)
  assert dict(zip(got_ids.tolist(), decisions.tolist())) == {1: 0, 2: 1, 3: 2, 4: 1, 5: 0}
  _, decisions = cls.vertebra_posterolateral_decision(slices, ids, min_fraction=0.1)
  assert decisions.tolist() == [2, 2, 2, 1, 0]

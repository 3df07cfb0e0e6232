"""Level names and the two label numbering schemes."""
import numpy as np
import pytest

from spine_jax.data import levels


@pytest.mark.parametrize('label, level', [(26, 'S1'), (27, 'L5'), (29, 'L3'), (31, 'L1'), (32, 'T12'),
                                          (43, 'T1'), (44, 'C7'), (50, 'C1')])
def test_totalsegmentator_labels(label, level):
  assert levels.label_to_level(label, 'totalsegmentator') == level
  assert levels.level_to_label(level, 'totalsegmentator') == label


@pytest.mark.parametrize('label, level', [(1, 'C1'), (7, 'C7'), (8, 'T1'), (19, 'T12'), (20, 'L1'),
                                          (24, 'L5'), (25, 'L6'), (26, 'S1'), (28, 'T13')])
def test_spineps_labels(label, level):
  assert levels.label_to_level(label, 'spineps') == level
  assert levels.level_to_label(level, 'spineps') == label


def test_schemes_are_complete_and_invertible():
  assert len(levels.scheme_labels('spineps')) == 7 + 12 + 6 + 1 + 1
  assert len(levels.scheme_labels('totalsegmentator')) == 7 + 12 + 5 + 1
  for scheme in levels.SCHEMES:
    for label, level in levels.scheme_labels(scheme).items():
      assert levels.level_to_label(level, scheme) == label


def test_numpy_integers_and_spelling_are_accepted():
  assert levels.label_to_level(np.int16(29), 'TotalSegmentator') == 'L3'
  assert levels.level_to_label(' l 3', 'spineps') == 22


def test_cranio_caudal_order():
  assert levels.sort_levels(['S1', 'L1', 'T13', 'T12', 'C2', 'L6', 'L5']) == ['C2', 'T12', 'T13', 'L1', 'L5', 'L6',
                                                                             'S1']
  assert levels.level_index('C1') == 0 and levels.level_index('S1') == len(levels.LEVELS) - 1
  assert levels.neighbour_level('T12', 1) == 'L1' and levels.neighbour_level('L1', -1) == 'T12'
  assert levels.neighbour_level('L5', 1) == 'S1' and levels.neighbour_level('C1', -1) is None
  assert levels.level_region('T7') == 'thoracic' and levels.level_region('S1') == 'sacral'


@pytest.mark.parametrize('call, match', [
    (lambda: levels.label_to_level(27, 'spineps'), 'label 27 is not a vertebra in the spineps'),
    (lambda: levels.label_to_level(51, 'totalsegmentator'), 'label 51'),
    (lambda: levels.label_to_level(3.5, 'spineps'), 'integer'),
    (lambda: levels.label_to_level(3, 'nnunet'), "unknown label scheme 'nnunet'"),
    (lambda: levels.level_to_label('L6', 'totalsegmentator'), 'L6 has no label'),
    (lambda: levels.level_to_label('X9', 'spineps'), "unknown vertebra level 'X9'"),
])
def test_errors_are_clear(call, match):
  with pytest.raises(levels.LevelError, match=match):
    call()


def test_split_mask_labels_refuses_the_other_numbering():
  assert levels.split_mask_labels([0, 20, 21, 120, 221], "spineps") == ([20, 21], [120, 221])
  assert levels.split_mask_labels([1, 5, 26, 27, 33], "totalsegmentator") == ([26, 27, 33], [1, 5])
  with pytest.raises(levels.LevelError, match=r"m\.nii: labels \[29, 30\] are not SPINEPS vertebra ids.*"
                                              r"--scheme=totalsegmentator"):
    levels.split_mask_labels([26, 28, 29, 30], "spineps", source="m.nii")
  with pytest.raises(levels.LevelError, match=r"SPINEPS semantic mask"):
    levels.split_mask_labels([41, 49, 60], "spineps")
  with pytest.raises(levels.LevelError, match=r"--scheme=spineps"):
    levels.split_mask_labels([18, 19, 20], "totalsegmentator")

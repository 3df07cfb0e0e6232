"""Partial SINS: the table's points, transitional levels, ranges and the normal vertebra."""
import json

import pytest

from spine_jax.reports import sins


@pytest.mark.parametrize('level,points', [
    ('C1', 3), ('C2', 3), ('C3', 2), ('C6', 2), ('C7', 3), ('T1', 3), ('T2', 3), ('T3', 1), ('T10', 1),
    ('T11', 3), ('T12', 3), ('T13', 3), ('L1', 3), ('L2', 2), ('L4', 2), ('L5', 3), ('L6', 3), ('S1', 3),
    ('S2', 0), ('S5', 0), (' t 12 ', 3), ('l3', 2),
])
def test_location_points(level, points):
  assert sins.location_points(level) == points


@pytest.mark.parametrize('level', ['C8', 'T14', 'L7', 'S6', 'Co1', 'X', '', 'T0'])
def test_unknown_levels_raise(level):
  with pytest.raises(ValueError):
    sins.location_points(level)


def test_lesion_and_posterolateral_points_by_index_and_name():
  assert [sins.lesion_points(q) for q in range(4)] == [0, 0, 1, 2]
  assert sins.lesion_points('Lytic') == 2
  assert [sins.has_lesion(q) for q in range(4)] == [False, True, True, True]
  assert [sins.posterolateral_points(p) for p in range(3)] == [0, 1, 3]
  assert sins.posterolateral_points('bilateral') == 3
  with pytest.raises(ValueError):
    sins.lesion_points(4)
  with pytest.raises(ValueError):
    sins.posterolateral_points('both')


def test_categories():
  assert [sins.sins_category(t) for t in (0, 6, 7, 12, 13, 18)] == [
      'stable', 'stable', 'potentially unstable', 'potentially unstable', 'unstable', 'unstable']
  assert sins.category_span(0, 10) == ['stable', 'potentially unstable']
  with pytest.raises(ValueError):
    sins.sins_category(19)


def test_partial_sins_lytic_bilateral_junctional():
  report = sins.partial_sins('T12', 3, 2)
  assert report['components'] == {'location': 3, 'bone_lesion': 2, 'posterolateral': 3}
  assert report['partial_total'] == 8
  assert report['total_range'] == [8, 18]
  assert report['category_range'] == ['potentially unstable', 'unstable']
  assert report['not_assessed'] == {'pain': [0, 3], 'alignment': [0, 4], 'collapse': [0, 3]}
  assert report['has_lesion'] and report['quality'] == 'lytic' and report['posterolateral'] == 'bilateral'
  assert report['location_category'] == 'junctional'
  json.dumps(report, allow_nan=False)


def test_partial_sins_blastic_rigid_spans_stable_to_potentially_unstable():
  report = sins.partial_sins('S3', 'blastic', 'none')
  assert report['partial_total'] == 0
  assert report['total_range'] == [0, 10]
  assert report['category_range'] == ['stable', 'potentially unstable']


def test_partial_sins_mixed_mobile_spans_all_categories():
  report = sins.partial_sins('L3', 2, 1)
  assert report['partial_total'] == 2 + 1 + 1
  assert report['category_range'] == ['stable', 'potentially unstable', 'unstable']


def test_normal_vertebra_has_no_sins():
  report = sins.partial_sins('l1', 0, 1)
  assert report['level'] == 'L1'
  assert not report['has_lesion']
  assert report['components'] == {'location': 3, 'bone_lesion': None, 'posterolateral': 1}
  assert report['partial_total'] is None and report['total_range'] is None
  assert report['category_range'] == []

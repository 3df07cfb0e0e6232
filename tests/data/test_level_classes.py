"""The labelling heads' class axes and training targets (data/level_classes.py), against SPINEPS 2.1.3's own
`read_labels.get_subject_info` + `get_vert_entry` on whole spines with and without transitional anatomy."""
import numpy as np
import pytest

from spine_jax.data import level_classes as lc
from tests import spineps_oracle

NORMAL = list(range(1, 25))  # C1..L5
T13 = list(range(1, 20)) + [28] + list(range(20, 25))
L6 = list(range(1, 26))
ELEVEN_THORACIC = list(range(1, 19)) + list(range(20, 25))  # T11 then L1
SPINES = (NORMAL, T13, L6, ELEVEN_THORACIC)


def test_axes_and_regions():
  assert len(lc.VERT_CLASSES) == 24 and len(lc.VERTEXACT_CLASSES) == 26
  assert lc.VERTEXACT_CLASSES[19] == 'T13' and lc.VERTEXACT_CLASSES[25] == 'L6'
  for size, slices in lc.REGION_SLICES.items():
    axis = lc.VERT_CLASSES if size == 24 else lc.VERTEXACT_CLASSES
    assert [axis[s][0][0] for s in slices] == ['C', 'T', 'L'] and [axis[s][-1][0] for s in slices] == ['C', 'T', 'L']
    assert sum(s.stop - s.start for s in slices) == size
  assert sorted(i for m in lc.VERTGRP_MEMBERS for i in m) == list(range(24))
  for index in range(26):  # the 26-class axis and SPINEPS ids are one-to-one
    assert lc.vertexact_class(lc.vertexact_to_id(index)) == index


def test_heads_are_checked():
  assert lc.check_heads([('VERT', 24), ('VT13', 2)]) == (('VERT', 24), ('VERTT13', 2))
  with pytest.raises(lc.HeadError, match='VERT: 26 classes, expected 24'):
    lc.check_heads([('VERT', 26)])
  with pytest.raises(lc.HeadError, match="unknown labelling head 'LEVEL'"):
    lc.check_heads([('LEVEL', 24)])
  with pytest.raises(lc.HeadError, match='no labelling head gives levels'):
    lc.check_heads([('REGION', 3), ('FULLYVISIBLE', 2)])


def test_targets_of_transitional_spines():
  heads = [(name, len(classes)) for name, classes in lc.HEAD_CLASSES.items()]
  t13 = lc.targets(28, lc.Anatomy.of(T13), True, heads)
  assert (t13['VERT'], t13['VERTEX'], t13['VERTT13'], t13['VERTREL'], t13['REGION']) == (18, 19, 1, 3, 1)
  t12_of_t13 = lc.targets(19, lc.Anatomy.of(T13), False, heads)
  assert t12_of_t13['VERTREL'] == 0 and t12_of_t13['FULLYVISIBLE'] == 0
  l6 = lc.targets(25, lc.Anatomy.of(L6), True, heads)
  assert (l6['VERT'], l6['VERTEX'], l6['VERTREL'], l6['VERTGRP']) == (23, 25, 5, 11)
  t11 = lc.targets(18, lc.Anatomy.of(ELEVEN_THORACIC), True, heads)
  assert t11['VERTREL'] == 3 and t11['VERT'] == 17


def test_targets_equal_spineps_read_labels():
  reason = spineps_oracle.available()
  if reason:
    pytest.skip(reason)
  rows = spineps_oracle.call("worker.level_targets", {}, spines=[list(s) for s in SPINES])["rows"]
  heads = [(name, len(lc.HEAD_CLASSES[name])) for name in ('VERT', 'VERTEX', 'VERTGRP', 'REGION', 'VERTREL', 'VERTT13')]
  ours = []
  for k, spine in enumerate(SPINES):
    anatomy = lc.Anatomy.of(spine)
    for v in spine:
      t = lc.targets(v, anatomy, True, heads)
      ours.append([k, v, t['VERT'], t['VERTEX'], t['VERTGRP'], t['REGION'], t['VERTREL'], t['VERTT13']])
  np.testing.assert_array_equal(np.asarray(ours), rows)

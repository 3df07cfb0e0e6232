"""Phantoms for naming vertebrae: field kinds and their anchors, transitional anatomy with SPINEPS' ids,
the recorded levels against the instance mask, and the anatomical level cues (ribs, alae, rudimentary discs)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from spine_jax.data import levels
from spine_jax.data import spine_labels
from spine_jax.data.phantoms import mri
from spine_jax.data.phantoms import mri_anatomy

KINDS = mri_anatomy.FIELD_KINDS
RAISED = dict(t13_probability=0.2, t11_probability=0.15, l6_probability=0.1, lumbarised_s1_probability=0.15,
              sacralised_l5_probability=0.2)
NO_FORMS = {name: 0.0 for name in mri_anatomy.TRANSITION_RATE_FIELDS}
COSTAL = (spine_labels.COSTAL_LEFT, spine_labels.COSTAL_RIGHT)


def _cfg(kind=None, **overrides):
  cfg = mri.labeling_smoke_config()
  if kind is not None:
    cfg.field_kind_weights = {k: float(k == kind) for k in KINDS}
  for key, value in overrides.items():
    setattr(cfg, key, value)
  return cfg


def _ids(volume) -> set:
  return {int(v) for v in np.unique(volume['instance']) if 0 < v < spine_labels.DISC_OFFSET}


def _column(volume) -> list[str]:
  """The patient's levels top to bottom (the sacrum as S1), in and out of the field."""
  return [v['level'] for v in volume['vertebrae']]


def _entry(volume, level) -> dict:
  return next(v for v in volume['vertebrae'] if v['level'] == level)


@pytest.fixture(scope='module')
def kind_volumes():
  """Three volumes of each kind, transitional forms at raised rates."""
  return {kind: [mri.make_spine(np.random.default_rng([11, j]), _cfg(kind, **RAISED)) for j in range(3)]
          for kind in KINDS}


def test_labeling_config():
  cfg = mri.labeling_phantom_config()
  weights = {k: cfg.field_kind_weights[k] for k in KINDS}
  assert set(cfg.field_kind_weights) == set(KINDS) and sum(weights.values()) == pytest.approx(1.0)
  assert min(weights.values()) > 0.1
  rates = mri_anatomy.column_rates(cfg)
  assert all(0.0 < r <= 0.05 for r in rates.values()), rates
  assert tuple(cfg.lumbar_num_vertebrae_range) == (4, 11) and cfg.sacral_alae
  # The default settings keep their distribution: no kinds, no new forms, no rib variation.
  default = mri.default_mri_phantom_config()
  assert default.get('field_kind_weights') is None and default.top_level_choices[0] == 'C2'
  assert mri_anatomy.column_rates(default) == dict(NO_FORMS, t13_probability=0.03, l6_probability=0.03)
  assert tuple(default.last_rib_length_range) == tuple(default.t13_rib_length_range) == (1.0, 1.0)
  assert not default.sacral_alae


def test_bad_settings():
  with pytest.raises(ValueError, match='t13_probability, t11_probability'):
    mri.make_spine(np.random.default_rng(0), _cfg(t13_probability=0.7, t11_probability=0.5))
  with pytest.raises(ValueError, match='field_kind_weights'):
    mri.make_spine(np.random.default_rng(0), _cfg(field_kind_weights={'sacral': 1.0}))


def test_transitional_rates():
  """The forms occur at the configured rates; each column names its levels as SPINEPS does."""
  cfg = _cfg(**RAISED)
  rng = np.random.default_rng(5)
  n = 20000
  plans = [mri_anatomy.draw_column(rng, mri_anatomy.column_rates(cfg)) for _ in range(n)]
  counts = dict(t13=sum(p.thoracic == 13 for p in plans), t11=sum(p.thoracic == 11 for p in plans))
  for form in mri_anatomy.LUMBOSACRAL_FORMS[1:]:
    counts[form] = sum(p.lumbosacral == form for p in plans)
  for form, count in counts.items():
    p = RAISED[f'{form}_probability']
    assert abs(count / n - p) < 4 * np.sqrt(p * (1 - p) / n), (form, count / n, p)
  seen = set()
  for _ in range(150):  # the drawn columns carry their plan
    pieces, plan = mri_anatomy.draw_pieces(rng, cfg)
    names = [p.name for p in pieces if p.kind != 'sacral' or p.name == 'S1']
    assert names == plan.levels
    assert [x for x in names if x.startswith('T')] == [f'T{i}' for i in range(1, plan.thoracic + 1)]
    assert [x for x in names if x.startswith('L')] == [f'L{i}' for i in range(1, plan.lumbar + 1)]
    last = pieces[len(names) - 2]
    assert last.name == f'L{plan.lumbar}' and last.form == plan.lumbosacral
    assert sum(p.kind == 'sacral' for p in pieces) == (4 if plan.lumbosacral == 'lumbarised_s1' else 5)
    assert ('T13' in names) == (plan.thoracic == 13)
    seen |= {plan.lumbosacral, plan.thoracic}
  assert seen == {*mri_anatomy.LUMBOSACRAL_FORMS, 11, 12, 13}


def test_training_split_oversamples_transitional_forms():
  """`train_transition_rates` replace the training split's rates only; the held-out split keeps the configured
  ones; unknown fields and rates that are no probabilities are refused naming the field."""
  cfg = _cfg(**RAISED)
  cfg.train_transition_rates = {'t13_probability': 0.5, 'l6_probability': 0.3}
  train, test = mri.split_config(cfg, 'train'), mri.split_config(cfg, 'test')
  assert test is cfg
  assert (train.t13_probability, train.l6_probability) == (0.5, 0.3)
  assert cfg.t13_probability == RAISED['t13_probability']
  assert train.t11_probability == RAISED['t11_probability']
  cfg.train_transition_rates = {}
  assert mri.split_config(cfg, 'train') is cfg  # no copy, so the volumes stay those drawn before the field
  # The training volumes are drawn with the replaced rates: every patient has a T13 at a rate of 1.
  only_t13 = _cfg(**NO_FORMS)
  only_t13.train_transition_rates = {'t13_probability': 1.0}
  assert all(mri.make_volume(only_t13, 'train', i)['thoracic_count'] == 13 for i in range(2))
  assert mri.make_volume(only_t13, 'test', 0)['thoracic_count'] == 12
  only_t13.train_transition_rates = {'t13_probability': 0.7, 't11_probability': 0.5}
  with pytest.raises(ValueError, match='train_transition_rates: .*t13_probability, t11_probability'):
    mri.make_volume(only_t13, 'train', 0)
  only_t13.train_transition_rates = {'t14_probability': 0.1}
  with pytest.raises(ValueError, match='train_transition_rates: unknown field'):
    mri.make_volume(only_t13, 'train', 0)


def test_field_starts():
  """Kinds start where their anchors allow; together from C2 (C1 above it) down to L3."""
  cfg = mri.labeling_phantom_config()
  for name, value in NO_FORMS.items():
    setattr(cfg, name, value)
  rng = np.random.default_rng(2)
  tops = {kind: set() for kind in KINDS}
  for _ in range(400):
    pieces, _ = mri_anatomy.draw_pieces(rng, cfg)
    _, _, full, kind = mri_anatomy.field_window(rng, pieces, cfg)
    names = [pieces[k].name for k in full]
    tops[kind].add(names[0])
    assert (names[0] == 'C2') == (kind in ('cervical', 'whole'))
    assert (names[-1] == 'S1') == (kind in ('lumbar', 'whole'))
    if kind not in ('cervical', 'whole'):
      assert levels.level_index(names[0]) >= levels.level_index('C4')
  assert tops['lumbar'] >= {'L3', 'L1', 'T12'} and max(tops['lumbar'], key=levels.level_index) == 'L3'
  assert len(tops['thoracic']) >= 12 and 'C4' in tops['thoracic']


def test_field_kinds_and_anchors(kind_volumes):
  for kind, volumes in kind_volumes.items():
    for v in volumes:
      ids = _ids(v)
      assert v['field_kind'] == kind
      assert v['has_c2'] == (2 in ids) == (kind in ('cervical', 'whole'))
      assert v['has_sacrum'] == (26 in ids) == (kind in ('lumbar', 'whole'))
      if v['has_c2']:  # C2 with its body and dens, and the atlas' ring above
        assert v['levels'][:2] == ['C1', 'C2']
        assert np.sum((v['instance'] == 2) & (v['semantic'] == spine_labels.CORPUS)) > 200
      else:
        assert not ({1, 2} & ids)
      if v['has_sacrum']:
        assert v['levels'][-1] == 'S1' and np.sum(v['semantic'] == spine_labels.SACRUM) > 1000
      else:
        assert not np.any(v['semantic'] == spine_labels.SACRUM)


def test_recorded_levels_match_instance_mask(kind_volumes):
  for v in (v for volumes in kind_volumes.values() for v in volumes):
    assert v['level_ids'] == [levels.level_to_label(x, 'spineps') for x in v['levels']]
    assert set(v['level_ids']) == _ids(v)
    column = _column(v)
    start = column.index(v['levels'][0])
    assert column[start:start + len(v['levels'])] == v['levels']  # a run of the patient's levels, top to bottom
    rows = [v['body_centroids'][k][1] for k in v['level_ids'] if k in v['body_centroids']]
    assert np.all(np.diff(rows) > 0)
    discs = {int(k) - spine_labels.DISC_OFFSET for k in np.unique(v['instance'])
             if spine_labels.DISC_OFFSET < k < spine_labels.ENDPLATE_OFFSET}
    assert discs <= set(v['level_ids'])
    for level in set(v['full_levels']) - {'S1'}:  # complete vertebrae: bodies clear of the first and last rows
      x = levels.level_to_label(level, 'spineps')
      body = (v['instance'] == x) | (v['instance'] == spine_labels.ENDPLATE_OFFSET + x)
      body &= np.isin(v['semantic'], (spine_labels.CORPUS, spine_labels.ENDPLATE))
      rows = np.flatnonzero(body.any(axis=(0, 2)))
      assert rows.size and 0 < rows[0] and rows[-1] < body.shape[1] - 1, level
    assert v['thoracic_count'] == sum(x.startswith('T') for x in column)
    assert v['lumbar_count'] == sum(x.startswith('L') for x in column)


def test_whole_field(kind_volumes):
  for v in kind_volumes['whole']:
    assert v['levels'] == _column(v) and v['levels'][0] == 'C1' and v['levels'][-1] == 'S1'
    assert v['full_levels'][0] == 'C2' and v['full_levels'][-1] == 'S1'


def _lumbar_volume(seed, n=9, **rates):
  return mri.make_spine(np.random.default_rng(seed), _cfg('lumbar', lumbar_num_vertebrae_range=(n, n),
                                                          **dict(NO_FORMS, **rates)))


def test_eleven_thoracic_vertebrae():
  v = _lumbar_volume(3, t11_probability=1.0)
  assert v['thoracic_count'] == 11 and 'T12' not in _column(v)
  k = v['levels'].index('T11')
  assert v['levels'][k + 1] == 'L1' and v['level_ids'][k:k + 2] == [18, 20]
  assert 19 not in _ids(v) and spine_labels.DISC_OFFSET + 18 in v['centroids']
  assert _entry(v, 'T11')['dims']['rib'] <= 1.0 and _entry(v, 'T11')['rib_voxels'] > 0
  assert 'rib' not in _entry(v, 'L1')['dims'] and _entry(v, 'L1')['rib_voxels'] == 0


def test_ribs_on_thoracic_levels_only():
  v = _lumbar_volume(4, t13_probability=1.0)
  assert v['levels'][v['levels'].index('T12'):v['levels'].index('T12') + 3] == ['T12', 'T13', 'L1']
  assert v['level_ids'][v['levels'].index('T13')] == 28
  for entry in v['vertebrae']:
    thoracic = entry['level'].startswith('T')
    assert ('rib' in entry['dims']) == thoracic
    if not thoracic:
      assert entry['rib_voxels'] == 0
    elif entry['level'] in v['full_levels']:
      assert entry['rib_voxels'] > 0, entry['level']
  t13, t11 = _entry(v, 'T13'), _entry(v, 'T11')
  lo, hi = mri.labeling_phantom_config().t13_rib_length_range
  assert t13['form'] == 't13' and lo <= t13['dims']['rib'] <= hi and t11['dims']['rib'] == 1.0
  assert t13['rib_voxels'] < 0.8 * t11['rib_voxels']


def test_lumbosacral_forms():
  """L6 (25) above a whole or a four-segment sacrum; a sacralised L5 (24) whose costal processes meet the alae."""
  wide = dict(shape=(0, 0, 36))  # 119 mm across: the junction lies 40-55 mm off the midline

  def volume(**rates):
    v = mri.make_spine(np.random.default_rng(6), _cfg('lumbar', lumbar_num_vertebrae_range=(4, 4), **wide,
                                                       **dict(NO_FORMS, **rates)))
    sem, inst = v['semantic'], v['instance']
    last = max(k for k in v['level_ids'] if k < 26)
    costal = np.isin(sem, COSTAL) & (inst == last)
    touch = int(np.sum(costal & ndimage.binary_dilation(inst == 26)))
    disc_ratio = np.sum(inst == spine_labels.DISC_OFFSET + last) / np.sum(inst == spine_labels.DISC_OFFSET + last - 1)
    return v, touch, disc_ratio

  typical, touch, ratio = volume()
  assert typical['levels'][-3:] == ['L4', 'L5', 'S1'] and typical['lumbosacral'] == 'typical'
  assert touch == 0 and ratio > 0.6 and _entry(typical, 'S1')['dims']['segments'] == 5
  sacralised, touch, ratio = volume(sacralised_l5_probability=1.0)
  assert sacralised['levels'][-3:] == ['L4', 'L5', 'S1'] and sacralised['level_ids'][-2:] == [24, 26]
  assert _entry(sacralised, 'L5')['form'] == 'sacralised_l5' and touch >= 5 and ratio < 0.6
  lumbarised, touch, ratio = volume(lumbarised_s1_probability=1.0)
  assert lumbarised['levels'][-3:] == ['L5', 'L6', 'S1'] and lumbarised['level_ids'][-2:] == [25, 26]
  assert _entry(lumbarised, 'L6')['form'] == 'lumbarised_s1' and ratio < 0.6
  assert _entry(lumbarised, 'S1')['dims']['segments'] == 4 and lumbarised['lumbar_count'] == 6
  extra, _, ratio = volume(l6_probability=1.0)
  assert extra['levels'][-3:] == ['L5', 'L6', 'S1'] and _entry(extra, 'L6')['form'] == 'l6'
  assert _entry(extra, 'S1')['dims']['segments'] == 5 and ratio > 0.6


def test_default_fields_record_their_kind():
  v = mri.make_volume(mri.smoke_config(), 'train', 0)
  assert v['has_c2'] == ('C2' in v['levels']) and v['has_sacrum'] == ('S1' in v['levels'])
  assert v['field_kind'] == mri_anatomy.field_kind(v['has_c2'], v['has_sacrum'])
  assert v['thoracic_count'] in (12, 13) and v['lumbosacral'] in ('typical', 'l6')

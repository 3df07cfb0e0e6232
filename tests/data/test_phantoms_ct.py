"""Procedural CT vertebrae: determinism, class frequencies, anatomy, lesion intensities, slice labels."""
import numpy as np
import pytest
from scipy import ndimage

from spine_jax.data import levels
from spine_jax.data import slices
from spine_jax.data.phantoms import ct


def _small_cfg(n_train=10, n_test=4):
  cfg = ct.default_phantom_config()
  cfg.num_train_vertebrae, cfg.num_test_vertebrae = n_train, n_test
  cfg.slices.image_size = 32
  return cfg


@pytest.fixture(scope='module')
def train_small():
  return ct.build_phantom_slices(_small_cfg(), 'train')


def _vertebra(seed, quality, posterolateral, level='L2', **kw):
  return ct.make_vertebra(np.random.default_rng(seed), quality, posterolateral, level, **kw)


def test_default_config():
  cfg = ct.default_phantom_config()
  assert (cfg.num_train_vertebrae, cfg.num_test_vertebrae, cfg.train_seed, cfg.test_seed) == (600, 150, 0, 1)
  assert tuple(cfg.quality_freqs) == (0.64, 0.11, 0.12, 0.13)
  assert tuple(cfg.levels) == ct.DEFAULT_LEVELS and cfg.levels[0] == 'T1' and cfg.levels[-1] == 'L5'
  assert cfg.slices.image_size == 64 and cfg.slices.hu_mean == 69.9


def test_dataset_arrays_are_consistent(train_small):
  d = train_small
  n = len(d['image'])
  assert d['image'].shape == (n, 32, 32) and d['image'].dtype == np.float32
  for k in ('quality', 'posterolateral', 'vertebra', 'z_index'):
    assert d[k].shape == (n,) and d[k].dtype == np.int32
  for k in ('vert_quality', 'vert_posterolateral', 'vert_level', 'vert_label'):
    assert d[k].shape == (10,)
  assert np.array_equal(np.unique(d['vertebra']), np.arange(10))
  assert all(levels.level_to_label(lv, 'spineps') == lb for lv, lb in zip(d['vert_level'], d['vert_label']))
  assert set(d['vert_level']) <= set(ct.DEFAULT_LEVELS)
  # Slices of a normal vertebra are all normal; every vertebra's slices give back its labels.
  for v in range(10):
    sel = d['vertebra'] == v
    assert 6 <= sel.sum() <= 20
    assert ct.labels_consistent(d['vert_quality'][v], d['vert_posterolateral'][v], d['quality'][sel],
                                d['posterolateral'][sel])
  assert d['image'].min() == pytest.approx(slices.background_value(_small_cfg().slices))


def test_determinism(train_small):
  again = ct.build_phantom_slices(_small_cfg(), 'train')
  assert all(np.array_equal(train_small[k], again[k]) for k in train_small)
  other = ct.build_phantom_slices(_small_cfg(), 'test')
  assert len(other['vert_quality']) == 4
  assert not np.array_equal(other['image'][:20], train_small['image'][:20])
  quality, _ = ct.vertebra_classes(_small_cfg(), 10, 0)
  assert np.array_equal(quality, train_small['vert_quality'])
  a = _vertebra(3, ct.LYTIC, 1)
  b = _vertebra(3, ct.LYTIC, 1)
  c = _vertebra(4, ct.LYTIC, 1)
  assert np.array_equal(a['volume_hu'], b['volume_hu']) and np.array_equal(a['mask'], b['mask'])
  assert a['volume_hu'].shape != c['volume_hu'].shape or not np.array_equal(a['volume_hu'], c['volume_hu'])


def test_class_frequencies_follow_the_config():
  cfg = ct.default_phantom_config()
  quality, posterolateral = ct.vertebra_classes(cfg, 600, cfg.train_seed)
  assert np.abs(np.bincount(quality, minlength=4) - np.array(cfg.quality_freqs) * 600).max() <= 1
  assert posterolateral[quality == ct.NORMAL].max() == 0
  abnormal = (quality != ct.NORMAL).sum()
  assert np.abs(np.bincount(posterolateral[quality != ct.NORMAL], minlength=3)
                - np.array(cfg.posterolateral_freqs) * abnormal).max() <= 1
  assert len(quality) == 600 and not np.array_equal(quality, np.sort(quality))  # shuffled


def test_anatomy_in_ras():
  v = _vertebra(0, ct.NORMAL, 0, 'L3', lookalike_fraction=0.0)
  assert v['volume_hu'].dtype == np.float32 and v['mask'].dtype == np.int16
  assert v['label'] == 22 and set(np.unique(v['mask'])) == {0, 21, 22, 23}  # L2 above, L4 below
  body = np.argwhere(v['region'] == ct.REGION_BODY)
  right = np.argwhere(v['region'] == ct.REGION_POSTERIOR_RIGHT)
  left = np.argwhere(v['region'] == ct.REGION_POSTERIOR_LEFT)
  posterior = np.argwhere(v['region'] >= ct.REGION_POSTERIOR_RIGHT)
  assert body[:, 1].mean() > posterior[:, 1].mean() + 15  # the body is anterior (RAS axis 1)
  assert right[:, 0].mean() > left[:, 0].mean() + 20  # patient's right = +x (RAS axis 0)
  above = np.argwhere(v['mask'] == 21)[:, 2].mean()
  below = np.argwhere(v['mask'] == 23)[:, 2].mean()
  assert above > body[:, 2].mean() > below  # superior = +z
  # Body size (mm) as SPEC section 7 (lumbar: width 40-50, depth 33-35; +-7% variation, rotation).
  width = np.ptp(body[:, 0]) + 1
  assert 35 <= width <= 56
  hu = v['volume_hu']
  core = ndimage.binary_erosion(v['region'] == ct.REGION_BODY, iterations=3)
  assert 60 < np.median(hu[core]) < 380  # trabecular bone (elderly ~100)
  assert np.percentile(hu[v['region'] > 0], 99) > 600  # cortex
  assert -150 < np.median(hu[v['mask'] == 0]) < 100  # soft tissue, discs, canal
  assert not v['slice_quality'].any() and not v['slice_posterolateral'].any()


def _eroded(mask2d):
  return ndimage.binary_erosion(mask2d, iterations=1)


def test_blastic_slices_have_dense_foci_in_the_body():
  v = _vertebra(1, ct.BLASTIC, 0)
  blastic_slices = np.flatnonzero(v['slice_quality'] == ct.BLASTIC)
  assert blastic_slices.size >= 4 and not (v['slice_quality'] == ct.LYTIC).any()
  for z in blastic_slices:
    lesion = _eroded((v['lesion'][:, :, z] == 1) & (v['region'][:, :, z] == ct.REGION_BODY))
    assert lesion.sum() > 3 and np.median(v['volume_hu'][:, :, z][lesion]) > 500
  assert not (v['lesion'] == 1)[v['region'] >= ct.REGION_POSTERIOR_RIGHT].any()  # no posterolateral lesion


def test_lytic_slices_have_soft_tissue_density_in_the_body():
  v = _vertebra(2, ct.LYTIC, 0)
  lytic_slices = np.flatnonzero(v['slice_quality'] == ct.LYTIC)
  assert lytic_slices.size >= 4
  for z in lytic_slices:
    lesion = _eroded((v['lesion'][:, :, z] == 2) & (v['region'][:, :, z] == ct.REGION_BODY))
    assert lesion.sum() > 3 and -20 < np.median(v['volume_hu'][:, :, z][lesion]) < 110


def test_mixed_vertebra_has_both_in_the_same_slices():
  v = _vertebra(3, ct.MIXED, 0)
  assert (v['slice_quality'] == ct.MIXED).sum() >= 3
  z = np.flatnonzero(v['slice_quality'] == ct.MIXED)[0]
  hu = v['volume_hu'][:, :, z]
  assert np.median(hu[_eroded(v['lesion'][:, :, z] == 1)]) > 500
  assert np.median(hu[_eroded(v['lesion'][:, :, z] == 2)]) < 110


@pytest.mark.parametrize('posterolateral', [1, 2])
def test_posterolateral_lesions_reach_the_pedicles_on_their_sides(posterolateral):
  v = _vertebra(4, ct.LYTIC, posterolateral, 'T9')
  lesion = v['lesion'] > 0
  area = {side: (lesion & (v['region'] == r)).sum(axis=(0, 1))
          for side, r in (('right', ct.REGION_POSTERIOR_RIGHT), ('left', ct.REGION_POSTERIOR_LEFT))}
  labelled = np.flatnonzero(v['slice_posterolateral'] > 0)
  assert labelled.size >= 3
  for z in labelled:
    sides = sum(area[s][z] >= 8 for s in area)  # 8 mm^2 at 1 mm pixels
    assert sides == v['slice_posterolateral'][z]
  involved = [s for s in area if area[s].sum() > 0]
  assert len(involved) == posterolateral
  if posterolateral == 2:
    assert (v['slice_posterolateral'] == 2).sum() >= 3


def test_normal_vertebrae_have_no_lesion_and_rarely_a_bone_island():
  dense = []
  for seed in range(6):
    v = _vertebra(seed, ct.NORMAL, 0, 'T6', lookalike_fraction=0.5)
    assert not (v['lesion'] > 0).any() and not v['slice_quality'].any()
    core = ndimage.binary_erosion(v['region'] == ct.REGION_BODY, iterations=3)
    dense.append(int((v['volume_hu'][core] > 600).sum()))
  # Some have a bone island (a few dense voxels, far smaller than a blastic lesion), some none.
  assert min(dense) == 0 and 0 < max(dense) < 150


def test_bad_arguments():
  with pytest.raises(ValueError, match='normal vertebra has no posterolateral'):
    _vertebra(0, ct.NORMAL, 1)
  with pytest.raises(ValueError, match='quality must be 0-3'):
    _vertebra(0, 4, 0)
  with pytest.raises(levels.LevelError):
    _vertebra(0, 0, 0, 'X1')
  with pytest.raises(ValueError, match="unknown phantom split 'val'"):
    ct.build_phantom_slices(_small_cfg(), 'val')


def test_held_out_split_can_have_its_own_class_frequencies():
  cfg = ct.default_phantom_config()
  cfg.quality_freqs = (0.64, 0.16, 0.03, 0.17)
  cfg.test_quality_freqs = (0.25, 0.25, 0.25, 0.25)
  q_test, _ = ct.vertebra_classes(cfg, 100, 1, cfg.test_quality_freqs)
  q_train, _ = ct.vertebra_classes(cfg, 100, 0)
  assert list(np.bincount(q_test, minlength=4)) == [25, 25, 25, 25]
  assert list(np.bincount(q_train, minlength=4)) == [64, 16, 3, 17]

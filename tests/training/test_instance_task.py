"""Instance task: cutout inputs and targets, augmentation, pipeline, scoring, config variants, smoke training."""
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import instance as instance_config
from spine_jax.data import instance_cutouts as cutouts
from spine_jax.data import spine_labels
from spine_jax.data.phantoms import mri as mri_phantoms
from spine_jax.engine import state as state_lib
from spine_jax.inference.phase2 import cutouts as cutout_lib
from spine_jax.inference.phase2 import oracle as oracle_lib
from spine_jax.training import instance as instance_task
from spine_jax.training import tasks

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Top to bottom; T13 (28) between T12 and L1, so an order by id would be wrong.
STACK = (19, 28, 20, 21)


def hand_built_spine():
  """(semantic ids, instance ids) of a (8, 48, 4) PIR volume: 4 vertebrae of 10 rows each, then
  a sacrum. Per vertebra X from row b: endplate (62, 200 + X) at b and b + 7, body (49, X) and
  arcus (41, X, P 5-6) at b + 1 .. b + 6, spinous process (42, X, P 7) at b + 2 .. b + 4, disc
  (100, 100 + X) at b + 8, b + 9. Sacrum (26, 26) on rows 40..47."""
  sem = np.zeros((8, 48, 4), np.uint8)
  inst = np.zeros((8, 48, 4), np.int16)
  for k, x in enumerate(STACK):
    b = 10 * k
    for rows, p, label, ident in (((b, b + 1), slice(0, 4), 62, 200 + x), ((b + 7, b + 8), slice(0, 4), 62, 200 + x),
                                  ((b + 1, b + 7), slice(0, 4), 49, x), ((b + 1, b + 7), slice(5, 7), 41, x),
                                  ((b + 2, b + 5), slice(7, 8), 42, x), ((b + 8, b + 10), slice(0, 4), 100, 100 + x)):
      sem[p, rows[0]:rows[1]] = label
      inst[p, rows[0]:rows[1]] = ident
  sem[:, 40:], inst[:, 40:] = 26, 26
  return sem, inst


def exact_config(size):
  cfg = cutouts.default_cutout_config()
  cfg.cutout_size = size
  cfg.min_body_mm3 = 1.0
  return cfg


def test_input_classes_and_left_right_swap():
  ids = np.array(spine_labels.SEMANTIC_IDS)
  inputs = cutouts.input_lut()[spine_labels.ids_to_indices(ids)]
  assert dict(zip(ids.tolist(), inputs.tolist())) == {0: 0, 41: 1, 42: 2, 43: 3, 44: 4, 45: 5, 46: 6, 47: 7, 48: 8,
                                                      49: 9, 60: 0, 61: 0, 62: 0, 100: 0, 26: 0}
  assert cutouts.input_left_right_swap().tolist() == [0, 1, 2, 4, 3, 6, 5, 8, 7, 9]


def test_record_orders_vertebrae_by_position_and_finds_bodies():
  sem, inst = hand_built_spine()
  record = cutouts.volume_record(spine_labels.ids_to_indices(sem), inst, (1.0, 1.0, 1.0), min_body_mm3=1.0)
  assert cutouts.vertebra_order(inst) == [19, 28, 20, 21, 26]
  assert record['body_positions'].tolist() == [1, 2, 3, 4]  # the sacrum has no body (49)
  np.testing.assert_allclose(record['body_centres'], [[1.5, 10 * k + 3.5, 1.5] for k in range(4)])
  assert record['position'][0, 45, 0] == 0  # sacrum: no input there
  assert record['position'][6, 12, 0] == 2  # the arcus of T13


@pytest.mark.parametrize('body', [0, 1, 2, 3])
def test_targets_above_centre_below(body):
  sem, inst = hand_built_spine()
  record = cutouts.volume_record(spine_labels.ids_to_indices(sem), inst, (1.0, 1.0, 1.0), min_body_mm3=1.0)
  size = (8, 32, 4)
  inputs, targets = cutouts.extract_cutout(record, body, None, exact_config(size))
  centre = np.rint(record['body_centres'][body]).astype(int)
  cut = lambda a: np.pad(a, 40)[tuple(slice(40 + c - n // 2, 40 + c - n // 2 + n) for c, n in zip(centre, size))]
  s, i = cut(sem), cut(inst)
  expected = np.zeros(size, np.uint8)
  for target, k in ((1, body - 1), (2, body), (3, body + 1)):
    if 0 <= k < len(STACK):
      expected[(i == STACK[k]) & np.isin(s, (41, 42, 49))] = target
  assert inputs.dtype == targets.dtype == np.uint8 and targets.shape == size
  np.testing.assert_array_equal(targets, expected)
  np.testing.assert_array_equal(inputs, cutouts.input_lut()[spine_labels.ids_to_indices(s)])
  assert targets[tuple(n // 2 for n in size)] == 2  # the body at the centre
  assert not targets[np.isin(s, (62, 100, 26))].any()  # endplates, discs, sacrum: never targets
  present = set(np.unique(targets).tolist())
  assert (1 in present) == (body > 0) and (3 in present) == (body < 3)  # no vertebra above T12; L2's is the sacrum


def test_exact_cutouts_agree_with_phase_two_reference():
  """The training targets are what `inference.phase2.oracle` calls a perfect network's answer."""
  cfg = mri_phantoms.default_mri_phantom_config()
  vol = mri_phantoms.make_volume(cfg, 'test', 0)
  sem, inst = vol['semantic'], vol['instance']
  record = cutouts.volume_record(spine_labels.ids_to_indices(sem), inst, cfg.spacing_mm)
  size = (64, 96, 16)
  assert len(record['body_positions']) >= 5
  for body, centre in enumerate(record['body_centres']):
    inputs, targets = cutouts.extract_cutout(record, body, None, exact_config(size))
    centre = np.rint(centre).astype(int)
    np.testing.assert_array_equal(targets, oracle_lib.reference_cutout_classes(sem, inst, centre, size))
    np.testing.assert_array_equal(inputs, cutout_lib.cutout(cutout_lib.relabel_for_instance(sem),
                                                                    centre, size))


def test_augmentation():
  sem, inst = hand_built_spine()
  record = cutouts.volume_record(spine_labels.ids_to_indices(sem), inst, (1.0, 1.0, 1.0), min_body_mm3=1.0)
  cfg = exact_config((8, 32, 4))
  plain = cutouts.extract_cutout(record, 1, None, cfg)
  cfg.centre_jitter_mm = (0.0, 0.0, 0.0)
  cfg.augment.update(p_rotation=0.0, p_scale=0.0, p_elastic=0.0, p_mirror=1.0)
  inputs, targets = cutouts.extract_cutout(record, 1, np.random.default_rng(0), cfg)
  np.testing.assert_array_equal(inputs, cutouts.input_left_right_swap()[plain[0][..., ::-1]])
  np.testing.assert_array_equal(targets, plain[1][..., ::-1])
  cfg = exact_config((8, 32, 4))
  cfg.augment.update(p_rotation=1.0, p_scale=1.0, p_elastic=1.0)
  rng = np.random.default_rng(1)
  for _ in range(5):
    inputs, targets = cutouts.extract_cutout(record, 2, rng, cfg)
    assert inputs.shape == targets.shape == (8, 32, 4)
    assert not np.any((targets > 0) & (inputs == 0))  # one resampling for both maps
    assert set(np.unique(targets).tolist()) <= {0, 1, 2, 3} and (targets == 2).any()


def test_missing_instance_mask_is_named():
  sem, _ = hand_built_spine()
  with pytest.raises(ValueError, match='scan_07.*instance'):
    cutouts.volume_record(spine_labels.ids_to_indices(sem), None, (1.0, 1.0, 1.0), name='scan_07')


def test_vertebra_dice_pairs_by_overlap():
  ref = np.zeros((4, 12, 2), np.int16)
  ref[:, 0:4], ref[:, 4:8], ref[:, 8:12] = 5, 6, 26
  pred = np.zeros_like(ref)
  pred[:, 0:4] = 1  # vertebra 5 exactly, under another id
  pred[:, 4:6] = 2  # half of vertebra 6
  pred[:, 8:12] = 26
  scores = instance_task.vertebra_dice(pred, ref)
  assert scores == {5: 1.0, 6: pytest.approx(2 * 16 / (16 + 32))}  # the sacrum is not scored
  assert instance_task.vertebra_dice(np.zeros_like(ref), ref) == {5: 0.0, 6: 0.0}


def test_found_and_ordered():
  ref = np.zeros((4, 12, 2), np.int16)
  ref[:, 0:4], ref[:, 4:8], ref[:, 8:12] = 5, 6, 7
  shifted = np.where(ref > 0, ref - 4, 0)  # 1, 2, 3: numbered in order from another first level
  assert instance_task.found_and_ordered(shifted, ref, [5, 6, 7])
  swapped = shifted.copy()
  swapped[:, 0:4], swapped[:, 4:8] = 2, 1  # out of order
  assert not instance_task.found_and_ordered(swapped, ref, [5, 6, 7])
  missing = np.where(ref == 6, 0, shifted)
  assert not instance_task.found_and_ordered(missing, ref, [5, 6, 7])
  assert instance_task.found_and_ordered(missing, ref, [5, 7])  # only the ones asked about count
  t13 = np.zeros((4, 12, 2), np.int16)
  t13[:, 0:4], t13[:, 4:8], t13[:, 8:12] = 19, 28, 20  # T12, T13, L1: ids out of order, positions not
  numbered = np.zeros_like(t13)
  numbered[:, 0:4], numbered[:, 4:8], numbered[:, 8:12] = 19, 20, 21  # numbered by position
  assert instance_task.found_and_ordered(numbered, t13, [19, 28, 20])


def test_pipeline_batches():
  config = instance_config.get_config('smoke')
  task = tasks.get_task(config)
  batch = next(task.train_iterator(process_index=0, process_count=1))
  size = tuple(config.data.cutout.cutout_size)
  assert batch['input'].shape == batch['labels'].shape == (config.batch_size, *size)
  assert batch['input'].dtype == batch['labels'].dtype == np.uint8
  assert batch['input'].max() <= 9 and batch['labels'].max() <= 3 and (batch['labels'] == 2).any()


@pytest.mark.parametrize('variant', ['', 'spineps', 'bf16', 'smoke', 'spineps,bf16'])
def test_variant_builds_and_initialises(variant):
  config = instance_config.get_config(variant)
  task = tasks.get_task(config)
  assert tuple(config.inference.cutout_size) == tuple(config.data.cutout.cutout_size)
  assert all(s % task.model.divisor == 0 for s in config.data.cutout.cutout_size)
  shapes = jax.eval_shape(lambda: task.model.init(jax.random.key(0), jax.numpy.zeros(task.init_shape), train=False))
  n = state_lib.count_params(shapes['params'])
  assert n == 5_375_124 if 'spineps' in variant else n > 0
  state_lib.make_optimizer(config.optimizer, config.num_train_steps).init(shapes['params'])


def test_unknown_variant_is_refused():
  with pytest.raises(ValueError, match='unknown variant'):
    instance_config.get_config('spinepz')


def test_smoke_training_run(tmp_path):
  out = subprocess.run([sys.executable, '-m', 'spine_jax.train', '--config=configs/instance.py:smoke',
                        f'--workdir={tmp_path}'], capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'step 4/4' in out.stdout and 'mean vertebra Dice' in out.stdout
  report = json.loads((tmp_path / 'eval.json').read_text())
  assert report['task'] == 'instance' and report['step'] == 4 and report['num_volumes'] == 1
  assert set(report['cutout_dice']) == {'above', 'centre', 'below'} and report['num_cutouts'] >= 2
  assert 0.0 <= report['fraction_volumes_all_found_and_ordered'] <= 1.0
  lines = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [l['step'] for l in lines if l['split'] == 'train'] == [2, 4]
  assert all(np.isfinite(l['loss']) for l in lines if l['split'] == 'train')

"""Instance metrics on hand-built masks with known answers, and the `evaluate instances` command."""
import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from spine_jax.data import nifti
from spine_jax.metrics import instances as im
from spine_jax.metrics import segmentation as seg

SPACING = (0.75, 0.75, 1.65)


def _line(length=20, **runs):
  """A (1, length, 1) mask: runs name=(start, stop, id)."""
  mask = np.zeros((1, length, 1), np.int16)
  for start, stop, value in runs.values():
    mask[0, start:stop, 0] = value
  return mask


def test_overlap_table_counts():
  ref = _line(x=(0, 10, 20), y=(10, 16, 21), disc=(16, 18, 120))
  pred = _line(a=(4, 14, 20), b=(0, 4, 22), disc=(16, 17, 120))
  table = im.overlap_table(pred, ref)
  assert table.pred_ids.tolist() == [20, 22] and table.ref_ids.tolist() == [20, 21]
  assert table.pred_sizes.tolist() == [10, 4] and table.ref_sizes.tolist() == [10, 6]
  assert table.intersection.tolist() == [[6, 4], [4, 0]]
  assert table.dice()[0].tolist() == pytest.approx([0.6, 0.5])
  assert table.iou()[1].tolist() == pytest.approx([0.4, 0.0])
  discs = im.overlap_table(pred, ref, (100, 199))
  assert discs.intersection.tolist() == [[1]] and discs.ref_sizes.tolist() == [2]


def test_optimal_overlap_matching_beats_greedy_and_label_matching_pairs_ids():
  ref = _line(x=(0, 10, 20), y=(10, 16, 21))
  pred = _line(a=(4, 14, 20), b=(0, 4, 22))
  table = im.overlap_table(pred, ref)
  # Greedy would pair 20-20 (Dice 0.6) and leave 22 alone; 20-21 (0.5) + 22-20 (0.57) sum higher.
  assert im.match_by_overlap(table) == [(22, 20), (20, 21)]
  assert im.match_by_label(table) == [(20, 20), (22, None), (None, 21)]


def test_numbering_one_level_off_scores_zero_by_label_and_one_by_overlap():
  ref = np.zeros((4, 20, 4), np.int16)
  ref[:, 0:5], ref[:, 5:10] = 20, 21
  pred = np.zeros_like(ref)
  pred[:, 0:5], pred[:, 5:10] = 21, 22
  report = im.instance_report(pred, ref, SPACING)
  vertebrae = report['groups']['vertebrae']
  assert vertebrae['by_label']['mean_dice'] == 0.0 and len(vertebrae['by_label']['instances']) == 3
  assert vertebrae['by_overlap']['mean_dice'] == 1.0 and vertebrae['by_overlap']['mean_assd_mm'] == 0.0
  assert [(r['pred_id'], r['ref_id'], r['name']) for r in vertebrae['by_overlap']['instances']] == [
      (21, 20, 'L1'), (22, 21, 'L2')]
  assert vertebrae['detection'] == {'iou_threshold': 0.5, 'tp': 2, 'fp': 0, 'fn': 0, 'precision': 1.0,
                                    'recall': 1.0, 'f1': 1.0}
  assert vertebrae['panoptic'] == {'pq': 1.0, 'sq': 1.0, 'rq': 1.0}
  assert report['groups']['discs']['detection']['precision'] is None  # nothing to score: null, not 0 or 1
  assert report['groups']['discs']['by_label']['mean_dice'] is None


def test_detection_and_panoptic_quality_known_values():
  ref = _line(x=(0, 10, 20), y=(12, 16, 21))
  pred = _line(a=(0, 8, 20), c=(17, 19, 23))  # 20: IoU 0.8; 21 missed; 23 invented
  table = im.overlap_table(pred, ref)
  counts = im.detection(table)
  assert (counts['tp'], counts['fp'], counts['fn']) == (1, 1, 1)
  assert counts['precision'] == counts['recall'] == counts['f1'] == 0.5
  pq = im.panoptic_quality(table)
  assert pq['sq'] == pytest.approx(0.8) and pq['rq'] == pytest.approx(0.5) and pq['pq'] == pytest.approx(0.4)
  assert im.detection(table, 0.9)['tp'] == 0 and math.isnan(im.panoptic_quality(table, 0.9)['sq'])
  with pytest.raises(ValueError, match='iou_threshold'):
    im.detection(table, 0.3)
  no_match = im.overlap_table(_line(a=(4, 14, 20), b=(0, 4, 22)), _line(x=(0, 10, 20), y=(10, 16, 21)))
  assert im.detection(no_match)['f1'] == 0.0 and im.panoptic_quality(no_match)['pq'] == 0.0


def test_per_instance_dice_and_assd_reuse_the_segmentation_metrics():
  rng = np.random.default_rng(0)
  ref = np.zeros((12, 30, 10), np.int16)
  ref[2:10, 2:12, 2:8], ref[2:10, 14:26, 2:8] = 20, 21
  pred = ref.copy()
  pred[2:10, 12:14, 2:8] = 20  # 20 grows down two rows
  pred[rng.random(pred.shape) < 0.02] = 0
  report = im.instance_report(pred, ref, SPACING)
  rows = {r['ref_id']: r for r in report['groups']['vertebrae']['by_label']['instances']}
  for value in (20, 21):
    assert rows[value]['dice'] == pytest.approx(seg.dice(pred == value, ref == value))
    assert rows[value]['assd_mm'] == pytest.approx(seg.assd(pred == value, ref == value, SPACING))
  assert rows[20]['assd_mm'] > 0 and rows[20]['pred_voxels'] == int(np.count_nonzero(pred == 20))
  missed = im.instance_report(np.where(pred == 21, 0, pred), ref, SPACING)
  row = [r for r in missed['groups']['vertebrae']['by_overlap']['instances'] if r['ref_id'] == 21][0]
  assert row['pred_id'] is None and row['dice'] == 0.0 and row['assd_mm'] is None  # inf: missed
  assert im.instance_report(pred, ref, SPACING, with_assd=False)['groups']['vertebrae']['by_label'][
      'mean_assd_mm'] is None


def test_instance_names():
  assert [im.instance_name(v) for v in (1, 20, 26, 28, 120, 224, 99, None)] == [
      'C1', 'L1', 'S1', 'T13', 'disc_L1', 'endplate_L5', 'id_99', None]


def _write(path, array, affine=None):
  nifti.atomic_save_nifti(np.asarray(array, np.int16), np.diag([0.75, 0.75, 1.65, 1.0]) if affine is None else affine,
                          path)
  return path


def _evaluate(*args):
  return subprocess.run([sys.executable, "-m", "spine_jax.evaluate", *map(str, args)], capture_output=True, text=True,
                        timeout=120)


def test_evaluate_instances_command(tmp_path):
  ref = np.zeros((6, 20, 6), np.int16)
  ref[1:5, 0:8, 1:5], ref[1:5, 8:10, 1:5], ref[1:5, 10:18, 1:5] = 20, 120, 21
  pred = ref.copy()
  pred[1:5, 0:8, 1:5] = 19
  r, p = _write(tmp_path / 'ref.nii.gz', ref), _write(tmp_path / 'pred.nii.gz', pred)
  out = tmp_path / 'out' / 'report.json'
  run = _evaluate('instances', f'--pred={p}', f'--ref={r}', f'--output={out}')
  assert run.returncode == 0, run.stderr
  report = json.loads(out.read_text())
  assert report['pred'] == str(p) and set(report['groups']) == {'vertebrae', 'discs', 'endplates'}
  assert report['groups']['vertebrae']['by_overlap']['mean_dice'] == 1.0
  assert report['groups']['vertebrae']['by_label']['mean_dice'] == pytest.approx(1 / 3)
  assert 'vertebrae' in run.stdout and im.summary_table(report) in run.stdout
  rows_path = tmp_path / 'rows.csv'
  run = _evaluate('instances', f'--pred={p}', f'--ref={r}', f'--output={rows_path}', '--groups=vertebrae', '--noassd')
  assert run.returncode == 0, run.stderr
  rows = list(csv.DictReader(rows_path.open()))
  assert list(rows[0]) == list(im.CSV_COLUMNS) and {row['group'] for row in rows} == {'vertebrae'}
  assert [(row['pairing'], row['ref_id'], row['pred_id']) for row in rows] == [
      ('label', '21', '21'), ('label', '', '19'), ('label', '20', ''), ('overlap', '20', '19'), ('overlap', '21', '21')]
  assert rows[0]['assd_mm'] == ''

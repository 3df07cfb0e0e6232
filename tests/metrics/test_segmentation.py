"""Dice and ASSD on hand-made masks with known answers; the report and the file comparison."""
import json
import math
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scipy import spatial as sp_spatial

from spine_jax.data import nifti
from spine_jax.metrics import segmentation as seg


def _cubes():
  pred = np.zeros((20, 12, 12), np.int16)
  ref = np.zeros((20, 12, 12), np.int16)
  pred[0:10, 0:10, 0:10] = 49
  ref[5:15, 0:10, 0:10] = 49  # overlap 5 x 10 x 10 = 500 of 1000 each
  pred[18:20, 0:2, 0:2] = 61  # only in the prediction
  ref[18:20, 10:12, 10:12] = 60  # only in the reference
  return pred, ref


def test_dice_per_label_known_values():
  pred, ref = _cubes()
  got = seg.dice_per_label(pred, ref, [49, 60, 61, 100])
  assert got[49] == pytest.approx(0.5)
  assert got[60] == 0.0 and got[61] == 0.0
  assert math.isnan(got[100])  # absent from both: not scored
  assert seg.nanmean(got.values()) == pytest.approx(0.5 / 3)
  assert math.isnan(seg.nanmean([math.nan]))
  # Union of 49 and 61 against the union of 49 and 60: overlap 500, sizes 1008 and 1008.
  assert seg.global_dice(pred, ref, [49, 60, 61]) == pytest.approx(1000 / 2016)
  assert seg.dice(pred == 49, pred == 49) == 1.0
  with pytest.raises(ValueError, match='shape'):
    seg.dice_per_label(pred, ref[:5], [49])


def test_surface_is_the_mask_minus_its_erosion():
  mask = np.zeros((7, 7, 7), bool)
  mask[1:6, 1:6, 1:6] = True
  assert np.count_nonzero(seg.surface(mask)) == 125 - 27
  full = np.ones((4, 4, 4), bool)  # the array's outside is background: the border is surface
  assert np.count_nonzero(seg.surface(full)) == 64 - 8


def test_assd_voxel_inside_a_cube_with_anisotropic_spacing():
  sx, sy, sz = 0.75, 0.75, 1.65
  ref = np.zeros((9, 9, 9), bool)
  ref[4, 4, 4] = True
  pred = np.zeros((9, 9, 9), bool)
  pred[3:6, 3:6, 3:6] = True  # surface: the 26 voxels around the centre
  faces = 2 * (sx + sy + sz)
  edges = 4 * (math.hypot(sx, sy) + math.hypot(sx, sz) + math.hypot(sy, sz))
  corners = 8 * math.sqrt(sx**2 + sy**2 + sz**2)
  expected = (faces + edges + corners + min(sx, sy, sz)) / 27
  assert seg.assd(pred, ref, (sx, sy, sz)) == pytest.approx(expected)
  assert seg.assd(ref, pred, (sx, sy, sz)) == pytest.approx(expected)  # symmetric


def test_assd_concentric_cubes_one_voxel_apart():
  s = 1.2
  ref = np.zeros((15, 15, 15), bool)
  ref[5:10, 5:10, 5:10] = True  # surface 125 - 27 = 98 voxels, each s from the outer shell
  pred = np.zeros((15, 15, 15), bool)
  pred[4:11, 4:11, 4:11] = True  # surface 343 - 125 = 218: 150 faces, 60 edges, 8 corners
  expected = (150 * s + 60 * math.sqrt(2) * s + 8 * math.sqrt(3) * s + 98 * s) / (218 + 98)
  assert seg.assd(pred, ref, (s, s, s)) == pytest.approx(expected)


def test_assd_of_a_mask_with_itself_and_empty_masks():
  mask = np.zeros((10, 10, 10), bool)
  mask[2:7, 3:9, 1:4] = True
  assert seg.assd(mask, mask, (0.5, 1.0, 3.0)) == 0.0
  empty = np.zeros_like(mask)
  assert math.isnan(seg.assd(empty, empty, (1, 1, 1)))
  assert seg.assd(mask, empty, (1, 1, 1)) == math.inf and seg.assd(empty, mask, (1, 1, 1)) == math.inf
  with pytest.raises(ValueError, match='spacing'):
    seg.assd(mask, mask, (1.0, 0.0, 1.0))


def _blob(shape, seed, threshold):
  noise = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), 2.5)
  return noise > threshold * noise.std()


def test_surface_distances_match_a_brute_force_nearest_neighbour():
  shape, spacing = (30, 26, 14), np.array([0.75, 0.75, 1.65])
  pred, ref = _blob(shape, 0, 0.5), _blob(shape, 1, 0.5)  # several pieces, some cut by the border
  pred_to_ref, ref_to_pred = seg.surface_distances(pred, ref, spacing)
  p_points = np.argwhere(seg.surface(pred)) * spacing
  r_points = np.argwhere(seg.surface(ref)) * spacing
  assert np.allclose(pred_to_ref, sp_spatial.cKDTree(r_points).query(p_points)[0])
  assert np.allclose(ref_to_pred, sp_spatial.cKDTree(p_points).query(r_points)[0])
  expected = (pred_to_ref.sum() + ref_to_pred.sum()) / (len(p_points) + len(r_points))
  assert seg.assd(pred, ref, spacing) == pytest.approx(expected)
  labels = pred.astype(np.int16) * 49
  assert seg.assd_per_label(labels, ref.astype(np.int16) * 49, spacing, [49])[49] == pytest.approx(expected)


def test_segmentation_report_is_json_safe():
  pred, ref = _cubes()
  names = {49: 'body', 60: 'cord', 61: 'canal', 100: 'disc'}
  report = seg.segmentation_report(pred, ref, (0.75, 0.75, 1.65), names, groups={'spine': (49, 60, 61)})
  json.dumps(report, allow_nan=False)
  assert report['labels']['body']['dice'] == pytest.approx(0.5)
  assert report['labels']['body']['pred_voxels'] == 1000
  assert report['labels']['disc'] == {
      'label': 100, 'dice': None, 'assd_mm': None, 'pred_voxels': 0, 'ref_voxels': 0}
  assert report['labels']['cord']['assd_mm'] is None and report['labels']['cord']['ref_voxels'] == 8  # inf
  assert report['mean_dice'] == pytest.approx(0.5 / 3)
  assert report['mean_assd_mm'] == pytest.approx(report['labels']['body']['assd_mm'])
  assert report['groups']['spine']['dice'] == pytest.approx(1000 / 2016)


def _write(path, array, affine):
  nib.save(nib.Nifti1Image(array, affine), str(path))
  return path


def test_compare_files_and_the_command(tmp_path):
  pred, ref = _cubes()
  affine = np.diag([0.75, 0.75, 1.65, 1.0])
  p = _write(tmp_path / 'pred.nii.gz', pred, affine)
  r = _write(tmp_path / 'ref.nii.gz', ref, affine)
  report = seg.compare_files(p, r)
  assert list(report['labels']) == ['vertebra_corpus', 'spinal_cord', 'spinal_canal']
  assert report['spacing_mm'] == pytest.approx([0.75, 0.75, 1.65])
  assert set(report['groups']) == {'vertebrae', 'spinal_canal'}
  only_body = seg.compare_files(p, r, labels=[49], label_names={49: 'body'})
  assert list(only_body['labels']) == ['body'] and only_body['labels']['body']['dice'] == pytest.approx(0.5)

  out = tmp_path / 'reports' / 'report.json'
  run = subprocess.run([sys.executable, '-m', 'spine_jax.evaluate', 'seg', f'--pred={p}', f'--ref={r}',
                        f'--output={out}', '--labels=49,100'], capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr
  written = json.loads(out.read_text())
  assert list(written['labels']) == ['vertebra_corpus', 'intervertebral_disc'] and written['ref'] == str(r)
  assert seg.summary_table(written) in run.stdout

  moved = affine.copy()
  moved[0, 3] = 5.0
  q = _write(tmp_path / 'moved.nii.gz', pred, moved)
  with pytest.raises(nifti.NiftiError, match='different affines'):
    seg.compare_files(q, r)
  with pytest.raises(nifti.NiftiError, match='missing.nii.gz: file not found'):
    seg.compare_files(tmp_path / 'missing.nii.gz', r)

"""NIfTI loading, reorientation and atomic writes."""
import gzip
import os
import struct

import nibabel as nib
import numpy as np
import pytest

from spine_jax.data import nifti


def _affine(spacing=(0.8, 0.9, 2.5), origin=(-10.0, 20.0, 30.0)):
  affine = np.diag([*spacing, 1.0])
  affine[:3, 3] = origin
  return affine


def _save(path, array, affine):
  nib.save(nib.Nifti1Image(array, affine), str(path))
  return path


def test_round_trip_float_and_mask(tmp_path):
  rng = np.random.default_rng(0)
  image = rng.normal(size=(5, 6, 7)).astype(np.float32)
  labels = rng.integers(0, 30, (5, 6, 7)).astype(np.int16)
  affine = _affine()
  nifti.atomic_save_nifti(image, affine, tmp_path / 'ct.nii.gz')
  nifti.atomic_save_nifti(labels, affine, tmp_path / 'seg.nii')
  got, got_affine, header = nifti.load_nifti(tmp_path / 'ct.nii.gz')
  assert got.dtype == np.float32 and np.array_equal(got, image)
  assert np.allclose(got_affine, affine) and header.get_xyzt_units()[0] == 'mm'
  mask, mask_affine, _ = nifti.load_mask(tmp_path / 'seg.nii')
  assert np.issubdtype(mask.dtype, np.integer) and np.array_equal(mask, labels)
  assert np.allclose(mask_affine, affine)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['ct.nii.gz', 'seg.nii']  # no temp files left


def test_save_keeps_the_arrays_type_over_a_given_header(tmp_path):
  ct = nib.Nifti1Image(np.zeros((3, 3, 3), np.int16), _affine())
  probs = np.linspace(0, 1, 27, dtype=np.float32).reshape(3, 3, 3)
  nifti.atomic_save_nifti(probs, _affine(), tmp_path / 'p.nii.gz', header=ct.header)
  assert np.array_equal(nifti.load_nifti(tmp_path / 'p.nii.gz')[0], probs)
  nifti.atomic_save_nifti(np.arange(27, dtype=np.int64).reshape(3, 3, 3), _affine(), tmp_path / 'i.nii.gz')
  assert np.array_equal(nifti.load_mask(tmp_path / 'i.nii.gz')[0].ravel(), np.arange(27))


def test_trailing_singleton_axis_is_a_3d_volume(tmp_path):
  path = _save(tmp_path / 'x.nii.gz', np.ones((3, 4, 5, 1), np.float32), _affine())
  assert nifti.load_nifti(path)[0].shape == (3, 4, 5)


@pytest.mark.parametrize('axcodes', [('L', 'P', 'S'), ('P', 'I', 'R'), ('S', 'L', 'A')])
def test_canonical_and_back_is_exact(axcodes):
  rng = np.random.default_rng(1)
  ras = rng.normal(size=(4, 5, 6)).astype(np.float32)
  ras_affine = _affine()
  array, affine, _ = nifti.reorient(ras, ras_affine, axcodes)
  assert nib.aff2axcodes(affine) == axcodes
  canonical, canonical_affine, reo = nifti.to_canonical(array, affine)
  assert nib.aff2axcodes(canonical_affine) == ('R', 'A', 'S')
  assert np.array_equal(canonical, ras) and np.allclose(canonical_affine, ras_affine)
  assert np.array_equal(nifti.from_canonical(canonical, reo), array) and np.allclose(reo.affine, affine)
  # The same voxel keeps its world position.
  idx = np.array([1, 2, 3])
  world = affine @ np.append(idx, 1)
  back = np.linalg.solve(canonical_affine, world)[:3].round().astype(int)
  assert array[tuple(idx)] == canonical[tuple(back)]
  assert np.allclose(nifti.spacing_from_affine(canonical_affine), (0.8, 0.9, 2.5))


def test_channels_follow_the_reorientation():
  data = np.arange(4 * 5 * 6 * 2).reshape(4, 5, 6, 2)
  lps = np.diag([-1.0, -1.0, 1.0, 1.0])
  out, _, reo = nifti.to_canonical(data, lps)
  assert out.shape == (4, 5, 6, 2) and np.array_equal(out[::-1, ::-1], data)
  assert np.array_equal(nifti.from_canonical(out, reo), data)


def test_load_image_and_mask_reorients_both(tmp_path):
  ras = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
  lps_image, lps_affine, _ = nifti.reorient(ras, _affine(), ('L', 'P', 'S'))
  _save(tmp_path / 'ct.nii.gz', lps_image, lps_affine)
  _save(tmp_path / 'seg.nii.gz', (lps_image > 30).astype(np.uint8), lps_affine)
  pair = nifti.load_image_and_mask(tmp_path / 'ct.nii.gz', tmp_path / 'seg.nii.gz')
  assert np.array_equal(pair.image, ras) and np.array_equal(pair.mask, ras > 30)
  assert np.allclose(pair.spacing, (0.8, 0.9, 2.5)) and np.allclose(pair.affine, _affine())


def _gz_patch(path, offset, value, out):
  raw = bytearray(gzip.decompress(path.read_bytes()))
  raw[offset:offset + 4] = struct.pack('<f', value)
  out.write_bytes(gzip.compress(bytes(raw)))
  return out


def _bad_files(tmp):
  good = _save(tmp / 'good.nii.gz', np.ones((4, 4, 4), np.float32), _affine())
  corrupt = tmp / 'corrupt.nii.gz'
  corrupt.write_bytes(b'this is not a nifti file at all' * 20)
  truncated = tmp / 'truncated.nii.gz'
  truncated.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
  nan = np.ones((4, 4, 4), np.float32)
  nan[1, 2, 3] = np.nan
  no_sform = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), None)
  nib.save(no_sform, str(tmp / 'pixdim.nii.gz'))
  zero_sform = nib.Nifti1Header()
  zero_sform.set_data_shape((4, 4, 4))
  zero_sform.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=1)
  nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), None, header=zero_sform), str(tmp / 'zero_sform.nii.gz'))
  singular = nib.Nifti1Header()
  singular.set_data_shape((4, 4, 4))
  singular.set_sform(np.array([[1.0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]), code=1)
  nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), None, header=singular), str(tmp / 'singular.nii.gz'))
  return {
      'missing.nii.gz': 'not found',
      'corrupt.nii.gz': 'unreadable',
      'truncated.nii.gz': 'unreadable',
      _save(tmp / 'fourd.nii.gz', np.ones((4, 4, 4, 2), np.float32), _affine()).name: 'expected a 3D volume',
      _save(tmp / 'nan.nii.gz', nan, _affine()).name: '1 NaN or infinite',
      # pixdim[2] = 0 at byte 84 of the header: nibabel would silently read it as 1 mm.
      _gz_patch(tmp / 'pixdim.nii.gz', 84, 0.0, tmp / 'zero_pixdim.nii.gz').name: 'spacing',
      'zero_sform.nii.gz': 'spacing',
      'singular.nii.gz': 'singular affine',
  }


def test_bad_files_raise_naming_the_file(tmp_path):
  for name, fault in _bad_files(tmp_path).items():
    with pytest.raises(nifti.NiftiError) as info:
      nifti.load_nifti(tmp_path / name)
    assert str(tmp_path / name) in str(info.value) and fault in str(info.value), (name, str(info.value))


def test_mask_with_fractions_is_rejected(tmp_path):
  path = _save(tmp_path / 'probs.nii.gz', np.full((3, 3, 3), 0.5, np.float32), _affine())
  with pytest.raises(nifti.NiftiError, match='probs.nii.gz: label mask has non-integer'):
    nifti.load_mask(path)


def test_grid_mismatch_names_both_files():
  with pytest.raises(nifti.NiftiError, match=r'mask m.nii.gz has shape \(3, 3, 4\) but image i.nii.gz'):
    nifti.check_same_grid('i.nii.gz', _affine(), (3, 3, 3), 'm.nii.gz', _affine(), (3, 3, 4))
  shifted = _affine(origin=(-10.0, 20.0, 31.0))
  with pytest.raises(nifti.NiftiError, match='mask m.nii.gz and image i.nii.gz have different affines'):
    nifti.check_same_grid('i.nii.gz', _affine(), (3, 3, 3), 'm.nii.gz', shifted, (3, 3, 3))
  nifti.check_same_grid('i.nii.gz', _affine(), (3, 3, 3), 'm.nii.gz', _affine() + 1e-5, (3, 3, 3))


def test_atomic_write_failure_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
  target = tmp_path / 'report.json'
  nifti.atomic_write_text(target, 'old')
  assert target.read_text() == 'old' and oct(target.stat().st_mode & 0o777) != '0o600'

  def failing_replace(src, dst):
    raise OSError('disk full')
  monkeypatch.setattr(nifti.os, 'replace', failing_replace)
  with pytest.raises(OSError, match='disk full'):
    nifti.atomic_write_text(target, 'new and longer')
  assert target.read_text() == 'old'
  assert [p.name for p in tmp_path.iterdir()] == ['report.json']


def test_atomic_nifti_failure_leaves_nothing(tmp_path, monkeypatch):
  def partial_save(img, filename):
    with open(filename, 'wb') as f:
      f.write(b'half a file')
    raise OSError('killed while writing')
  monkeypatch.setattr(nifti.nib, 'save', partial_save)
  with pytest.raises(OSError, match='killed'):
    nifti.atomic_save_nifti(np.zeros((2, 2, 2), np.float32), _affine(), tmp_path / 'out' / 'x.nii.gz')
  assert list((tmp_path / 'out').iterdir()) == []


def test_atomic_bytes_overwrites_whole(tmp_path):
  target = tmp_path / 'a.png'
  nifti.atomic_write_bytes(target, b'x' * 1000)
  nifti.atomic_write_bytes(target, b'short')
  assert target.read_bytes() == b'short' and os.listdir(tmp_path) == ['a.png']
  with pytest.raises(nifti.NiftiError, match='must end in .nii'):
    nifti.atomic_save_nifti(np.zeros((2, 2, 2)), _affine(), tmp_path / 'x.img')

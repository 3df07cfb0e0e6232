"""Users' manifests: a phantom NIfTI data set round trip, and every bad input named precisely."""
import json

import nibabel as nib
import numpy as np
import pytest

from spine_jax.data import manifest
from spine_jax.data import nifti
from spine_jax.data import slices
from spine_jax.data.phantoms import ct


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  """Three lumbar phantom vertebrae (L1-L3) in one LPS scan, with a CSV manifest."""
  return ct.write_phantom_nifti(tmp_path_factory.mktemp('phantom'), 3, seed=5, top_level='L1',
                                qualities=[0, 3, 2], posterolaterals=[0, 2, 1])


def _cfg():
  cfg = slices.default_slice_config()
  cfg.image_size = 32
  return cfg


def test_written_dataset_looks_like_a_users(dataset):
  image = nib.load(str(dataset['image']))
  assert nib.aff2axcodes(image.affine) == ('L', 'P', 'S') and image.get_data_dtype() == np.int16
  lines = dataset['manifest'].read_text().splitlines()
  assert lines[0] == 'image,mask,label,quality,posterolateral,scheme'
  assert lines[1:] == ['phantom_ct.nii.gz,phantom_seg.nii.gz,20,normal,none,spineps',
                       'phantom_ct.nii.gz,phantom_seg.nii.gz,21,lytic,bilateral,spineps',
                       'phantom_ct.nii.gz,phantom_seg.nii.gz,22,mixed,unilateral,spineps']
  records = manifest.read_manifest(dataset['manifest'])
  assert [r.level for r in records] == ['L1', 'L2', 'L3'] and [r.row for r in records] == [1, 2, 3]
  assert records[0].image == dataset['image'] and records[2].line == 4


def test_manifest_round_trips_into_the_same_slices(dataset):
  data = manifest.build_manifest_slices(dataset['manifest'], _cfg())
  assert list(data['vert_quality']) == [0, 3, 2] and list(data['vert_posterolateral']) == [0, 2, 1]
  assert list(data['vert_level']) == ['L1', 'L2', 'L3'] and list(data['vert_label']) == [20, 21, 22]
  for i, record in enumerate(dataset['records']):
    expected, z = slices.extract_vertebra_slices(np.rint(dataset['volume_hu']), dataset['mask_ras'],
                                                 record['label'], dataset['spacing'], _cfg())
    sel = data['vertebra'] == i
    assert np.array_equal(data['image'][sel], expected) and np.array_equal(data['z_index'][sel], z)
    assert (data['quality'][sel] == record['quality']).all()
    assert (data['posterolateral'][sel] == record['posterolateral']).all()


def test_jsonl_manifest_and_splits(dataset, tmp_path):
  rows = [dict(image=str(dataset['image']), mask=str(dataset['mask']), label=20, quality=0, posterolateral=0,
               split='train'),
          dict(image=str(dataset['image']), mask=str(dataset['mask']), label=22, quality='Mixed',
               posterolateral='unilateral', split='test')]
  path = tmp_path / 'm.jsonl'
  manifest.write_manifest(path, rows)
  assert json.loads(path.read_text().splitlines()[1])['label'] == 22
  test = manifest.build_manifest_slices(path, _cfg(), split='test')
  assert list(test['vert_label']) == [22] and list(test['vert_quality']) == [2] and test['vert_level'][0] == ''
  assert list(manifest.build_manifest_slices(path, _cfg(), split='train')['vert_label']) == [20]
  with pytest.raises(manifest.ManifestError, match=r"m.jsonl: no rows with split 'val' \(splits present: test, train"):
    manifest.build_manifest_slices(path, _cfg(), split='val')


def _write(path, text):
  path.write_text(text)
  return path


GOOD = 'phantom_ct.nii.gz,phantom_seg.nii.gz,20,normal,none\n'
HEADER = 'image,mask,label,quality,posterolateral\n'


@pytest.mark.parametrize('name, text, message', [
    ('empty.csv', HEADER, r'empty.csv: empty manifest \(no rows\)'),
    ('blank.csv', '', r'blank.csv: empty manifest'),
    ('nocol.csv', 'image,mask,label,quality\n' + GOOD, r'nocol.csv: missing column\(s\) posterolateral'),
    ('class.csv', HEADER + GOOD + GOOD.replace('20,normal', '21,blastik'),
     r"class.csv, row 2 \(line 3\), field 'quality': unknown class 'blastik'"),
    ('pl.csv', HEADER + GOOD.replace('none', '3'),
     r"pl.csv, row 1 \(line 2\), field 'posterolateral': unknown class '3'"),
    ('file.csv', HEADER + GOOD + GOOD.replace('phantom_seg', 'nothere'),
     r"file.csv, row 2 \(line 3\), field 'mask': file not found: .*nothere.nii.gz"),
    ('label.csv', HEADER + GOOD.replace(',20,', ',L1,'),
     r"label.csv, row 1 \(line 2\), field 'label': expected a positive"),
    ('value.csv', HEADER + GOOD.replace(',20,', ',,'), r"value.csv, row 1 \(line 2\), field 'label': missing value"),
    ('dup.csv', HEADER + GOOD + GOOD, r'dup.csv, row 2 \(line 3\): the same vertebra .* as row 1'),
    ('split.csv', HEADER.strip() + ',split\n' + GOOD.strip() + ',validation\n', r"split.csv, row 1 .* unknown split"),
    ('scheme.csv', HEADER.strip() + ',scheme\n' + GOOD.strip() + ',totalsegmentator\n',
     r"scheme.csv, row 1 .*label 20 is not a vertebra in the totalsegmentator scheme"),
    ('bad.jsonl', '{"image": "phantom_ct.nii.gz"\n', r'bad.jsonl, row 1 \(line 1\): not valid JSON'),
    ('key.jsonl', '\n{"image": "phantom_ct.nii.gz", "mask": "phantom_seg.nii.gz", "label": 20, "quality": 0}\n',
     r"key.jsonl, row 1 \(line 2\), field 'posterolateral': missing value"),
    ('m.txt', HEADER + GOOD, r'm.txt: unknown manifest format'),
])
def test_bad_manifests_name_manifest_row_and_field(dataset, name, text, message):
  path = _write(dataset['image'].parent / name, text)
  with pytest.raises(manifest.ManifestError, match=message):
    manifest.read_manifest(path)


def test_missing_manifest(tmp_path):
  with pytest.raises(manifest.ManifestError, match='nowhere.csv: manifest not found'):
    manifest.read_manifest(tmp_path / 'nowhere.csv')


def test_label_absent_from_mask_names_row_mask_and_label(dataset):
  path = _write(dataset['image'].parent / 'absent.csv', HEADER + GOOD.replace(',20,', ',9,'))
  message = (r"absent.csv, row 1, field 'label': mask .*phantom_seg.nii.gz: "
             r'label 9 is absent from the mask \(labels present: 19, 20, 21, 22, 23\)')
  with pytest.raises(manifest.ManifestError, match=message):
    manifest.build_manifest_slices(path, _cfg())


def test_mask_on_another_grid_names_both_files(dataset, tmp_path):
  img = nib.load(str(dataset['mask']))
  moved = img.affine.copy()
  moved[0, 3] += 2.0
  nifti.atomic_save_nifti(np.asarray(img.dataobj), moved, tmp_path / 'moved_seg.nii.gz')
  path = _write(tmp_path / 'moved.csv', HEADER + f'{dataset["image"]},moved_seg.nii.gz,20,normal,none\n')
  with pytest.raises(nifti.NiftiError, match=r'moved.csv, row 1: mask .*moved_seg.nii.gz and image .*phantom_ct.nii.gz '
                                             r'have different affines'):
    manifest.build_manifest_slices(path, _cfg())


def test_corrupt_scan_names_the_row_and_file(dataset, tmp_path):
  (tmp_path / 'broken.nii.gz').write_bytes(dataset['image'].read_bytes()[:5000])
  path = _write(tmp_path / 'broken.csv', HEADER + f'broken.nii.gz,{dataset["mask"]},20,normal,none\n')
  with pytest.raises(nifti.NiftiError, match=r'broken.csv, row 1: .*broken.nii.gz: unreadable'):
    manifest.build_manifest_slices(path, _cfg())

"""`predict spine --output_format=spineps`: SPINEPS' names, folder and centroid file, against SPINEPS' own code.

The names are compared with seg_run.py `output_paths_from_input` and the centroid file with what seg_run.py
writes (seg_pipeline.predict_centroids_from_both, resampled to the scan's grid, saved, read by `POI.load`) on
the same masks; our file is read by `POI.load` too. The command itself is tested in test_spine_pipeline.py.
"""
import json
import pathlib

import nibabel as nib
import numpy as np
import pytest

from spine_jax.data import nifti
from spine_jax.data.phantoms import mri
from spine_jax.inference import batch
from spine_jax.inference import spine
from spine_jax.inference import spineps_outputs
from tests import spineps_oracle

# BIDS names with other entities, repeated and unknown keys, values that break a BIDS rule (SPINEPS then names in
# non-strict mode), and names that are not BIDS at all.
NAMES = ["sub-01_T2w.nii.gz", "sub-X_ses-1_acq-sag_T2w.nii.gz", "sub-X_acq-sag_ses-1_run-2_T2w.nii.gz",
         "sub-01_chunk-a_desc-x_T2w.nii", "sub-01_ses-01_sequ-3_rec-b_T2w.nii.gz", "sub-01_mod-T1w_T2w.nii.gz",
         "sub-01_seg-foo_T2w.nii.gz", "sub-01_xyz-1_abc-2_T2w.nii.gz", "sub-01_ses-1_ses-2_T2w.nii.gz",
         "sub-01_dixon.nii.gz", "sub-1_run-a_T2w.nii.gz", "scan_run-a_T2w.nii.gz", "scan_task-a+b_hemi-X_T2w.nii.gz",
         "patient7_mt-yes_echo-1_T2w.nii.gz", "subject7_run-x_T2w.nii.gz", "scan.nii.gz", "my_scan.nii.gz",
         "my.scan.nii.gz", "SCAN_T2W.NII.GZ", "T2_TSE_SAG.nii.gz", "a-b_c-d_T2w.nii.gz", "Foo-1_sub-2_T2w.nii.gz",
         "sub-01_acq-sa.g_T2w.nii.gz", "sub_01_T2w.nii.gz", "sub-01__T2w.nii.gz", "sub-01.nii.gz", "T2w.nii.gz"]
KEYS = {"semantic": "out_spine", "instance": "out_vert", "centroids": "out_ctd", "snapshot": "out_snap"}


def _need_spineps():
  reason = spineps_oracle.available()
  if reason:
    pytest.skip(reason)


def test_names_are_spineps_own():
  _need_spineps()
  theirs = spineps_oracle.call("worker.output_paths", {}, names=NAMES)
  for i, name in enumerate(NAMES):
    ours = batch.output_paths(spineps_outputs.OUTPUT_FOLDER, batch.scan_stem(name), "spineps")
    assert {key: str(path) for key, path in ours.items()} == {k: str(theirs[f"{i}/{v}"]) for k, v in KEYS.items()}, name


def test_plan_puts_spineps_names_in_derivatives_seg_of_the_mirrored_folder(tmp_path):
  inputs = tmp_path / "in"
  scans = [inputs / "sub-01" / "anat" / "sub-01_ses-1_T2w.nii.gz", inputs / "sub-02" / "anat" / "scan.nii"]
  jobs = batch.plan_jobs(scans, tmp_path / "out", root=inputs, output_format="spineps")
  assert [job.outputs()["instance"] for job in jobs] == [
      tmp_path / "out/sub-01/anat/derivatives_seg/sub-01_ses-1_mod-T2w_seg-vert_msk.nii.gz",
      tmp_path / "out/sub-02/anat/derivatives_seg/mod-scan_seg-vert_msk.nii.gz"]
  single = batch.plan_jobs(scans[:1], tmp_path / "out", output_format="spineps")[0]
  assert single.outputs()["centroids"] == tmp_path / "out/derivatives_seg/sub-01_ses-1_mod-T2w_seg-spine_ctd.json"
  # SPINEPS names `scan` and `my_scan` alike (the part before the last '_' is no BIDS entity): refused, named.
  clash = [inputs / "scan.nii.gz", inputs / "my_scan.nii.gz"]
  assert len(batch.plan_jobs(clash, tmp_path / "out", root=inputs)) == 2  # our names differ
  with pytest.raises(batch.BatchError, match="my_scan.nii.gz -> .*derivatives_seg/mod-scan_seg-spine_msk.nii.gz"):
    batch.plan_jobs(clash, tmp_path / "out", root=inputs, output_format="spineps")
  with pytest.raises(batch.BatchError, match="--output_format 'bids': expected one of spine_jax, spineps"):
    batch.plan_jobs(scans, tmp_path / "out", output_format="bids")


def _ties_case(rng):
  """Vertebrae with 40 scattered corpus voxels each (mean indices k/40: half are ties at 2 decimals, most of
  those without an exact binary value, so the frame TPTBox rounds in matters) and 10 other voxels, some
  beyond the semantic mask's box (unlabelled there), discs and an endplate beside them, on an oblique grid."""
  shape = (40, 52, 30)
  instance = np.zeros(shape, np.int16)
  semantic = np.zeros(shape, np.uint8)
  semantic[14:26, 8:45, 4:26] = 61  # the canal
  box = np.argwhere(np.ones((36, 46, 26), bool)) + (2, 3, 2)
  inside = (box[:, 0] >= 10) & (box[:, 0] < 30)  # semantic labels only here: the semantic box is narrower
  corpus, other = rng.permutation(box[inside]), rng.permutation(box[~inside])
  for i, label in enumerate(range(1, 26)):
    instance[tuple(corpus[40 * i: 40 * i + 40].T)] = label
    semantic[tuple(corpus[40 * i: 40 * i + 40].T)] = 49
    instance[tuple(other[10 * i: 10 * i + 10].T)] = label
  for i, label in enumerate((103, 104, 205)):
    instance[tuple(corpus[-40 * (i + 1):][:40].T)] = label
    semantic[tuple(corpus[-40 * (i + 1):][:40].T)] = 100
  rotation = np.linalg.qr(rng.normal(size=(3, 3)))[0]
  affine = np.eye(4)
  affine[:3, :3], affine[:3, 3] = rotation * (0.8, 1.1, 3.3), (-40.3, 12.7, 101.9)
  return semantic, instance, affine


def _cases():
  volume = mri.make_volume(mri.smoke_config(), "test", 0)
  semantic, instance, affine = volume["semantic"], volume["instance"], volume["affine"]
  lps = [nifti.reorient(a, affine, ("L", "P", "S"))[:2] for a in (semantic, instance)]
  sacrum = lps[1][0].copy()
  sacrum[sacrum == sacrum[(sacrum > 0) & (sacrum < 100)].max()] = 26  # the lowest vertebra as S1
  return {"phantom": (semantic, instance, affine), "lps_with_sacrum": (lps[0][0], sacrum, lps[0][1]),
          "ties": _ties_case(np.random.default_rng(3)),
          "no_vertebra": (semantic, np.where(instance >= 100, instance, 0).astype(np.int16), affine)}


@pytest.mark.parametrize("case", ["phantom", "lps_with_sacrum", "ties", "no_vertebra"])
def test_centroid_file_is_spineps_poi(case, tmp_path):
  _need_spineps()
  semantic, instance, affine = _cases()[case]
  image_path = tmp_path / "sub-01_T2w.nii.gz"  # the scan, read as the command reads it: the file's affine
  nib.save(nib.Nifti1Image(np.zeros(semantic.shape, np.float32), affine), str(image_path))
  _, affine, _ = nifti.load_nifti(image_path)
  ours = tmp_path / "ours_ctd.json"
  ours.write_text(spineps_outputs.poi_json(semantic, instance, affine, {"messages": ["a warning"]}))
  got = spineps_oracle.call("worker.poi_centroids", {"semantic": semantic, "instance": instance},
                            image_path=str(image_path), ours=str(ours))
  if case == "no_vertebra":  # SPINEPS writes no file without a point; ours is an empty POI on the grid
    assert not got["ref/written"] and got["ours/ids"].shape == (0, 2)
    assert got["ours/shape"].tolist() == list(semantic.shape)
    return
  np.testing.assert_array_equal(got["ours/ids"], got["ref/ids"])
  assert len(got["ref/ids"]) >= 3 and set(got["ref/ids"][:, 1]) == {50}
  np.testing.assert_allclose(got["ours/points"], got["ref/points"], atol=1e-3, rtol=0)
  assert got["ours/direction"].tolist() == got["ref/direction"].tolist()
  for field in ("zoom", "origin", "rotation", "shape"):
    np.testing.assert_allclose(got[f"ours/{field}"], got[f"ref/{field}"], atol=1e-6, rtol=0, err_msg=field)
  if case == "lps_with_sacrum":
    assert 26 in got["ours/ids"][:, 0]
  if case == "ties":  # rounded in the whole grid's indices instead, one coordinate at least is 0.01 off
    whole = [[round(float(c), 2) for c in np.argwhere((instance == v) & (semantic == 49)).mean(axis=0)]
             for v, _ in got["ref/ids"]]
    assert np.abs(np.array(whole) - got["ref/points"]).max() > 0.005


def test_centroid_file_fields(tmp_path):
  """What the file holds without SPINEPS: TPTBox's header, our run's facts after it, points by vertebra."""
  semantic, instance, affine = _cases()["phantom"]
  header, points = json.loads(spineps_outputs.poi_json(semantic, instance, affine, {"input": "x.nii.gz"}))
  assert list(header)[:8] == ["direction", "zoom", "origin", "rotation", "shape", "format", "level_one_info",
                              "level_two_info"]
  assert header["direction"] == ["P", "I", "R"] and header["shape"] == [96, 160, 32] and header["format"] == "POI"
  assert header["input"] == "x.nii.gz" and list(points) == ["19", "20", "21", "22"]  # 18 shows no corpus
  body = (instance == 20) & (semantic == 49)
  np.testing.assert_allclose(points["20"]["50"], np.argwhere(body).mean(axis=0), atol=0.006)


def test_outputs_written_all_or_none_in_spineps_format(tmp_path, monkeypatch):
  semantic, instance, affine = _cases()["phantom"]
  result = {"semantic": semantic, "instance": instance, "messages": ["m"], "centroids": {}}
  paths = spine.output_paths(tmp_path / "derivatives_seg", "sub-01_T2w", "spineps")
  spine.write_outputs(result, semantic.astype(np.float32), affine, paths, meta={"input": "memory"},
                      output_format="spineps")
  assert sorted(p.name for p in (tmp_path / "derivatives_seg").iterdir()) == sorted(
      ["sub-01_mod-T2w_seg-spine_msk.nii.gz", "sub-01_mod-T2w_seg-vert_msk.nii.gz",
       "sub-01_mod-T2w_seg-spine_ctd.json", "sub-01_mod-T2w_seg-spine_snp.png"])
  header, points = json.loads(paths["centroids"].read_text())
  assert header["messages"] == ["m"] and header["source"] == "spine_jax predict spine" and points

  def disk_full(*_, **__):
    raise OSError("No space left on device")
  monkeypatch.setattr(nifti, "atomic_write_bytes", disk_full)  # the centroid file: both masks are written by then
  failed = spine.output_paths(tmp_path / "failed", "sub-01_T2w", "spineps")
  with pytest.raises(OSError, match="No space"):
    spine.write_outputs(result, semantic.astype(np.float32), affine, failed, output_format="spineps")
  assert not [p for p in pathlib.Path(tmp_path / "failed").rglob("*") if p.is_file()]

"""Checkpoint inference on CT scans: the real CT, batch runs that go on after a failure, bad inputs."""
import csv
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import nibabel as nib
import numpy as np
import pytest

from spine_jax.data import nifti
from spine_jax.data import slices as slices_lib
from spine_jax.inference import bone_quality

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smoke_run(bone_quality_smoke_run):
  return bone_quality_smoke_run


@pytest.fixture(scope="module")
def classifier(smoke_run):
  return bone_quality.load_bone_quality(smoke_run)


def _write(path, array, affine):
  nib.save(nib.Nifti1Image(array, affine), str(path))
  return path


def test_training_wrote_eval_and_pictures(smoke_run):
  report = json.loads((smoke_run / "eval.json").read_text())
  assert report["task"] == "bone_quality" and report["step"] == 6
  for level in ("slice", "vertebra"):
    for name in ("quality", "posterolateral"):
      rep = report[level][name]
      cm = np.array(rep["confusion_matrix"])
      assert cm.sum() == rep["num_samples"]
      assert (smoke_run / f"confusion_{name}_{level}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert report["vertebra"]["quality"]["num_samples"] == report["num_vertebrae"] == 12


def test_real_ct_report_from_the_command_line(smoke_run, example_ct_dir, tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, "-m", "spine_jax.predict", "bone_quality", f"--checkpoint={smoke_run}",
         f"--image={example_ct_dir / 'example_ct.nii.gz'}", f"--mask={example_ct_dir / 'totalseg.nii.gz'}",
         "--scheme=totalsegmentator", f"--output={tmp_path}"]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads((tmp_path / "example_ct_bone_quality.json").read_text())
  levels = [v["level"] for v in report["vertebrae"]]
  assert levels == ["T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1"]  # cranio-caudal, TotalSegmentator ids
  l3 = report["vertebrae"][4]
  assert l3["label"] == 29 and 8 <= l3["num_slices"] <= 16  # body and sloping posterior elements, 3 mm slices
  assert abs(sum(l3["quality_probs"].values()) - 1) < 1e-4
  assert l3["sins"]["components"]["location"] == 2  # L2-L4: mobile
  with open(tmp_path / "example_ct_bone_quality.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert [r["level"] for r in rows] == levels
  assert not list(tmp_path.glob("*.tmp*")) and not list(tmp_path.glob(".*"))


def test_pairs_run_reports_a_failure_and_goes_on(smoke_run, example_ct_dir, tmp_path):
  pairs = tmp_path / "pairs.csv"
  (tmp_path / "a").mkdir()
  shutil.copy(example_ct_dir / "example_ct.nii.gz", tmp_path / "a")  # one image per row: outputs never collide
  pairs.write_text("image,mask\n"
                   f"a/example_ct.nii.gz,{example_ct_dir / 'missing_mask.nii.gz'}\n"
                   f"{example_ct_dir / 'example_ct.nii.gz'},{example_ct_dir / 'totalseg.nii.gz'}\n")
  out_dir = tmp_path / "out"
  cmd = [sys.executable, "-m", "spine_jax.predict", "bone_quality", f"--checkpoint={smoke_run}", f"--pairs={pairs}",
         "--scheme=totalsegmentator", "--labels=29", f"--output={out_dir}"]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert out.returncode == 1
  assert "missing_mask.nii.gz" in out.stderr and "1 of 2 scan(s) failed" in out.stderr
  report = json.loads((out_dir / "example_ct_bone_quality.json").read_text())
  assert [v["level"] for v in report["vertebrae"]] == ["L3"]


@pytest.fixture()
def small_scan(tmp_path):
  affine = np.diag([1.5, 1.5, 2.5, 1.0])
  image = np.full((40, 40, 12), 40.0, np.float32)
  mask = np.zeros((40, 40, 12), np.uint8)
  mask[12:28, 12:28, 2:10] = 20  # a box "L1" in SPINEPS numbering
  image[mask > 0] = 250.0
  return tmp_path, image, mask, affine


def test_bad_inputs_name_the_file(classifier, small_scan):
  state, config, mesh = classifier
  tmp, image, mask, affine = small_scan
  img = _write(tmp / "ct.nii.gz", image, affine)
  msk = _write(tmp / "seg.nii.gz", mask, affine)
  rows, ignored = bone_quality.classify_ct(state, config, mesh, img, msk, scheme="spineps")
  assert [r["level"] for r in rows] == ["L1"] and rows[0]["num_slices"] == 8 and ignored == []

  with pytest.raises(nifti.NiftiError, match="nope.nii.gz"):
    bone_quality.classify_ct(state, config, mesh, tmp / "nope.nii.gz", msk, scheme="spineps")
  shifted = _write(tmp / "shifted.nii.gz", mask, affine @ np.diag([1, 1, 2, 1.0]))
  with pytest.raises(nifti.NiftiError, match="shifted.nii.gz"):
    bone_quality.classify_ct(state, config, mesh, img, shifted, scheme="spineps")
  with pytest.raises(slices_lib.SliceError, match=r"seg.nii.gz.*\[21\]"):
    bone_quality.classify_ct(state, config, mesh, img, msk, scheme="spineps", labels=[21])
  nan_image = image.copy()
  nan_image[0, 0, 0] = np.nan
  bad = _write(tmp / "nan.nii.gz", nan_image, affine)
  with pytest.raises(nifti.NiftiError, match="nan.nii.gz"):
    bone_quality.classify_ct(state, config, mesh, bad, msk, scheme="spineps")
  truncated = tmp / "truncated.nii.gz"
  truncated.write_bytes(img.read_bytes()[:200])
  with pytest.raises(nifti.NiftiError, match="truncated.nii.gz"):
    bone_quality.classify_ct(state, config, mesh, truncated, msk, scheme="spineps")


def _predict_ct(*args):
  return subprocess.run([sys.executable, "-m", "spine_jax.predict", "bone_quality", *map(str, args)], capture_output=True,
                        text=True, cwd=ROOT, timeout=300)


def test_mask_in_the_other_numbering_is_refused(smoke_run, example_ct_dir, tmp_path):
  """TotalSegmentator's labels read as SPINEPS' would give T13 and S1 where L4 and S1 are: refused, named."""
  out = _predict_ct(f"--checkpoint={smoke_run}", f"--image={example_ct_dir / 'example_ct.nii.gz'}",
                    f"--mask={example_ct_dir / 'totalseg.nii.gz'}", "--scheme=spineps", f"--output={tmp_path / 'o'}")
  assert out.returncode == 1 and "Traceback" not in out.stderr
  assert "totalseg.nii.gz: labels [27, 29, 30, 31, 32, 33] are not SPINEPS vertebra ids" in out.stderr
  assert "--scheme=totalsegmentator" in out.stderr
  assert not [p for p in (tmp_path / "o").rglob("*")]


def test_pairs_with_repeated_names_keep_their_folders(smoke_run, example_ct_dir, tmp_path):
  for sub in ("a", "b"):
    (tmp_path / sub).mkdir()
    shutil.copy(example_ct_dir / "example_ct.nii.gz", tmp_path / sub / "ct.nii.gz")
    shutil.copy(example_ct_dir / "totalseg.nii.gz", tmp_path / sub / "seg.nii.gz")
  (tmp_path / "pairs.csv").write_text("image,mask\na/ct.nii.gz,a/seg.nii.gz\nb/ct.nii.gz,b/seg.nii.gz\n")
  out = _predict_ct(f"--checkpoint={smoke_run}", f"--pairs={tmp_path / 'pairs.csv'}", "--scheme=totalsegmentator",
                    "--labels=29", f"--output={tmp_path / 'o'}")
  assert out.returncode == 0, out.stderr[-2000:]
  for sub in ("a", "b"):
    report = json.loads((tmp_path / "o" / sub / "ct_bone_quality.json").read_text())
    assert report["image"] == str(tmp_path / sub / "ct.nii.gz") and report["ignored_labels"] == [26, 27, 28, 30, 31,
                                                                                                 32, 33]
  assert "labels not classified" in out.stdout


@pytest.mark.parametrize("kind", ["checkpoint", "bundle"])
def test_a_model_saved_under_the_former_task_name_loads(smoke_run, classifier, tmp_path, kind):
  """Checkpoints and bundles written before the task was named bone_quality say task 'mtl'."""
  run = tmp_path / "run"
  if kind == "checkpoint":
    shutil.copytree(smoke_run / "checkpoints", run / "checkpoints")
    for metadata in run.glob("checkpoints/*/config/metadata"):
      metadata.write_text(json.dumps({**json.loads(metadata.read_text()), "task": "mtl"}))
  else:
    shutil.copytree(smoke_run / "bundle", run)
    spec = json.loads((run / "bundle.json").read_text())
    (run / "bundle.json").write_text(json.dumps({**spec, "task": "mtl", "config": {**spec["config"], "task": "mtl"}}))
  state, config, _ = bone_quality.load_bone_quality(run)
  assert config.task == "bone_quality"
  want, _, _ = classifier
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want.params)))

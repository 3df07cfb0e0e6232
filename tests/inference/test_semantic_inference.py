"""SPINEPS phase 1 end to end on tiny settings: train, then segment NIfTI files in their own grid."""
import json
import pathlib
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from configs import semantic as semantic_config
from spine_jax.data import spine_labels
from spine_jax.data.phantoms import mri

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def semantic_run(semantic_smoke_run):
  return semantic_smoke_run, None


def test_training_reports_dice_per_structure(semantic_run):
  workdir, report = semantic_run
  saved = json.loads((workdir / "eval.json").read_text())
  assert saved["task"] == "semantic" and saved["step"] == 4
  assert set(saved["dice"]) == {spine_labels.structure_name(i) for i in spine_labels.SEMANTIC_IDS if i}
  assert saved["num_volumes"] == 1 and len(saved["volumes"]) == 1
  assert set(saved["postprocessed"]["dice"]) == set(saved["dice"])
  assert saved["postprocessed"]["mean_dice"] is None or 0.0 <= saved["postprocessed"]["mean_dice"] <= 1.0


def test_predict_folder_keeps_each_input_grid_and_goes_on_after_a_failure(semantic_run, tmp_path):
  workdir, _ = semantic_run
  scans = tmp_path / "scans"
  info = mri.write_mri_phantom_nifti(scans, 1, seed=3, axcodes=("L", "A", "S"),
                                     cfg=semantic_config.get_config("smoke").data.phantom)
  image_path = scans / info["volumes"][0]["image"] if not pathlib.Path(info["volumes"][0]["image"]).is_absolute() \
      else pathlib.Path(info["volumes"][0]["image"])
  (scans / "broken_T2w.nii.gz").write_bytes(b"not a nifti file")
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "spine_jax.predict", "semantic", f"--checkpoint={workdir}", f"--input={scans}",
         f"--output={out}"]
  run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert run.returncode == 1, run.stderr[-3000:]
  assert "broken_T2w.nii.gz" in run.stderr and "1 failed" in run.stdout
  stem = image_path.name[: -len(".nii.gz")]
  mask_img = nib.load(str(out / f"{stem}_seg-spine_msk.nii.gz"))
  src = nib.load(str(image_path))
  assert mask_img.shape == src.shape
  np.testing.assert_allclose(mask_img.affine, src.affine, atol=1e-5)
  assert nib.aff2axcodes(mask_img.affine) == ("L", "A", "S")
  assert set(np.unique(np.asarray(mask_img.dataobj))) <= set(spine_labels.SEMANTIC_IDS)
  assert (out / f"{stem}_seg-spine_snp.png").read_bytes()[:4] == b"\x89PNG"
  assert not (out / "broken_T2w_seg-spine_msk.nii.gz").exists()
  # A second run skips what is done.
  again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert "1 already done" in again.stdout


def test_predict_flags_override_the_checkpoints_inference_settings():
  from spine_jax import predict
  config = semantic_config.get_config("smoke")
  assert tuple(config.inference.mirror_axes) == (2,)
  predict.inference_overrides(config)
  assert tuple(config.inference.mirror_axes) == (2,) and config.inference.step_size == 0.5
  predict.inference_overrides(config, disable_tta=True, step_size=0.75)
  assert tuple(config.inference.mirror_axes) == () and config.inference.step_size == 0.75

"""The semantic sliding window against SPINEPS' own (TPTBox's nnU-Net predictor, as SPINEPS 2.1.3 loads and
runs it) on the same preprocessed array and the same exported weights.

`inference.sliding_window_mode='spineps'` reproduces SPINEPS' float16 window weights and sums; the default
keeps nnU-Net's float32 Gaussian, and the test measures how far that is from SPINEPS' logits.
"""
import numpy as np
import pytest

from spine_jax.conversion import export_spineps
from spine_jax.conversion import spineps
from spine_jax.data import spine_labels
from spine_jax.data.phantoms import mri as mri_phantoms
from spine_jax.engine import predict as predict_lib
from spine_jax.inference import restore
from spine_jax.inference import sliding_window
from tests import spineps_oracle


@pytest.fixture(scope="module")
def oracle():
  reason = spineps_oracle.available()
  if reason:
    pytest.skip(reason)


def test_the_spineps_map_is_tptbox_compute_gaussian(oracle):
  for patch in ((64, 128, 32), (20, 36, 12)):
    want = spineps_oracle.call("worker.importance_map", {}, patch_size=list(patch))["out"]
    got = sliding_window.spineps_importance_map(patch)
    assert got.dtype == want.dtype == np.float16
    np.testing.assert_array_equal(got, want)
  # The underflow the module docstring describes: most of the map sits at the raised minimum.
  raised = sliding_window.spineps_importance_map((64, 128, 32))
  assert 0.5 < np.mean(raised == raised.min()) < 0.6
  assert raised.min() / raised.max() > 1e-4 > sliding_window.gaussian_importance_map((64, 128, 32)).min() / 10


@pytest.fixture(scope="module")
def models(semantic_smoke_run, tmp_path_factory):
  pytest.importorskip("torch", reason="torch is an optional extra (pip install -e '.[torch]')", exc_type=ImportError)
  root = tmp_path_factory.mktemp("window")
  export_spineps.export_pair(root / "folders", semantic_checkpoint=semantic_smoke_run)
  out = {}
  for defects in (False, True):
    target = root / f"bundles_{defects}"
    spineps.convert_pair(target, semantic_folder=root / "folders" / "semantic", trust_pickle=True,
                         spineps_defects=defects)
    out[defects] = restore.load_for_inference(target / "semantic", "semantic")
  return root / "folders" / "semantic", out


def _ours(loaded, x):
  state, config, mesh = loaded
  return sliding_window.sliding_window_predict(
      predict_lib.semantic_logits_fn(state, mesh), x[..., None].astype(np.float32),
      tuple(config.data.patch.patch_size), spine_labels.NUM_CLASSES, step_size=config.inference.step_size,
      batch_size=config.inference.batch_size, mirror_axes=tuple(config.inference.mirror_axes),
      mode=sliding_window.window_mode_of(config.inference))


def test_spineps_window_mode_gives_spineps_logits(oracle, models):
  folder, bundles = models
  assert bundles[True][1].inference.sliding_window_mode == "spineps"
  assert bundles[False][1].inference.sliding_window_mode == "spine_jax"
  patch = tuple(bundles[True][1].data.patch.patch_size)
  image = mri_phantoms.make_volume(mri_phantoms.smoke_config(), "train", 0)["image"]
  # z-scores in float16, as nnU-Net hands them over, on a box that needs several windows on every axis
  size = tuple(int(p * 1.7) for p in patch)
  x = np.tile(image, [-(-n // s) for n, s in zip(size, image.shape)])[tuple(slice(0, n) for n in size)]
  x = ((x - x.mean()) / x.std()).astype(np.float16)
  assert all(len(s) > 1 for s in sliding_window.sliding_window_steps(x.shape, patch))
  theirs = spineps_oracle.call("worker.semantic_logits", {"data": np.ascontiguousarray(x.T)[None]},
                               folder=str(folder))["logits"]
  theirs = np.moveaxis(theirs, 0, -1).transpose(2, 1, 0, 3)  # (X, Y, Z, classes) in our axes
  scale = np.abs(theirs).max()
  same = _ours(bundles[True], x)
  # float16 sums in a different patch order: a few float16 steps of the logits apart, same labels nearly everywhere
  assert np.abs(same - theirs).max() < 0.01 * scale
  assert np.mean(same.argmax(-1) == theirs.argmax(-1)) > 0.999
  correct = _ours(bundles[False], x)
  assert np.abs(correct - theirs).max() > 10 * np.abs(same - theirs).max()  # the defect is what separates them


def test_an_ensemble_of_folds_gives_spineps_averaged_logits(oracle, models, semantic_smoke_run, tmp_path):
  """available_folds: 2 -> SPINEPS loads fold_0 and fold_1 and averages their logits (predictor.py
  `predict_logits_from_preprocessed_data`); the converted bundle is one ensemble that does the same, and
  exported again it is the same two folds. The second fold is the smoke run's step-2 checkpoint."""
  import json
  import shutil

  import torch

  from spine_jax.conversion import checkpoint as checkpoint_lib
  from spine_jax.inference import restore as restore_lib
  source, _ = models
  folder = tmp_path / "semantic"
  shutil.copytree(source, folder)
  checkpoint_lib.checkpoint_to_bundle(semantic_smoke_run / "checkpoints" / "2", tmp_path / "step2")
  export_spineps.export_pair(tmp_path / "step2_folders", semantic_checkpoint=tmp_path / "step2")
  shutil.copytree(tmp_path / "step2_folders" / "semantic" / "fold_0", folder / "fold_1")
  config = json.loads((folder / "inference_config.json").read_text())
  (folder / "inference_config.json").write_text(json.dumps({**config, "available_folds": 2}))
  spineps.convert_pair(tmp_path / "bundles", semantic_folder=folder, trust_pickle=True, spineps_defects=True)
  loaded = restore_lib.load_for_inference(tmp_path / "bundles" / "semantic", "semantic")
  assert loaded[1].model.ensemble_size == 2
  patch = tuple(loaded[1].data.patch.patch_size)
  x = np.random.default_rng(3).normal(size=tuple(int(p * 1.3) for p in patch)).astype(np.float16)
  theirs = spineps_oracle.call("worker.semantic_logits", {"data": np.ascontiguousarray(x.T)[None]},
                               folder=str(folder))["logits"]
  theirs = np.moveaxis(theirs, 0, -1).transpose(2, 1, 0, 3)
  ours = _ours(loaded, x)
  assert np.abs(ours - theirs).max() < 0.01 * np.abs(theirs).max()
  assert np.mean(ours.argmax(-1) == theirs.argmax(-1)) > 0.999
  assert np.abs(_ours(models[1][True], x) - theirs).max() > 10 * np.abs(ours - theirs).max()  # fold_1 counts
  export_spineps.export_pair(tmp_path / "again", semantic_checkpoint=tmp_path / "bundles" / "semantic")
  again = tmp_path / "again" / "semantic"
  assert json.loads((again / "inference_config.json").read_text())["available_folds"] == 2
  for fold in (0, 1):
    want = torch.load(folder / f"fold_{fold}" / "checkpoint_final.pth", weights_only=False)["network_weights"]
    got = torch.load(again / f"fold_{fold}" / "checkpoint_final.pth", weights_only=False)["network_weights"]
    assert all(torch.equal(want[k], got[k]) for k in got)

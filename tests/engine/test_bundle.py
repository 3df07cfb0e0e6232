"""Model bundles: training writes one, inference loads it (or a checkpoint, without its optimiser) to the same
predictions."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from spine_jax.engine import bundle
from spine_jax.engine import checkpoints
from spine_jax.engine import networks
from spine_jax.engine import predict as predict_lib
from spine_jax.engine import state as state_lib
from spine_jax.inference import restore

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_training_writes_a_bundle_without_training_fields(semantic_smoke_run):
  spec = json.loads((semantic_smoke_run / "bundle" / bundle.SPEC_FILE).read_text())
  assert spec["format"] == bundle.FORMAT and spec["task"] == "semantic" and spec["step"] == 4
  assert set(spec["config"]) <= set(bundle.CONFIG_FIELDS) | {"data"}
  assert "optimizer" not in spec["config"] and "phantom" not in spec["config"]["data"]
  assert set(spec["config"]["data"]) <= set(bundle.DATA_FIELDS)


def test_bundle_and_checkpoint_predict_the_same(semantic_smoke_run, tmp_path):
  assert restore.find_model(semantic_smoke_run) == ("bundle", semantic_smoke_run / "bundle")
  state_b, config_b, mesh = restore.load_for_inference(semantic_smoke_run, "semantic")
  old = tmp_path / "run_without_bundle"  # as a work directory written before bundles existed
  shutil.copytree(semantic_smoke_run / "checkpoints", old / "checkpoints")
  assert restore.find_model(old) == ("checkpoint", old / "checkpoints" / "4")
  state_c, config_c, _ = restore.load_for_inference(old, "semantic", mesh)
  assert isinstance(state_b, state_lib.InferenceState) and isinstance(state_c, state_lib.InferenceState)
  assert config_b.model.to_dict() == config_c.model.to_dict()
  x = np.random.default_rng(0).normal(size=(2, *config_b.data.patch.patch_size, 1)).astype(np.float32)
  np.testing.assert_array_equal(predict_lib.semantic_logits_fn(state_b, mesh)(x),
                                predict_lib.semantic_logits_fn(state_c, mesh)(x))


def test_a_newer_checkpoint_wins_over_an_older_bundle(semantic_smoke_run, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(semantic_smoke_run, run)
  spec = json.loads((run / "bundle" / bundle.SPEC_FILE).read_text())
  spec["step"] = 1
  (run / "bundle" / bundle.SPEC_FILE).write_text(json.dumps(spec))
  assert restore.find_model(run) == ("checkpoint", run / "checkpoints" / "4")
  restore.load_for_inference(run, "semantic")


@pytest.mark.parametrize("damage, fragment", [
    ("spec_not_json", "is not readable JSON"),
    ("spec_foreign", "is not a spine_jax model bundle"),
    ("params_missing", "cannot be read"),
    ("params_of_another_model", "does not fit the model"),
])
def test_damaged_bundle_is_one_clear_error(damage, fragment, semantic_smoke_run, tmp_path):
  folder = tmp_path / "bundle"
  shutil.copytree(semantic_smoke_run / "bundle", folder)
  if damage == "spec_not_json":
    (folder / bundle.SPEC_FILE).write_text("{")
  elif damage == "spec_foreign":
    (folder / bundle.SPEC_FILE).write_text(json.dumps({"format": "other"}))
  elif damage == "params_missing":
    (folder / bundle.PARAMS_FILE).unlink()
  else:
    np.savez(folder / bundle.PARAMS_FILE, **{"params/nope": np.zeros(3)})
  with pytest.raises(checkpoints.CheckpointError, match=fragment):
    restore.load_for_inference(folder, "semantic")


def test_wrong_task_bundle(semantic_smoke_run):
  with pytest.raises(checkpoints.CheckpointError, match="holds a 'semantic' model, not 'instance'"):
    restore.load_for_inference(semantic_smoke_run / "bundle", "instance")


def test_convert_checkpoint_writes_the_bundle_of_any_step(semantic_smoke_run, tmp_path):
  """`convert checkpoint`: the bundle of an earlier step predicts as that step's checkpoint does."""
  step_folder = semantic_smoke_run / "checkpoints" / "2"
  out = tmp_path / "bundle2"
  run = _convert("checkpoint", f"--input={step_folder}", f"--output={out}")
  assert run.returncode == 0, run.stderr[-2000:]
  assert "semantic model of step 2" in run.stdout
  spec = json.loads((out / bundle.SPEC_FILE).read_text())
  assert spec["step"] == 2 and spec["task"] == "semantic"
  state_b, config, mesh = restore.load_for_inference(out, "semantic")
  _, abstract = networks.abstract_variables(config, mesh)
  want = checkpoints.restore_variables(step_folder.parent, 2, abstract)
  got, ref = jax.tree.leaves(state_b.params), jax.tree.leaves(want["params"])
  assert len(got) == len(ref) and all(np.array_equal(a, b) for a, b in zip(got, ref))
  again = _convert("checkpoint", f"--input={step_folder}", f"--output={out}")
  assert again.returncode == 1 and again.stderr.strip().splitlines()[-1].startswith("error: ")
  assert "exists" in again.stderr and "Traceback" not in again.stderr


def test_convert_checkpoint_of_no_checkpoint(tmp_path):
  run = _convert("checkpoint", f"--input={tmp_path}", f"--output={tmp_path / 'out'}")
  assert run.returncode == 1 and "no spine_jax checkpoint" in run.stderr and "Traceback" not in run.stderr
  assert not (tmp_path / "out").exists()


def _convert(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "spine_jax.convert", *args], capture_output=True, text=True,
                        cwd=ROOT, env=env, timeout=300)

"""The floors of the house stay floors: the import-linter contracts in pyproject.toml hold.

The layers, top to bottom: entry points; training and conversion; inference pipelines; the engine;
models, metrics and reports; data; the CLI helpers. Inference (and the engine) never import
training, and the package never imports the top-level configs/.
"""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_import_contracts_hold(tmp_path):
  pytest.importorskip("importlinter", reason="import-linter is a test dependency: pip install -e '.[test]'")
  code = ("import sys\nfrom importlinter.cli import lint_imports\n"
          "sys.exit(lint_imports(no_cache=True, no_logo=True))\n")
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
  assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:]
  assert "0 broken" in run.stdout


def test_one_label_table(tmp_path):
  """`evaluate seg` and the centroid JSON name structures from data/spine_labels.py, as eval.json does."""
  import numpy as np

  from spine_jax.data import nifti
  from spine_jax.data import spine_labels
  from spine_jax.inference.phase2 import pipeline as phase2
  from spine_jax.metrics import segmentation

  sem = np.zeros((6, 6, 6), np.uint8)
  sem[1:3, 1:3, 1:3], sem[3:5, 3:5, 3:5] = 49, 41
  inst = np.where(sem > 0, 20, 0).astype(np.int16)
  nifti.atomic_save_nifti(sem, np.eye(4), tmp_path / "sem.nii.gz")
  report = segmentation.compare_files(tmp_path / "sem.nii.gz", tmp_path / "sem.nii.gz")
  centroids = phase2.centroids(inst, sem, np.eye(4))
  assert set(report["labels"]) == set(centroids["vertebrae"]["20"]["structures"]) == {
      spine_labels.STRUCTURE_NAMES[41], spine_labels.STRUCTURE_NAMES[49]}


def test_eval_json_names_structures_as_the_label_table(semantic_smoke_run):
  import json

  from spine_jax.data import spine_labels
  saved = json.loads((semantic_smoke_run / "eval.json").read_text())
  assert set(saved["dice"]) <= set(spine_labels.STRUCTURE_NAMES.values())


def test_no_import_cycles():
  """No module imports one that imports it back, directly or through others (imports inside functions too)."""
  grimp = pytest.importorskip("grimp", reason="grimp comes with import-linter, a test dependency")
  graph = grimp.build_graph("spine_jax")
  cycles = sorted({tuple(sorted((a, b))) for a in graph.modules for b in graph.find_modules_directly_imported_by(a)
                   if graph.chain_exists(importer=b, imported=a)})
  assert not cycles, cycles

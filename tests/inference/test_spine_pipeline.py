"""SPINEPS phases 1 and 2 as one command and one API: files, grids, ids, resuming, failures.

Networks trained for a few steps (the smoke configs) make meaningless masks, so these tests check
the plumbing; the numbers are checked with a perfect instance network (`oracle_lib.oracle_predict_fn`)
on a phantom's reference semantic mask in a non-PIR orientation.
"""
import json
import os
import pathlib
import subprocess
import sys

import jax
import nibabel as nib
import numpy as np
import pytest

from configs import instance as instance_config
from configs import semantic as semantic_config
from spine_jax.data import nifti
from spine_jax.data import spatial
from spine_jax.data import spine_labels
from spine_jax.data.phantoms import mri
from spine_jax.data.phantoms import mri_anatomy
from spine_jax.inference import semantic as semantic_lib
from spine_jax.inference import spine
from spine_jax.inference.phase2 import oracle as oracle_lib
from spine_jax.inference.phase2 import pipeline as phase2
from spine_jax.metrics import instances as inst_metrics

ROOT = pathlib.Path(__file__).resolve().parents[2]
LPS = ("L", "P", "S")


def _instance_ids_ok(mask) -> bool:
  """Only SPINEPS instance ids: vertebrae 1-28, discs 100 + X, endplates 200 + X."""
  ids = {int(v) for v in np.unique(mask) if v}
  return all(1 <= v <= 28 or 101 <= v <= 128 or 201 <= v <= 228 for v in ids)


@pytest.fixture(scope="module")
def runs(semantic_smoke_run, instance_smoke_run):
  """(semantic run, instance run): the smoke configs, a few steps each."""
  return semantic_smoke_run, instance_smoke_run


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
  """A folder with one LPS phantom (and its reference masks) and one broken file."""
  folder = tmp_path_factory.mktemp("spine_scans")
  info = mri.write_mri_phantom_nifti(folder, 1, seed=5, axcodes=LPS,
                                     cfg=semantic_config.get_config("smoke").data.phantom)
  (folder / "broken_T2w.nii.gz").write_bytes(b"not a nifti file")
  return folder, pathlib.Path(info["volumes"][0]["image"])


def _predict(*args):
  env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1",
             JAX_COMPILATION_CACHE_DIR=str(jax.config.jax_compilation_cache_dir))
  return subprocess.run([sys.executable, "-m", "spine_jax.predict", "spine", *args], capture_output=True, text=True,
                        cwd=ROOT, timeout=600, env=env)


def test_command_writes_four_outputs_on_the_input_grid_resumes_and_reports_failures(runs, scans, tmp_path):
  (sem_run, inst_run), (folder, image_path) = runs, scans
  out = tmp_path / "out"
  args = [f"--semantic_checkpoint={sem_run}", f"--instance_checkpoint={inst_run}", f"--input={folder}",
          f"--output={out}", "--first_vertebra=T10", f"--ref_dir={folder}"]
  run = _predict(*args)
  assert run.returncode == 1, run.stderr[-3000:]
  assert "broken_T2w.nii.gz" in run.stderr and "1 segmented, 0 already done, 1 failed" in run.stdout
  assert "against" in run.stdout and "vertebrae" in run.stdout  # metrics against the phantom's reference
  paths = spine.output_paths(out, image_path.name[: -len(".nii.gz")])
  src = nib.load(str(image_path))
  for key in ("semantic", "instance"):
    img = nib.load(str(paths[key]))
    assert img.shape == src.shape and nib.aff2axcodes(img.affine) == LPS
    np.testing.assert_allclose(img.affine, src.affine, atol=1e-5)
  semantic = np.asarray(nib.load(str(paths["semantic"])).dataobj)
  vert = np.asarray(nib.load(str(paths["instance"])).dataobj)
  assert set(np.unique(semantic).tolist()) <= set(spine_labels.SEMANTIC_IDS)
  assert _instance_ids_ok(vert)
  ctd = json.loads(paths["centroids"].read_text())
  assert ctd["first_vertebra"] == 17 and isinstance(ctd["messages"], list)
  assert set(ctd["vertebrae"]) == {str(v) for v in np.unique(vert) if 0 < v < 100}
  for entry in ctd["vertebrae"].values():
    assert len(entry["centroid_mm"]) == 3 and entry["voxels"] > 0
  assert paths["snapshot"].read_bytes()[:4] == b"\x89PNG"
  assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths.values())  # nothing for the broken file
  stamps = {k: p.stat().st_mtime_ns for k, p in paths.items()}
  again = _predict(*args)
  assert again.returncode == 1 and "0 segmented, 1 already done, 1 failed" in again.stdout
  assert {k: p.stat().st_mtime_ns for k, p in paths.items()} == stamps


def test_api_on_arrays_keeps_the_grid(runs):
  semantic_model, instance_model = spine.load_spine_models(*runs)
  volume = mri.make_volume(semantic_config.get_config("smoke").data.phantom, "test", 0)
  image, affine, _ = nifti.reorient(volume["image"], volume["affine"], ("R", "A", "S"))
  seen = set()
  result = spine.segment_spine(image, affine, semantic_model, instance_model, first_vertebra="C2",
                               progress=lambda stage, done, total: seen.add(stage))
  assert set(result) == {"semantic", "instance", "centroids", "messages", "seconds", "labeling"}
  assert result["labeling"]["method"].startswith("positions: the top vertebra is 2")  # no labelling model
  assert set(result["seconds"]) == {"preprocess", "semantic_network", "semantic_cleanup", "instance", "postprocess",
                                    "labeling", "centroids"} and all(v >= 0 for v in result["seconds"].values())
  assert result["semantic"].shape == result["instance"].shape == image.shape
  assert result["semantic"].dtype == np.uint8 and result["instance"].dtype == np.int16
  assert set(np.unique(result["semantic"]).tolist()) <= set(spine_labels.SEMANTIC_IDS)
  assert _instance_ids_ok(result["instance"]) and "windows" in seen
  assert all(isinstance(m, str) for m in result["messages"])
  assert {"vertebrae", "discs", "endplates"} <= set(result["centroids"])


@pytest.fixture(scope="module")
def perfect_phase2():
  """Phase 2 with a perfect network on an LPS phantom's reference semantic mask, through the smoke instance config."""
  config = instance_config.get_config("smoke")
  volume = mri.make_volume(config.data.phantom, "test", 0)
  semantic, affine, _ = nifti.reorient(volume["semantic"], volume["affine"], LPS)
  reference, _, _ = nifti.reorient(volume["instance"], volume["affine"], LPS)
  model = spine.Model(None, config, None, oracle_lib.oracle_for_scan(semantic, affine, reference, config), "oracle")
  out, messages = spine.instances_in_input_space(semantic, affine, model)
  return dict(volume=volume, semantic=semantic, reference=reference, affine=affine, out=out, messages=messages)


def test_perfect_network_gives_the_phantom_back_on_the_input_grid(perfect_phase2):
  p = perfect_phase2
  assert p["out"].shape == p["semantic"].shape and _instance_ids_ok(p["out"])
  table = inst_metrics.overlap_table(p["out"], p["reference"], (1, 99))
  dice = table.dice()
  pred_index = {int(v): i for i, v in enumerate(table.pred_ids)}
  ref_index = {int(v): i for i, v in enumerate(table.ref_ids)}
  pairs = {r: q for q, r in inst_metrics.match_by_overlap(table) if q is not None and r is not None}
  whole = [mri_anatomy.vertebra_id(level) for level in p["volume"]["full_levels"]]
  assert len(whole) >= 3
  for ref_id in whole:  # the input-grid relabelling follows the semantic mask voxel for voxel
    assert dice[pred_index[pairs[ref_id]], ref_index[ref_id]] > 0.95, ref_id
  assert len({pairs[r] - r for r in whole}) == 1  # one positional numbering, only its start unknown
  discs = np.unique(p["out"][(p["out"] > 100) & (p["out"] < 200)])
  assert len(discs) >= len(whole) - 1  # discs numbered on the input grid


def test_spineps_models_run_phase2_from_the_semantic_model_grid():
  """SPINEPS' route (models on its grid): phase 1's model-grid mask -> instance grid -> back through the
  semantic model grid to the input grid; a perfect network still gives the phantom back."""
  config = instance_config.get_config("smoke")
  config.data.preprocess.grid = spatial.SPINEPS_GRID
  volume = mri.make_volume(config.data.phantom, "test", 0)
  semantic, affine, _ = nifti.reorient(volume["semantic"], volume["affine"], LPS)
  reference, _, _ = nifti.reorient(volume["instance"], volume["affine"], LPS)
  sem_mask, sem_space = spatial.mask_to_model_space(semantic, affine, axcodes=spatial.PIR, spacing=(1.5, 1.5, 3.3),
                                                    grid=spatial.SPINEPS_GRID)
  oracle = oracle_lib.oracle_for_scan(sem_mask, sem_space.model_affine,
                                      spatial.apply_model_space(reference, sem_space, is_mask=True), config)
  model = spine.Model(None, config, None, oracle, "oracle")
  out, _ = spine.instances_in_input_space(semantic, affine, model, semantic_space=sem_space, model_semantic=sem_mask)
  assert out.shape == semantic.shape and _instance_ids_ok(out)
  table = inst_metrics.overlap_table(out, reference, (1, 99))
  dice, pairs = table.dice(), dict((r, q) for q, r in inst_metrics.match_by_overlap(table) if q and r)
  pred_index = {int(v): i for i, v in enumerate(table.pred_ids)}
  ref_index = {int(v): i for i, v in enumerate(table.ref_ids)}
  whole = [mri_anatomy.vertebra_id(level) for level in volume["full_levels"]]
  assert all(dice[pred_index[pairs[r]], ref_index[r]] > 0.95 for r in whole)


def test_outputs_written_all_or_none(perfect_phase2, tmp_path, monkeypatch):
  p = perfect_phase2
  result = {"semantic": p["semantic"].astype(np.uint8), "instance": p["out"], "messages": p["messages"],
            "centroids": phase2.centroids(p["out"], p["semantic"], p["affine"])}
  image = np.asarray(p["semantic"], np.float32)
  paths = spine.output_paths(tmp_path / "ok", "sub-01_T2w")
  spine.write_outputs(result, image, p["affine"], paths, meta={"input": "memory"})
  ctd = json.loads(paths["centroids"].read_text())
  assert ctd["input"] == "memory" and ctd["messages"] == p["messages"] and ctd["vertebrae"]
  voxels = np.argwhere(p["out"] == int(next(iter(ctd["vertebrae"]))))
  world = nib.affines.apply_affine(p["affine"], voxels.mean(axis=0))
  np.testing.assert_allclose(next(iter(ctd["vertebrae"].values()))["centroid_mm"], world, atol=1e-2)

  def disk_full(*_, **__):
    raise OSError("No space left on device")
  monkeypatch.setattr(nifti, "atomic_write_text", disk_full)
  failed = spine.output_paths(tmp_path / "failed", "sub-01_T2w")
  with pytest.raises(OSError, match="No space"):
    spine.write_outputs(result, image, p["affine"], failed)
  assert not any((tmp_path / "failed").iterdir())


def test_reference_found_by_name(tmp_path):
  for name in ("sub-01_seg-vert_msk.nii.gz", "sub-02_T2w_seg-vert_msk.nii", "other_seg-spine_msk.nii.gz"):
    (tmp_path / "d" / name).parent.mkdir(exist_ok=True)
    (tmp_path / "d" / name).write_bytes(b"")
  refs = spine.index_references(tmp_path)
  assert spine.find_reference(refs, "sub-01_T2w").name == "sub-01_seg-vert_msk.nii.gz"
  assert spine.find_reference(refs, "sub-02_T2w").name == "sub-02_T2w_seg-vert_msk.nii"
  assert spine.find_reference(refs, "sub-02_T2w", exclude=[tmp_path / "d" / "sub-02_T2w_seg-vert_msk.nii"]) is None
  assert spine.find_reference(refs, "sub-03_T2w") is None
  assert spine.parse_first_vertebra("T10") == spine.parse_first_vertebra("17") == 17
  assert spine.parse_first_vertebra(None) is None
  with pytest.raises(ValueError):
    spine.parse_first_vertebra("X9")


def _run_predict(command, *args):
  env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1",
             JAX_COMPILATION_CACHE_DIR=str(jax.config.jax_compilation_cache_dir))
  return subprocess.run([sys.executable, "-m", "spine_jax.predict", command, *args], capture_output=True, text=True,
                        cwd=ROOT, timeout=600, env=env)


def _copy_scan(image_path, target, shift=0):
  """The phantom scan at `target`; `shift` changes one voxel, so the copy is another input."""
  img = nib.load(str(image_path))
  data = np.asarray(img.dataobj).copy()
  data.flat[0] += shift
  target.parent.mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(data, img.affine, img.header), str(target))
  return target


def test_semantic_batch_keeps_folders_of_repeated_names_and_resumes_per_input(runs, scans, tmp_path):
  (sem_run, _), (_, image_path) = runs, scans
  inputs = tmp_path / "in"
  first = _copy_scan(image_path, inputs / "sub-01" / "anat" / "T2w.nii.gz")
  second = _copy_scan(image_path, inputs / "sub-02" / "anat" / "T2w.nii.gz", shift=1)
  out = tmp_path / "out"
  args = [f"--checkpoint={sem_run}", f"--input={inputs}", f"--output={out}", "--disable_tta"]
  run = _run_predict("semantic", *args)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "2 segmented, 0 already done, 0 failed" in run.stdout
  masks = [out / sub / "anat" / "T2w_seg-spine_msk.nii.gz" for sub in ("sub-01", "sub-02")]
  pictures = [out / sub / "anat" / "T2w_seg-spine_snp.png" for sub in ("sub-01", "sub-02")]
  assert all(p.is_file() for p in masks + pictures)
  again = _run_predict("semantic", *args)
  assert again.returncode == 0 and "0 segmented, 2 already done, 0 failed" in again.stdout
  pictures[1].unlink()  # as after an interruption between the two outputs: not done
  third = _run_predict("semantic", *args)
  assert third.returncode == 0 and "1 segmented, 1 already done, 0 failed" in third.stdout
  assert pictures[1].is_file()

  # One file at a time into one folder: the second file's outputs would replace the first's. Refused.
  flat = tmp_path / "flat"
  assert _run_predict("semantic", f"--checkpoint={sem_run}", f"--input={first}", f"--output={flat}",
                      "--disable_tta").returncode == 0
  kept = (flat / "T2w_seg-spine_msk.nii.gz").read_bytes()
  other = _run_predict("semantic", f"--checkpoint={sem_run}", f"--input={second}", f"--output={flat}",
                       "--disable_tta")
  assert other.returncode == 1 and "was not made from this file" in other.stderr and "--overwrite" in other.stderr
  assert "Traceback" not in other.stderr
  assert (flat / "T2w_seg-spine_msk.nii.gz").read_bytes() == kept
  assert not [p for p in flat.iterdir() if p.name.startswith(".")]


def test_spine_batch_never_overwrites_a_repeated_name(runs, scans, tmp_path):
  (sem_run, inst_run), (_, image_path) = runs, scans
  inputs = tmp_path / "in"
  _copy_scan(image_path, inputs / "sub1" / "dup_T2w.nii.gz")
  _copy_scan(image_path, inputs / "sub2" / "dup_T2w.nii.gz", shift=1)
  out = tmp_path / "out"
  run = _run_predict("spine", f"--semantic_checkpoint={sem_run}", f"--instance_checkpoint={inst_run}",
                     f"--input={inputs}", f"--output={out}", "--disable_tta")
  assert run.returncode == 0, run.stderr[-3000:]
  for sub in ("sub1", "sub2"):
    paths = spine.output_paths(out / sub, "dup_T2w")
    assert all(p.is_file() for p in paths.values()), sub
    ctd = json.loads(paths["centroids"].read_text())
    assert ctd["input"] == str(inputs / sub / "dup_T2w.nii.gz") and len(ctd["input_sha256"]) == 64


def test_clashing_names_are_refused_before_any_work(runs, scans, tmp_path):
  (sem_run, _), (_, image_path) = runs, scans
  inputs = tmp_path / "in"
  _copy_scan(image_path, inputs / "scan.nii.gz")
  _copy_scan(image_path, inputs / "scan.nii")
  out = tmp_path / "out"
  run = _run_predict("semantic", f"--checkpoint={sem_run}", f"--input={inputs}", f"--output={out}")
  assert run.returncode == 1 and "Traceback" not in run.stderr
  assert run.stderr.startswith("error: inputs would write the same outputs") and "scan.nii.gz" in run.stderr
  assert "scan.nii " in run.stderr and not out.exists()


def test_blank_scan_is_reported(runs, tmp_path):
  sem_run, _ = runs
  nib.save(nib.Nifti1Image(np.zeros((32, 64, 16), np.int16), np.diag([1.0, 1.0, 3.0, 1.0])),
           str(tmp_path / "blank.nii.gz"))
  run = _run_predict("semantic", f"--checkpoint={sem_run}", f"--input={tmp_path / 'blank.nii.gz'}",
                     f"--output={tmp_path / 'out'}", "--disable_tta")
  assert run.returncode == 0 and "Traceback" not in run.stderr
  assert "warning: " in run.stdout and "the input image is blank (every voxel is 0)" in run.stdout


def test_blank_image_message():
  assert semantic_lib.blank_image_message(np.zeros((4, 4, 4))) == ("the input image is blank (every voxel is 0): "
                                                            "nothing to segment")
  assert semantic_lib.blank_image_message(np.arange(8.0).reshape(2, 2, 2)) is None


def test_spineps_instances_reach_the_input_grid_in_one_pass_as_tptbox_resample_from_to():
  """seg_run.py:670: SPINEPS puts the instance-grid mask on the scan's grid with one `resample_from_to`."""
  from tests import spineps_oracle
  reason = spineps_oracle.available()
  if reason:
    pytest.skip(reason)
  rng = np.random.default_rng(7)
  affine = np.diag([-0.75, -0.75, 3.3, 1.0])  # LPS, 3.3 mm slices
  affine[:3, 3] = (40.0, -12.5, 71.2)
  image = rng.normal(500, 100, (48, 80, 14)).astype(np.float32)
  _, sem_space = spatial.to_model_space(image, affine, axcodes=spatial.PIR, spacing=(1.5, 0.75, 1.65),
                                        grid=spatial.SPINEPS_GRID, input_pad=4)
  _, inst_space = spatial.mask_to_model_space(np.zeros(sem_space.target_shape, np.uint8), sem_space.model_affine,
                                              axcodes=spatial.PIR, spacing=(2.25, 2.25, 3.3), grid=spatial.SPINEPS_GRID)
  instances = rng.choice(np.array([0, 2, 3, 4, 102, 203], np.uint16), size=inst_space.target_shape)
  ref = spineps_oracle.call("worker.resample_back", {"mask": instances, "mask_affine": inst_space.model_affine,
                                                      "target": image, "target_affine": affine})["array"]
  np.testing.assert_array_equal(spine.instances_to_input_grid(instances, inst_space, sem_space), ref)
  two_passes = spatial.from_model_space(spatial.from_model_space(instances, inst_space), sem_space)
  assert np.mean(two_passes != ref) > 0.05  # the route it replaced


def test_spine_reads_a_scan_as_its_semantic_model_does(tmp_path, monkeypatch):
  """SPINEPS' normalisation works in the file's stored integer dtype (it truncates): `predict spine` must hand
  phase 1 the same array as `predict semantic` (a float copy changed most of a 1.65 mm scan's masks)."""
  import ml_collections
  path = tmp_path / "int_T2w.nii.gz"
  nib.save(nib.Nifti1Image(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6), np.eye(4)), path)
  config = ml_collections.ConfigDict({"data": {"preprocess": {"normalisation": "spineps", "bias_field": "none"}}})
  image, _, _ = semantic_lib.load_scan(path, config)
  assert image.dtype == np.int16
  seen = {}

  def fake_segment_spine(image, affine, *args, **kwargs):
    seen["dtype"] = image.dtype
    raise RuntimeError("stop")

  monkeypatch.setattr(spine, "segment_spine", fake_segment_spine)
  model = spine.Model(None, config, None, None, "fake")
  with pytest.raises(RuntimeError, match="stop"):
    spine.segment_file(model, model, path, {})
  assert seen["dtype"] == np.int16


def test_command_writes_spineps_names_and_centroid_file_in_derivatives_seg(runs, scans, tmp_path):
  """--output_format=spineps: SPINEPS' names in the mirrored folder's derivatives_seg, its centroid file (TPTBox's
  POI, as SPINEPS computes it from the written masks), and resuming keyed on those paths."""
  from tests import spineps_oracle
  (sem_run, inst_run), (_, image_path) = runs, scans
  inputs, out = tmp_path / "in", tmp_path / "out"
  scan = _copy_scan(image_path, inputs / "sub-01" / "anat" / "sub-01_ses-1_T2w.nii.gz")
  args = [f"--semantic_checkpoint={sem_run}", f"--instance_checkpoint={inst_run}", f"--input={inputs}",
          f"--output={out}", "--output_format=spineps", "--disable_tta"]
  run = _predict(*args)
  assert run.returncode == 0 and "1 segmented, 0 already done, 0 failed" in run.stdout, run.stderr[-3000:]
  folder = out / "sub-01" / "anat" / "derivatives_seg"
  names = [f"sub-01_ses-1_mod-T2w_{end}" for end in ("seg-spine_msk.nii.gz", "seg-vert_msk.nii.gz",
                                                     "seg-spine_ctd.json", "seg-spine_snp.png")]
  assert sorted(p for p in out.rglob("*") if p.is_file()) == sorted(folder / name for name in names)
  header, points = json.loads((folder / names[2]).read_text())
  assert header["format"] == "POI" and header["shape"] == list(nib.load(str(scan)).shape)
  assert header["input"] == str(scan) and len(header["input_sha256"]) == 64
  vert = np.asarray(nib.load(str(folder / names[1])).dataobj)
  assert set(points) <= {str(v) for v in np.unique(vert) if 0 < v < 100}
  if not spineps_oracle.available():  # SPINEPS' centroids of the masks as written, and our file, by POI.load
    semantic = np.asarray(nib.load(str(folder / names[0])).dataobj)
    got = spineps_oracle.call("worker.poi_centroids", {"semantic": semantic, "instance": vert},
                              image_path=str(scan), ours=str(folder / names[2]))
    assert got["ours/ids"].shape[0] == (got["ref/ids"].shape[0] if got["ref/written"] else 0)
    if got["ref/written"]:
      np.testing.assert_array_equal(got["ours/ids"], got["ref/ids"])
      np.testing.assert_allclose(got["ours/points"], got["ref/points"], atol=1e-3, rtol=0)
  stamps = {p: p.stat().st_mtime_ns for p in folder.iterdir()}
  again = _predict(*args)
  assert again.returncode == 0 and "0 segmented, 1 already done, 0 failed" in again.stdout
  assert {p: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps

"""Every bad input a user can give, one test each, at every entry point (predict, evaluate, train, convert).

Each case checks what the user sees and what is left behind:
- the exit status (1 for a mistake; 130 for Ctrl-C);
- one `error:` line (and at most the pointer to --helpshort) naming the culprit (file, row, field or
  flag) and the fault, and no traceback; in a batch run, the failed scan's line in the failure list
  at the end, while the good scans are done;
- nothing written or replaced: no output of a bad input, no temporary file anywhere under the output.

The file-level cases of a batch run (`BAD_SCANS`, `BAD_MASKS`) are one command per entry point over a
folder (or pair list) holding every bad file beside a good one, checked case by case.
"""
from __future__ import annotations

import gzip
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import nibabel as nib
import numpy as np
import pytest

from configs import semantic as semantic_config
from spine_jax.data.phantoms import mri

ROOT = pathlib.Path(__file__).resolve().parents[1]
AFFINE = np.diag([1.5, 1.5, 2.5, 1.0])


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
              JAX_COMPILATION_CACHE_DIR=str(jax.config.jax_compilation_cache_dir))


def _run(module, *args, cwd=ROOT, timeout=600):
  return subprocess.run([sys.executable, "-m", f"spine_jax.{module}", *map(str, args)], capture_output=True,
                        text=True, cwd=cwd, timeout=timeout, env=_env())


def _one_error(run, *fragments, status=1):
  """Exit `status`, stderr one `error:` line (and at most a pointer to --helpshort) holding every fragment."""
  assert run.returncode == status, (run.returncode, run.stderr[-3000:])
  assert "Traceback" not in run.stderr, run.stderr[-3000:]
  lines = [line for line in run.stderr.strip().splitlines() if line.strip()]
  assert lines and lines[0].startswith("error: ") and len(lines) <= 2, run.stderr[-3000:]
  assert len(lines) == 1 or "--helpshort" in lines[1], run.stderr[-3000:]
  for fragment in fragments:
    assert str(fragment) in lines[0], (fragment, lines[0])


def _files(folder) -> list[str]:
  folder = pathlib.Path(folder)
  return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _nothing_written(folder):
  assert _files(folder) == [], _files(folder)


def _no_temp_files(folder):
  temps = [f for f in _files(folder) if ".tmp" in f]
  assert not temps, temps


# --------------------------------------------------------------------------------------------------
# Bad NIfTI files: name -> (writer(path), fragment of the message). Each is a scan of a batch run.


def _save(path, array, affine=AFFINE):
  nib.save(nib.Nifti1Image(array, affine), str(path))


def _good_array(shape=(24, 24, 8)):
  return np.full(shape, 100, np.int16)


def _raw_nifti(path, header, array):
  """A .nii.gz written byte by byte: header fields exactly as given, which nibabel's writer would correct."""
  header.set_data_offset(352)
  with gzip.open(path, "wb") as f:
    f.write(header.binaryblock + b"\0" * 4 + np.asarray(array, header.get_data_dtype()).tobytes(order="F"))


def _truncated_gz(path):
  _save(path, np.random.default_rng(0).integers(0, 1000, (24, 24, 8)).astype(np.int16))
  path.write_bytes(path.read_bytes()[:3000])


def _truncated_nii(path):
  plain = path.with_name(path.name[:-3])
  _save(plain, _good_array())
  data = plain.read_bytes()
  plain.unlink()
  with gzip.open(path, "wb") as f:
    f.write(data[: len(data) // 2])


def _huge_header(path):
  """A header that claims 30000^3 voxels in a file of a few bytes (an allocation of 50 TB if trusted)."""
  header = nib.Nifti1Image(_good_array((4, 4, 4)), AFFINE).header
  header.set_data_shape((30000, 30000, 30000))
  _raw_nifti(path, header, _good_array((4, 4, 4)))


def _with_value(value):
  def write(path):
    array = _good_array().astype(np.float32)
    array[3, 3, 3] = value
    _save(path, array)
  return write


def _with_affine(affine):
  return lambda path: _save(path, _good_array(), affine)


def _nan_affine(path):
  header = nib.Nifti1Image(_good_array(), AFFINE).header
  header["srow_y"][1] = np.nan
  header["qform_code"] = 0
  _raw_nifti(path, header, _good_array())


def _zero_pixdim(path):
  img = nib.Nifti1Image(_good_array(), None)
  img.header.set_sform(None, code=0)
  img.header.set_qform(None, code=0)
  img.header["pixdim"][1:4] = [0.0, 1.0, 1.0]
  nib.save(img, str(path))


BAD_SCANS = {
    "empty": (lambda p: p.write_bytes(b""), "unreadable, corrupt or truncated"),
    "not_nifti": (lambda p: p.write_bytes(b"this is not a NIfTI file\n" * 20), "unreadable, corrupt or truncated"),
    "truncated_gz": (_truncated_gz, "unreadable, corrupt or truncated"),
    "truncated_data": (_truncated_nii, "Expected 9216 bytes, got 4432 bytes"),
    "huge_header": (_huge_header, "header claims shape (30000, 30000, 30000)"),
    "flat_2d": (lambda p: _save(p, np.ones((24, 24), np.int16)), "expected a 3D volume, got shape (24, 24)"),
    "series_4d": (lambda p: _save(p, np.ones((24, 24, 8, 3), np.int16)),
                  "expected a 3D volume, got shape (24, 24, 8, 3)"),
    "nan_voxel": (_with_value(np.nan), "1 NaN or infinite voxel value(s)"),
    "inf_voxel": (_with_value(np.inf), "1 NaN or infinite voxel value(s)"),
    "nan_affine": (_nan_affine, "affine is not a finite 4x4 matrix"),
    "singular_affine": (_with_affine(np.array([[1.0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])),
                        "singular affine"),
    "zero_spacing": (_zero_pixdim, "voxel spacing (header pixdim) [0.0, 1.0, 1.0] mm must be positive"),
}


@pytest.fixture(scope="module")
def mri_folder(tmp_path_factory):
  """A folder of scans: one good phantom in a sub-folder, a blank scan, and every BAD_SCANS file."""
  folder = tmp_path_factory.mktemp("bad_mri")
  info = mri.write_mri_phantom_nifti(folder / "good", 1, seed=11, axcodes=("L", "P", "S"),
                                     cfg=semantic_config.get_config("smoke").data.phantom)
  for name, (write, _) in BAD_SCANS.items():
    write(folder / f"{name}_T2w.nii.gz")
  _save(folder / "blank_T2w.nii.gz", np.zeros((24, 24, 8), np.int16))
  return folder, pathlib.Path(info["volumes"][0]["image"])


def _failure_list(run) -> list[str]:
  """The lines of the failure list at the end of a batch run, one per failed scan."""
  lines = run.stderr.splitlines()
  start = next(i for i, line in enumerate(lines) if "scan(s) failed:" in line)
  return lines[start + 1:]


def _failure_lines(run) -> dict[str, str]:
  """scan file name -> its line in the failure list."""
  return {pathlib.Path(line.strip().split(":", 1)[0]).name: line for line in _failure_list(run)}


@pytest.fixture(scope="module")
def semantic_batch(semantic_smoke_run, mri_folder, tmp_path_factory):
  folder, _ = mri_folder
  out = tmp_path_factory.mktemp("semantic_out")
  return _run("predict", "semantic", f"--checkpoint={semantic_smoke_run}", f"--input={folder}", f"--output={out}"), out


@pytest.fixture(scope="module")
def spine_batch(semantic_smoke_run, instance_smoke_run, mri_folder, tmp_path_factory):
  folder, _ = mri_folder
  out = tmp_path_factory.mktemp("spine_out")
  return _run("predict", "spine", f"--semantic_checkpoint={semantic_smoke_run}",
              f"--instance_checkpoint={instance_smoke_run}", f"--input={folder}", f"--output={out}"), out


@pytest.mark.parametrize("batch", ["semantic_batch", "spine_batch"])
def test_batch_does_the_good_scans_and_lists_every_bad_one(batch, request):
  run, out = request.getfixturevalue(batch)
  assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
  assert f"{len(BAD_SCANS)} of {len(BAD_SCANS) + 2} scan(s) failed:" in run.stderr
  assert set(_failure_lines(run)) == {f"{name}_T2w.nii.gz" for name in BAD_SCANS}
  done = {pathlib.Path(f).parent.name or pathlib.Path(f).name.split("_")[0] for f in _files(out)}
  assert done == {"good", "blank"}, _files(out)  # outputs only for the good and the blank scan
  _no_temp_files(out)


@pytest.mark.parametrize("batch", ["semantic_batch", "spine_batch"])
@pytest.mark.parametrize("case", sorted(BAD_SCANS))
def test_bad_scan_in_a_batch(case, batch, request):
  run, out = request.getfixturevalue(batch)
  line = _failure_lines(run)[f"{case}_T2w.nii.gz"]
  assert BAD_SCANS[case][1] in line, line
  assert not [f for f in _files(out) if f.startswith(case)]
  with_reason = [line for line in (run.stdout + run.stderr).splitlines() if BAD_SCANS[case][1] in line
                 and f"{case}_T2w.nii.gz" in line]
  assert len(with_reason) == 1, with_reason  # the reason once, in the list at the end


@pytest.mark.parametrize("batch", ["semantic_batch", "spine_batch"])
def test_blank_scan_is_done_with_a_warning(batch, request):
  run, out = request.getfixturevalue(batch)
  warned = [line for line in run.stdout.splitlines() if "image is blank (every voxel is 0)" in line]
  assert len(warned) == 1 and "blank_T2w" in warned[0] or batch == "spine_batch", run.stdout[-3000:]
  assert any(f.startswith("blank_T2w_seg-spine_msk") for f in _files(out))
  if batch == "spine_batch":
    centroids = json.loads((out / "blank_T2w_seg-spine_ctd.json").read_text())
    assert any("image is blank" in m for m in centroids["messages"]), centroids
    assert "image is blank" in run.stdout


# --------------------------------------------------------------------------------------------------
# predict bone_quality --pairs: bad images and masks, each a row beside a good pair.


def _ct_pair():
  image = np.full((40, 40, 12), 40, np.int16)
  mask = np.zeros((40, 40, 12), np.uint8)
  mask[12:28, 12:28, 2:10] = 20  # a box "L1" in SPINEPS numbering
  image[mask > 0] = 250
  return image, mask


def _mask_writer(transform, affine=AFFINE):
  def write(path):
    _save(path, transform(_ct_pair()[1]), affine)
  return write


BAD_MASKS = {
    "float_mask": (_mask_writer(lambda m: m.astype(np.float32) + 0.4), "non-integer values"),
    "negative_mask": (_mask_writer(lambda m: m.astype(np.int16) - 1000), "negative values"),
    "other_shape_mask": (_mask_writer(lambda m: m[:, :, :10]), "has shape (40, 40, 10) but image"),
    "moved_mask": (_mask_writer(lambda m: m, AFFINE + np.diag([0, 0, 0.5, 0])), "different affines"),
    "totalseg_mask": (_mask_writer(lambda m: np.where(m > 0, 29, 0).astype(np.uint8)),
                      "labels [29] are not SPINEPS vertebra ids"),
    "absent_mask": (lambda p: None, "file not found"),
}


@pytest.fixture(scope="module")
def bone_quality_batch(bone_quality_smoke_run, tmp_path_factory):
  folder = tmp_path_factory.mktemp("bad_ct")
  image, mask = _ct_pair()
  _save(folder / "good_ct.nii.gz", image)
  _save(folder / "good_seg.nii.gz", mask)
  rows = ["image,mask", "good_ct.nii.gz,good_seg.nii.gz"]
  for name, (write, _) in BAD_SCANS.items():
    (folder / name).mkdir()
    write(folder / name / "ct.nii.gz")
    shutil.copy(folder / "good_seg.nii.gz", folder / name / "seg.nii.gz")
    rows.append(f"{name}/ct.nii.gz,{name}/seg.nii.gz")
  for name, (write, _) in BAD_MASKS.items():
    (folder / name).mkdir()
    shutil.copy(folder / "good_ct.nii.gz", folder / name / "ct.nii.gz")
    write(folder / name / "seg.nii.gz")
    rows.append(f"{name}/ct.nii.gz,{name}/seg.nii.gz")
  (folder / "pairs.csv").write_text("\n".join(rows) + "\n")
  out = tmp_path_factory.mktemp("ct_out")
  return _run("predict", "bone_quality", f"--checkpoint={bone_quality_smoke_run}", f"--pairs={folder / 'pairs.csv'}",
              f"--output={out}"), out


def _ct_failures(run) -> dict[str, str]:
  """case folder -> its line in the failure list."""
  return {case: line for line in _failure_list(run) for case in (*BAD_SCANS, *BAD_MASKS) if f"/{case}/" in line}


def test_bone_quality_pairs_do_the_good_pair_and_list_every_bad_one(bone_quality_batch):
  run, out = bone_quality_batch
  total = len(BAD_SCANS) + len(BAD_MASKS)
  assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
  assert f"{total} of {total + 1} scan(s) failed:" in run.stderr
  assert set(_ct_failures(run)) == set(BAD_SCANS) | set(BAD_MASKS)
  assert _files(out) == ["good_ct_bone_quality.csv", "good_ct_bone_quality.json"]


@pytest.mark.parametrize("case", sorted(BAD_SCANS) + sorted(BAD_MASKS))
def test_bad_file_in_a_bone_quality_pair(case, bone_quality_batch):
  run, _ = bone_quality_batch
  line = _ct_failures(run)[case]
  assert {**BAD_SCANS, **BAD_MASKS}[case][1] in line, line
  assert (f"/{case}/seg.nii.gz" if case in BAD_MASKS else f"/{case}/ct.nii.gz") in line


# --------------------------------------------------------------------------------------------------
# predict: flags, paths, pair lists and checkpoints, checked before any work.


def test_predict_usage_errors(tmp_path):
  _one_error(_run("predict", "semantic"), "semantic needs --checkpoint, --input and --output")
  _one_error(_run("predict", "nope"), "{bone_quality|semantic|spine}")
  _one_error(_run("predict"), "{bone_quality|semantic|spine}")
  _one_error(_run("predict", "bone_quality", "--nope=1"), "Unknown command line flag 'nope'")
  _one_error(_run("predict", "semantic", "--step_size=2", "--checkpoint=c", "--input=i", f"--output={tmp_path}"),
             "--step_size must be in (0, 1]")
  _one_error(_run("predict", "bone_quality", "--checkpoint=c", "--image=a", "--mask=b", "--scheme=nope", f"--output={tmp_path}"),
             "--scheme")
  _one_error(_run("predict", "spine", "--semantic_checkpoint=s", "--instance_checkpoint=i", "--input=i",
                  f"--output={tmp_path}", "--output_format=bids"), "--output_format=bids", "<spine_jax|spineps>")


def test_predict_flags_checked_before_loading_a_model(tmp_path):
  absent = tmp_path / "no_checkpoint"
  ct = ["bone_quality", f"--checkpoint={absent}", "--image=a.nii.gz", "--mask=b.nii.gz", f"--output={tmp_path / 'o'}"]
  _one_error(_run("predict", *ct, "--labels=20,x"), "--labels")
  _one_error(_run("predict", *ct, "--name=../../x"), "--name '../../x'")
  _one_error(_run("predict", *ct), str(absent), "does not exist")
  _nothing_written(tmp_path)


def test_predict_output_that_is_a_file(tmp_path):
  (tmp_path / "file").write_text("keep")
  _one_error(_run("predict", "bone_quality", f"--checkpoint={tmp_path}", "--image=a", "--mask=b",
                  f"--output={tmp_path / 'file'}"),
             "--output", "is a file")
  assert (tmp_path / "file").read_text() == "keep"


def _unwritable_folder(tmp_path) -> pathlib.Path:
  if os.geteuid() != 0:
    folder = tmp_path / "read_only"
    folder.mkdir(mode=0o500)
    return folder / "out"
  if pathlib.Path("/sys").is_dir():  # root writes anywhere but in a kernel file system
    return pathlib.Path("/sys/spine_jax_out")
  pytest.skip("running as root without /sys: no folder here refuses writes")


def test_predict_output_that_cannot_be_written(tmp_path):
  out = _unwritable_folder(tmp_path)
  _one_error(_run("predict", "bone_quality", f"--checkpoint={tmp_path}", "--image=a", "--mask=b", f"--output={out}"),
             f"--output {out}: cannot write there")


def test_predict_missing_inputs(bone_quality_smoke_run, semantic_smoke_run, tmp_path):
  out = tmp_path / "o"
  _one_error(_run("predict", "semantic", f"--checkpoint={semantic_smoke_run}", f"--input={tmp_path / 'nope'}",
                  f"--output={out}"), "nope", "no such file or folder")
  (tmp_path / "no_scans").mkdir()
  (tmp_path / "no_scans" / "notes.txt").write_text("x")
  _one_error(_run("predict", "semantic", f"--checkpoint={semantic_smoke_run}", f"--input={tmp_path / 'no_scans'}",
                  f"--output={out}"), "no_scans", "no .nii or .nii.gz files")
  run = _run("predict", "bone_quality", f"--checkpoint={bone_quality_smoke_run}", f"--image={tmp_path / 'absent.nii.gz'}",
             f"--mask={tmp_path / 'absent_seg.nii.gz'}", f"--output={out}")
  assert run.returncode == 1 and "Traceback" not in run.stderr and "absent.nii.gz: file not found" in run.stderr
  (tmp_path / "folder.nii.gz").mkdir()
  run = _run("predict", "bone_quality", f"--checkpoint={bone_quality_smoke_run}", f"--image={tmp_path / 'folder.nii.gz'}",
             f"--mask={tmp_path / 'absent_seg.nii.gz'}", f"--output={out}")
  assert run.returncode == 1 and "Traceback" not in run.stderr and "folder.nii.gz: not a regular file" in run.stderr
  _nothing_written(out)


def test_predict_bad_level_and_reference(semantic_smoke_run, instance_smoke_run, mri_folder, tmp_path):
  _, good = mri_folder
  spine = ["spine", f"--semantic_checkpoint={semantic_smoke_run}", f"--instance_checkpoint={instance_smoke_run}",
           f"--input={good}", f"--output={tmp_path / 'o'}"]
  _one_error(_run("predict", *spine, "--first_vertebra=X9"), "--first_vertebra", "X9")
  _one_error(_run("predict", *spine, f"--ref_dir={tmp_path / 'no_refs'}"), "--ref_dir", "no_refs")
  _one_error(_run("predict", *spine, f"--labeling_checkpoint={instance_smoke_run}", "--first_vertebra=C2"),
             "--first_vertebra", "--labeling_checkpoint")
  _one_error(_run("predict", *spine, f"--labeling_checkpoint={instance_smoke_run}"), "labeling")
  _nothing_written(tmp_path / "o")


PAIRS_CASES = {
    "absent": (None, ("absent.csv: no such file",)),
    "no_columns": ("img,seg\na,b\n", ("pairs.csv", "needs the columns image,mask")),
    "no_rows": ("image,mask\n", ("pairs.csv", "no rows")),
    "empty_fields": ("image,mask\na.nii.gz,a_seg.nii.gz\nb.nii.gz\n,c_seg.nii.gz\n",
                     ("pairs.csv", "row 3: empty mask", "row 4: empty image")),
    "binary": (b"\xff\xfe\x00\x01image", ("pairs.csv", "not a readable CSV file")),
    "same_output": ("image,mask\nct.nii.gz,m.nii.gz\nct.nii.gz,n.nii.gz\n",
                    ("inputs would write the same outputs", "ct.nii.gz")),
}


@pytest.mark.parametrize("case", sorted(PAIRS_CASES))
def test_bad_pairs_file(case, tmp_path):
  content, fragments = PAIRS_CASES[case]
  pairs = tmp_path / ("absent.csv" if content is None else "pairs.csv")
  if isinstance(content, bytes):
    pairs.write_bytes(content)
  elif content is not None:
    pairs.write_text(content)
  _one_error(_run("predict", "bone_quality", f"--checkpoint={tmp_path}", f"--pairs={pairs}", f"--output={tmp_path / 'o'}"),
             *fragments)
  _nothing_written(tmp_path / "o")


def _damaged_copy(run_dir, target):
  shutil.copytree(run_dir / "checkpoints", target / "checkpoints")
  for f in (target / "checkpoints").rglob("*"):
    if f.is_file() and "state" in f.parts and f.stat().st_size > 64:
      f.write_bytes(b"\0" * 64)
  return target


CHECKPOINT_CASES = {
    "absent": (lambda tmp, runs: tmp / "absent", "does not exist"),
    "empty_folder": (lambda tmp, runs: (tmp / "empty").mkdir() or tmp / "empty", "no spine_jax checkpoint"),
    "a_file": (lambda tmp, runs: (tmp / "f.ckpt").write_text("x") and tmp / "f.ckpt", "f.ckpt"),
    "damaged": (lambda tmp, runs: _damaged_copy(runs["bone_quality"], tmp / "damaged"), "cannot be read"),
    "wrong_task": (lambda tmp, runs: runs["semantic"], "semantic"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_bad_checkpoint(case, bone_quality_smoke_run, semantic_smoke_run, tmp_path):
  make, fragment = CHECKPOINT_CASES[case]
  checkpoint = make(tmp_path, {"bone_quality": bone_quality_smoke_run, "semantic": semantic_smoke_run})
  image, mask = _ct_pair()
  _save(tmp_path / "ct.nii.gz", image)
  _save(tmp_path / "seg.nii.gz", mask)
  _one_error(_run("predict", "bone_quality", f"--checkpoint={checkpoint}", f"--image={tmp_path / 'ct.nii.gz'}",
                  f"--mask={tmp_path / 'seg.nii.gz'}", f"--output={tmp_path / 'o'}"), fragment)
  _nothing_written(tmp_path / "o")


# --------------------------------------------------------------------------------------------------
# Ctrl-C: one line, status 130, every finished scan complete, the rest redone by the same command.


def test_ctrl_c_in_a_batch_keeps_whole_scans_and_the_rerun_finishes(semantic_smoke_run, tmp_path):
  folder = tmp_path / "scans"
  cfg = semantic_config.get_config("smoke").data.phantom
  for seed in (1, 2, 3):
    mri.write_mri_phantom_nifti(folder / f"sub-{seed}", 1, seed=seed, cfg=cfg)
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "spine_jax.predict", "semantic", f"--checkpoint={semantic_smoke_run}",
         f"--input={folder}", f"--output={out}"]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=_env())
  deadline = time.monotonic() + 300
  while not list(out.rglob("*_msk.nii.gz")) and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=300)
  if proc.returncode == 0:
    pytest.skip("the run finished before Ctrl-C reached it")
  assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
  assert err.strip().splitlines()[-1].startswith("interrupted:"), err[-3000:]
  _no_temp_files(out)
  masks = {p.name[: -len("_seg-spine_msk.nii.gz")] for p in out.rglob("*_msk.nii.gz")}
  pictures = {p.name[: -len("_seg-spine_snp.png")] for p in out.rglob("*_snp.png")}
  assert masks == pictures, (masks, pictures)  # a scan is done only with all of its outputs
  again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"{len(masks)} already done" in again.stdout
  assert len(list(out.rglob("*_msk.nii.gz"))) == len(list(out.rglob("*_snp.png"))) == 3


# --------------------------------------------------------------------------------------------------
# evaluate


@pytest.fixture(scope="module")
def masks(tmp_path_factory):
  folder = tmp_path_factory.mktemp("eval_masks")
  semantic = np.zeros((8, 8, 8), np.uint8)
  semantic[2:6, 2:6, 2:6] = 49
  instance = np.where(semantic > 0, 20, 0).astype(np.uint8)
  _save(folder / "sem.nii.gz", semantic)
  _save(folder / "inst.nii.gz", instance)
  _save(folder / "ct.nii.gz", np.random.default_rng(0).integers(-1000, 1500, (8, 8, 8)).astype(np.int16))
  _save(folder / "mri.nii.gz", np.random.default_rng(1).integers(0, 900, (8, 8, 8)).astype(np.int16))
  moved = AFFINE.copy()
  moved[0, 3] = 5.0
  _save(folder / "moved.nii.gz", semantic, moved)
  return folder


EVALUATE_CASES = {
    "no_command": ((), "{seg|instances}"),
    "unknown_command": (("dice",), "{seg|instances}"),
    "no_ref": (("seg", "--pred=sem.nii.gz"), "seg needs --pred and --ref"),
    "absent_pred": (("seg", "--pred=absent.nii.gz", "--ref=sem.nii.gz"), "absent.nii.gz: file not found"),
    "off_grid": (("seg", "--pred=moved.nii.gz", "--ref=sem.nii.gz"), "different affines"),
    "ct_as_seg": (("seg", "--pred=ct.nii.gz", "--ref=sem.nii.gz"), "ct.nii.gz: label mask has negative values"),
    "ct_as_instances": (("instances", "--pred=ct.nii.gz", "--ref=inst.nii.gz"), "ct.nii.gz: label mask has negative"),
    "mri_as_seg": (("seg", "--pred=mri.nii.gz", "--ref=sem.nii.gz"), "are not SPINEPS semantic ids"),
    "mri_as_instances": (("instances", "--pred=mri.nii.gz", "--ref=inst.nii.gz"), "are not SPINEPS instance ids"),
    "labels_not_numbers": (("seg", "--pred=sem.nii.gz", "--ref=sem.nii.gz", "--labels=49,x"), "--labels"),
    "unknown_group": (("instances", "--pred=inst.nii.gz", "--ref=inst.nii.gz", "--groups=ribs"), "--groups"),
    "low_iou_threshold": (("instances", "--pred=inst.nii.gz", "--ref=inst.nii.gz", "--iou_threshold=0.2"),
                          "--iou_threshold must be in [0.5, 1)"),
    "output_is_a_folder": (("seg", "--pred=sem.nii.gz", "--ref=sem.nii.gz", "--output=."), "is a folder"),
}


@pytest.mark.parametrize("case", sorted(EVALUATE_CASES))
def test_bad_evaluate(case, masks):
  args, fragment = EVALUATE_CASES[case]
  args = [a if not a.endswith(".nii.gz") else a.replace("=", f"={masks}/", 1) for a in args]
  args = [f"--output={masks}" if a == "--output=." else a for a in args]
  if not any(a.startswith("--output") for a in args):
    args.append(f"--output={masks / 'report.json'}")
  before = _files(masks)
  _one_error(_run("evaluate", *args), fragment)
  assert _files(masks) == before


# --------------------------------------------------------------------------------------------------
# train: config, work directory, manifests.


def _manifest_files(folder):
  image, mask = _ct_pair()
  _save(folder / "ct.nii.gz", image)
  _save(folder / "seg.nii.gz", mask)
  (folder / "broken.nii.gz").write_bytes(b"not a nifti")


HEADER = "image,mask,label,quality,posterolateral"
MANIFEST_CASES = {
    "absent": (None, "manifest not found"),
    "empty": ("", "empty manifest"),
    "missing_column": ("image,mask,label\nct.nii.gz,seg.nii.gz,20\n", "missing column(s) quality, posterolateral"),
    "extra_value": (f"{HEADER}\nct.nii.gz,seg.nii.gz,20,normal,none,oops\n",
                    "row 1 (line 2): more values than columns"),
    "absent_image": (f"{HEADER}\nnope.nii.gz,seg.nii.gz,20,normal,none\n", "field 'image': file not found"),
    "unknown_class": (f"{HEADER}\nct.nii.gz,seg.nii.gz,20,sclerotic,none\n",
                      "field 'quality': unknown class 'sclerotic'"),
    "bad_label": (f"{HEADER}\nct.nii.gz,seg.nii.gz,-3,normal,none\n",
                  "field 'label': expected a positive whole number"),
    "label_not_in_mask": (f"{HEADER}\nct.nii.gz,seg.nii.gz,21,normal,none\n", "field 'label'"),
    "unknown_split": (f"{HEADER},split\nct.nii.gz,seg.nii.gz,20,normal,none,training\n", "unknown split 'training'"),
    "broken_image": (f"{HEADER}\nbroken.nii.gz,seg.nii.gz,20,normal,none\n", "broken.nii.gz"),
    "unknown_format": ("x", "unknown manifest format '.txt'"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_bad_training_manifest(case, tmp_path):
  content, fragment = MANIFEST_CASES[case]
  _manifest_files(tmp_path)
  manifest = tmp_path / ("manifest.txt" if case == "unknown_format" else "manifest.csv")
  if content is not None:
    manifest.write_text(content)
  _one_error(_run("train", "--config=configs/bone_quality.py:smoke", f"--workdir={tmp_path / 'w'}",
                  "--config.data.source=manifest", f"--config.data.manifest={manifest}"), manifest.name, fragment)
  assert not (tmp_path / "w" / "checkpoints").exists()


SCAN_MANIFEST_CASES = {
    "missing_field": ("image,semantic\nimg.nii.gz,\n", "row 1 (line 2): missing field(s) semantic"),
    "absent_semantic": ("image,semantic\nimg.nii.gz,nope.nii.gz\n", "field 'semantic': file not found"),
}


@pytest.mark.parametrize("case", sorted(SCAN_MANIFEST_CASES))
def test_bad_segmentation_manifest(case, tmp_path):
  content, fragment = SCAN_MANIFEST_CASES[case]
  _save(tmp_path / "img.nii.gz", _good_array())
  (tmp_path / "manifest.csv").write_text(content)
  _one_error(_run("train", "--config=configs/semantic.py:smoke", f"--workdir={tmp_path / 'w'}",
                  "--config.data.source=manifest", f"--config.data.manifest={tmp_path / 'manifest.csv'}"),
             "manifest.csv", fragment)


TRAIN_CASES = {
    "unknown_variant": (("--config=configs/bone_quality.py:nope",), "configs/bone_quality.py: unknown variant(s) ['nope']"),
    "absent_config": (("--config=configs/nope.py",), "configs/nope.py"),
    "unknown_field": (("--config=configs/bone_quality.py:smoke", "--config.nope=1"), "no field 'nope'"),
    "wrong_type": (("--config=configs/bone_quality.py:smoke", "--config.batch_size=abc"), "batch_size"),
    "zero_batch": (("--config=configs/bone_quality.py:smoke", "--config.batch_size=0"), "config.batch_size 0"),
    "batch_not_divisible": (("--config=configs/bone_quality.py:smoke", "--config.batch_size=3"), "not divisible"),
    "bad_init_from": (("--config=configs/bone_quality.py:smoke", "--config.model.init_from=INIT"), "init.npz"),
    "no_workdir": (("--config=configs/bone_quality.py:smoke", "--workdir="), "--workdir"),
}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_bad_training_flags(case, tmp_path):
  args, fragment = TRAIN_CASES[case]
  (tmp_path / "init.npz").write_bytes(b"not an npz")
  args = [a.replace("INIT", str(tmp_path / "init.npz")) for a in args]
  if not any(a.startswith("--workdir") for a in args):
    args.append(f"--workdir={tmp_path / 'w'}")
  _one_error(_run("train", *args), fragment)
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_train_workdir_that_is_a_file_or_cannot_be_written(tmp_path):
  (tmp_path / "file").write_text("keep")
  _one_error(_run("train", "--config=configs/bone_quality.py:smoke", f"--workdir={tmp_path / 'file'}"), "file")
  assert (tmp_path / "file").read_text() == "keep"
  workdir = _unwritable_folder(tmp_path)
  _one_error(_run("train", "--config=configs/bone_quality.py:smoke", f"--workdir={workdir}"), str(workdir))


# --------------------------------------------------------------------------------------------------
# convert


def test_convert_bad_inputs(tmp_path):
  _one_error(_run("convert", "nope"), "densenet|nnunet|spineps")
  _one_error(_run("convert", "spineps", "--output=x"), "spineps needs --output and --semantic_folder")
  _one_error(_run("convert", "nnunet", f"--input={tmp_path / 'absent'}", f"--output={tmp_path / 'o'}"), "absent")
  (tmp_path / "empty").mkdir()
  _one_error(_run("convert", "nnunet", f"--input={tmp_path / 'empty'}", f"--output={tmp_path / 'o'}"), "empty")
  (tmp_path / "weights.pth").write_bytes(b"not a torch file")
  _one_error(_run("convert", "densenet", f"--input={tmp_path / 'weights.pth'}", f"--output={tmp_path / 'o.npz'}"),
             "weights.pth")
  (tmp_path / "file").write_text("keep")
  _one_error(_run("convert", "densenet", f"--input={tmp_path / 'weights.pth'}", f"--output={tmp_path / 'file'}"),
             "file")
  assert (tmp_path / "file").read_text() == "keep"
  labelling = tmp_path / "labeling"  # SPINEPS' labelling folder without its *val_f1=*valf1-weights.ckpt
  labelling.mkdir()
  (labelling / "inference_config.json").write_text(json.dumps({"modeltype": "classifier"}))
  (labelling / "last.ckpt").write_bytes(b"")
  _one_error(_run("convert", "spineps", f"--labeling_folder={labelling}", f"--output={tmp_path / 'o'}"),
             labelling, "no **/*val_f1=*valf1-weights.ckpt")
  assert not (tmp_path / "o").exists() and not (tmp_path / "o.npz").exists()

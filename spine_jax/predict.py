"""Entry point for checkpoint inference.

  python -m spine_jax.predict bone_quality --checkpoint=RUN_DIR --image=ct.nii.gz --mask=vertebrae.nii.gz \
      --scheme=totalsegmentator --output=OUT_DIR
  python -m spine_jax.predict bone_quality --checkpoint=RUN_DIR --pairs=scans.csv --scheme=spineps --output=OUT_DIR

  python -m spine_jax.predict semantic --checkpoint=RUN_DIR --input=scan.nii.gz|FOLDER --output=OUT_DIR

`bone_quality` classifies every labelled vertebra of a CT (bone quality, posterolateral involvement, partial
SINS) and writes <name>_bone_quality.json and .csv. With --pairs (a CSV with columns image,mask), each
scan is done in turn; a failing scan is reported and the others go on.

`semantic` segments sagittal T2w MRI (SPINEPS phase 1) into <name>_seg-spine_msk.nii.gz on the input's
exact grid, plus a quick-look <name>_seg-spine_snp.png. A folder is searched recursively; scans whose
mask already exists are skipped (--overwrite redoes them); each failure is reported at the end.

  python -m spine_jax.predict spine --semantic_checkpoint=RUN_DIR --instance_checkpoint=RUN_DIR \
      --input=scan.nii.gz|FOLDER --output=OUT_DIR [--labeling_checkpoint=RUN_DIR | --first_vertebra=C2] \
      [--ref_dir=DIR | --ref_instance=FILE]

`spine` runs SPINEPS phases 1 and 2 (inference/spine.py), and phase 3 with --labeling_checkpoint: the labelling
network and the level path name every vertebra (inference/phase3/naming.py); without it vertebrae are numbered
by position from --first_vertebra and writes, side by side, <name>_seg-spine_msk.nii.gz
(semantic), <name>_seg-vert_msk.nii.gz (numbered instances), <name>_seg-spine_ctd.json (centroids and phase
2's warnings) and <name>_seg-spine_snp.png. Scans with all four are skipped unless --overwrite; a failed scan
leaves none. With a reference instance mask, instance metrics are printed per scan. --output_format=spineps
writes SPINEPS' own names into a derivatives_seg folder (sub-01_T2w.nii.gz -> derivatives_seg/
sub-01_mod-T2w_seg-spine_msk.nii.gz, ...) and the centroids as SPINEPS' TPTBox POI file
(inference/spineps_outputs.py).
"""
from __future__ import annotations

import csv
import pathlib
import sys

import numpy as np

from absl import app
from absl import flags
from absl import logging

from spine_jax import cli
from spine_jax.data import bias_field
from spine_jax.data import level_classes
from spine_jax.engine import checkpoints
from spine_jax.inference import batch

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Model bundle, training work directory or checkpoint folder.")
_IMAGE = flags.DEFINE_string("image", None, "CT NIfTI in Hounsfield units.")
_MASK = flags.DEFINE_string("mask", None, "Vertebra label NIfTI on the CT's grid.")
_PAIRS = flags.DEFINE_string("pairs", None, "CSV with columns image,mask (paths relative to the CSV).")
_SCHEME = flags.DEFINE_enum("scheme", "spineps", ["spineps", "totalsegmentator"], "Label numbering of the mask.")
_LABELS = flags.DEFINE_list("labels", None, "Only these mask labels (default: every vertebra label).")
flags.register_validator("labels", lambda v: v is None or all(x.strip().isdigit() for x in v),
                         "--labels takes mask label numbers separated by commas, e.g. 20,21,22")
_OUTPUT = flags.DEFINE_string("output", None, "Output folder.")
_CACHE = cli.define_compilation_cache_flag()
_NAME = flags.DEFINE_string("name", None, "Output name stem (default: the image file's name).")
_INPUT = flags.DEFINE_string("input", None, "semantic, spine: a NIfTI file or a folder of them.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "semantic, spine: redo scans whose outputs exist.")
_SEMANTIC_CHECKPOINT = flags.DEFINE_string("semantic_checkpoint", None,
                                           "spine: phase 1 (semantic) bundle, run or checkpoint.")
_INSTANCE_CHECKPOINT = flags.DEFINE_string("instance_checkpoint", None,
                                           "spine: phase 2 (instance) bundle, run or checkpoint.")
_LABELING_CHECKPOINT = flags.DEFINE_string(
    "labeling_checkpoint", None, "spine: phase 3 (labelling network) bundle, run or checkpoint: names every vertebra "
    "(T13 and L6 included) instead of numbering them from --first_vertebra.")
_FIRST_VERTEBRA = flags.DEFINE_string(
    "first_vertebra", None, "spine: level (e.g. C2, T10) or SPINEPS id of the topmost vertebra in the field "
    "(default: the instance config's, 1 = C1).")
_REF_INSTANCE = flags.DEFINE_string("ref_instance", None, "spine: reference instance mask of the one input scan.")
_REF_DIR = flags.DEFINE_string(
    "ref_dir", None, "spine: folder of reference instance masks, <name>_seg-vert_msk.nii.gz (or with the name's "
    "last _suffix dropped), searched recursively; instance metrics are printed for each scan that has one.")

_OUTPUT_FORMAT = flags.DEFINE_enum(
    "output_format", "spine_jax", list(batch.OUTPUT_FORMATS),
    "spine: 'spine_jax' writes <name>_seg-spine_msk.nii.gz, _seg-vert_msk.nii.gz, _seg-spine_ctd.json (centroids "
    "in world mm) and _seg-spine_snp.png beside each other; 'spineps' writes SPINEPS' own names (sub-01_T2w.nii.gz "
    "-> sub-01_mod-T2w_seg-spine_msk.nii.gz, ...) in a derivatives_seg folder, the centroids as TPTBox's POI file.")
_DISABLE_TTA = flags.DEFINE_bool(
    "disable_tta", False, "semantic, spine: no test-time mirroring (about half the time of the checkpoint's "
    "config.inference.mirror_axes=(2,)), as nnU-Net's --disable_tta.")
_STEP_SIZE = flags.DEFINE_float(
    "step_size", None, "semantic, spine: sliding-window step as a fraction of the patch (default: the "
    "checkpoint's config.inference.step_size, 0.5); larger is faster and coarser.")
flags.register_validator("step_size", lambda v: v is None or 0.0 < v <= 1.0, "--step_size must be in (0, 1]")
_N4_BACKEND = flags.DEFINE_enum(
    "n4_backend", None, list(bias_field.N4_BACKENDS), "semantic, spine: the N4 implementation (default the model's "
    "config.data.preprocess.n4_backend, else 'numpy'): 'numpy' (data/n4_filter.py, ITK's filter rewritten, about "
    "15x faster here) or 'sitk' (SimpleITK's, the n4 extra; bit for bit with SPINEPS' ANTsPy on the TPTBox MRI).")
_NO_N4 = flags.DEFINE_bool(
    "no_n4", False, "semantic, spine: skip the N4 bias-field correction of models that ask for it "
    "(config.data.preprocess.bias_field='n4', SPINEPS' models), as spineps --no-n4.")

COMMANDS = ("bone_quality", "semantic", "spine")


def inference_overrides(config, disable_tta: bool = False, step_size: float | None = None,
                        no_n4: bool = False, n4_backend: str | None = None) -> None:
  """--disable_tta, --step_size, --no_n4 and --n4_backend on a semantic checkpoint's config."""
  if step_size is not None:
    config.inference.step_size = float(step_size)
  if disable_tta:
    config.inference.mirror_axes = ()
  if no_n4:
    config.data.preprocess.bias_field = bias_field.NONE
  if n4_backend is not None:
    config.data.preprocess.n4_backend = n4_backend


def _read_pairs(path: str) -> list[tuple[pathlib.Path, pathlib.Path]]:
  """The (image, mask) rows of a --pairs CSV, paths relative to the CSV; every bad row is named at once."""
  csv_path = pathlib.Path(path)
  if not csv_path.is_file():
    raise app.UsageError(f"--pairs {csv_path}: no such file")
  try:
    with open(csv_path, newline="", encoding="utf-8") as f:
      reader = csv.DictReader(f)
      if not reader.fieldnames or not {"image", "mask"} <= set(reader.fieldnames):
        raise app.UsageError(f"--pairs {csv_path}: needs the columns image,mask (found {reader.fieldnames})")
      rows = list(reader)
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise app.UsageError(f"--pairs {csv_path}: not a readable CSV file ({e})") from None
  if not rows:
    raise app.UsageError(f"--pairs {csv_path}: no rows")
  bad = [f"row {i}: empty {', '.join(k for k in ('image', 'mask') if not (r.get(k) or '').strip())}"
         for i, r in enumerate(rows, 2) if not all((r.get(k) or "").strip() for k in ("image", "mask"))]
  if bad:
    raise app.UsageError(f"--pairs {csv_path}: " + "; ".join(bad) + " (each row needs an image and a mask)")
  return [(csv_path.parent / r["image"].strip(), csv_path.parent / r["mask"].strip()) for r in rows]


def _print_ct_rows(rows, ignored) -> None:
  for row in rows:
    sins_total = row.get("sins", {}).get("partial_total") if row.get("sins") else None
    print(f"    {row['level']:>4} (label {row['label']}): {row.get('quality', '-'):8s} "
          f"posterolateral {row.get('posterolateral', '-'):10s} partial SINS "
          f"{'-' if sins_total is None else sins_total}  [{row['num_slices']} slices]"
          + (f"  ERROR {row['error']}" if "error" in row else ""), flush=True)
  if ignored:
    print(f"    labels not classified (no vertebra in the --scheme={_SCHEME.value} numbering): {ignored}", flush=True)


def _report_failures(failures, total: int) -> int:
  """The failed scans with their reasons, once each, at the end (the run itself names them briefly)."""
  if failures:
    print(f"{len(failures)} of {total} scan(s) failed:", file=sys.stderr)
    for source, e in failures:
      print(f"  {e}" if str(source) in str(e) else f"  {source}: {e}", file=sys.stderr)
  return 1 if failures else 0


def run_bone_quality() -> int:
  from spine_jax.inference import bone_quality
  from spine_jax.reports import vertebra_report

  if not _CHECKPOINT.value or not _OUTPUT.value:
    raise app.UsageError("bone_quality needs --checkpoint and --output")
  if _PAIRS.value:
    pairs = _read_pairs(_PAIRS.value)
    root = pathlib.Path(_PAIRS.value).parent
  elif _IMAGE.value and _MASK.value:
    pairs = [(pathlib.Path(_IMAGE.value), pathlib.Path(_MASK.value))]
    root = None
  else:
    raise app.UsageError("bone_quality needs --image and --mask, or --pairs")
  jobs = batch.plan_jobs([image for image, _ in pairs], _OUTPUT.value, root=root, name=_NAME.value)
  batch.check_output_dir(_OUTPUT.value)
  state, config, mesh = bone_quality.load_bone_quality(_CHECKPOINT.value)
  failures = []
  for i, (job, (image, mask)) in enumerate(zip(jobs, pairs), 1):  # plan_jobs keeps the order
    try:
      rows, ignored = bone_quality.classify_ct(state, config, mesh, image, mask, scheme=_SCHEME.value,
                                            labels=_LABELS.value)
      meta = {"image": str(image), "mask": str(mask), "scheme": _SCHEME.value, "ignored_labels": ignored,
              "checkpoint": str(pathlib.Path(_CHECKPOINT.value).absolute()),
              "classes": {"quality": list(bone_quality.QUALITY_CLASSES),
                          "posterolateral": list(bone_quality.POSTEROLATERAL_CLASSES)}}
      json_path, csv_path = vertebra_report.write_reports(rows, meta, job.out_dir, job.stem)
      print(f"[{i}/{len(jobs)}] {image}: {len(rows)} vertebrae -> {json_path}, {csv_path}", flush=True)
      _print_ct_rows(rows, ignored)
    except (ValueError, OSError) as e:  # NiftiError, SliceError, LevelError are ValueErrors
      failures.append((image, e))
      print(f"[{i}/{len(jobs)}] FAILED {image.name} (reason at the end)", file=sys.stderr, flush=True)
  return _report_failures(failures, len(jobs))


class _Progress:
  """One updating line: which file, and how many sliding windows of it are done."""

  def __init__(self, total_files: int):
    self.total = total_files
    self.index = 0
    self.name = ""

  def file(self, index: int, name: str):
    self.index, self.name = index, name
    self.windows(0, 1)

  def windows(self, done: int, total: int):
    self.stage("windows", done, total)

  def stage(self, unit: str, done: int, total: int | None):
    """A bar when the total is known (sliding windows), else a count (phase 2's cutouts)."""
    width = 24
    if total is None:
      bar = f"{done} {unit}"
    else:
      filled = int(width * done / max(total, 1))
      bar = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {unit}"
    print(f"\r[{self.index}/{self.total}] {self.name[-50:]:50s} {bar:40s}", end="", flush=True)


def _plan_scans(input_path, output, output_format: str = "spine_jax") -> list:
  """Every scan of --input with its output location, and --output checked, before any model loads."""
  scans = batch.find_scans(input_path)
  jobs = batch.plan_jobs(scans, output, root=batch.input_root(input_path), output_format=output_format)
  batch.check_output_dir(output)
  return jobs


def _triage(jobs, outputs_of, identity_of) -> tuple[list, list, int]:
  """(jobs to run with their input digests, failures, number already done) from each job's outputs."""
  todo, failures, done = [], [], 0
  for job in jobs:
    try:
      digest = batch.file_digest(job.source)
    except OSError as e:
      failures.append((job.source, f"cannot read it ({e.strerror or e})"))
      continue
    state = batch.output_state(outputs_of(job), batch.mask_input_digest(identity_of(job)), digest)
    if state == "done" and not _OVERWRITE.value:
      done += 1
    elif state == "foreign" and not _OVERWRITE.value:
      failures.append((job.source, f"{identity_of(job)} exists and was not made from this file; choose another "
                                   f"--output or pass --overwrite to replace it"))
    else:
      todo.append((job, digest))
  return todo, failures, done


def run_semantic() -> int:
  from spine_jax.data import nifti
  from spine_jax.inference import restore
  from spine_jax.engine import predict as predict_lib
  from spine_jax.inference import semantic
  from spine_jax.reports import pictures

  if not (_CHECKPOINT.value and _INPUT.value and _OUTPUT.value):
    raise app.UsageError("semantic needs --checkpoint, --input and --output")
  jobs = _plan_scans(_INPUT.value, _OUTPUT.value)
  mask_of = lambda job: job.path(batch.OUTPUT_SUFFIXES["semantic"])  # noqa: E731
  outputs = lambda job: (mask_of(job), job.path(batch.OUTPUT_SUFFIXES["snapshot"]))  # noqa: E731
  todo, failures, skipped = _triage(jobs, outputs, mask_of)
  if todo:
    state, config, mesh = restore.load_for_inference(_CHECKPOINT.value, "semantic")
    inference_overrides(config, _DISABLE_TTA.value, _STEP_SIZE.value, _NO_N4.value, _N4_BACKEND.value)
    logits_fn = predict_lib.semantic_logits_fn(state, mesh)
  progress = _Progress(len(todo))
  segmented = 0
  for i, (job, digest) in enumerate(todo, 1):
    progress.file(i, job.source.name)
    mask_path, png_path = outputs(job)
    try:
      result = semantic.segment_file(state, config, mesh, job.source, logits_fn=logits_fn, progress=progress.windows)
      blank = semantic.blank_image_message(result.model_image)
      if blank or not np.any(result.mask):
        print(f"\n  warning: {job.source}: {blank or 'no spine structure found (not a spine T2w scan?)'}", flush=True)
      # The picture first: the mask, which records the input, marks the scan done.
      pictures.sagittal_snapshot_png(result.model_image, [result.model_mask], ["T2w", "semantic"], png_path)
      nifti.atomic_save_nifti(result.mask, result.affine, mask_path, header=result.header, dtype="uint8",
                              description=batch.nifti_description(digest))
      segmented += 1
      print(f"  -> {mask_path}", flush=True)
    except (ValueError, OSError, MemoryError) as e:  # NiftiError, VolumeError, LabelError are ValueErrors
      failures.append((job.source, e))
      print(f"\n[{i}/{len(todo)}] FAILED {job.source.name} (reason at the end)", file=sys.stderr, flush=True)
  print(f"{segmented} segmented, {skipped} already done, {len(failures)} failed", flush=True)
  return _report_failures(failures, len(jobs))


def _reference(spine, job, paths: dict, references: dict | None, root):
  if _REF_INSTANCE.value:
    return pathlib.Path(_REF_INSTANCE.value)
  if references is None:
    return None
  return spine.find_reference(references, job.stem, folder=job.folder if root is not None else None,
                              exclude=paths.values())


def _report_metrics(scan, vert_path, ref) -> dict:
  """Print the instance metrics of a scan's vertebra mask against its reference; returns the report."""
  from spine_jax.metrics import instances as instance_metrics
  report = instance_metrics.compare_instance_files(vert_path, ref)
  print(f"  {scan.name} against {ref}:", flush=True)
  table = instance_metrics.summary_table(report)
  print("\n".join("    " + line for line in table.splitlines()), flush=True)
  return report


def _print_spine_result(instance_path, result: dict) -> None:
  vertebrae = result["centroids"]["vertebrae"]
  print(f"\n  -> {instance_path}: {len(vertebrae)} vertebrae "
        f"({', '.join(v['level'] or k for k, v in vertebrae.items())})", flush=True)
  for message in result["messages"]:
    print(f"    warning: {message}", flush=True)


def run_spine() -> int:
  import logging as py_logging
  from spine_jax.inference import spine

  if not (_SEMANTIC_CHECKPOINT.value and _INSTANCE_CHECKPOINT.value and _INPUT.value and _OUTPUT.value):
    raise app.UsageError("spine needs --semantic_checkpoint, --instance_checkpoint, --input and --output")
  if _REF_INSTANCE.value and _REF_DIR.value:
    raise app.UsageError("spine: give --ref_instance or --ref_dir, not both")
  if _LABELING_CHECKPOINT.value and _FIRST_VERTEBRA.value:
    raise app.UsageError("spine: --first_vertebra numbers by position when there is no --labeling_checkpoint; "
                         "give one or the other")
  try:
    first = spine.parse_first_vertebra(_FIRST_VERTEBRA.value)
  except ValueError as e:
    raise app.UsageError(f"--first_vertebra: {e}") from e
  jobs = _plan_scans(_INPUT.value, _OUTPUT.value, _OUTPUT_FORMAT.value)
  if _REF_INSTANCE.value and len(jobs) != 1:
    raise app.UsageError(f"--ref_instance is for one input scan, found {len(jobs)}; use --ref_dir")
  if _REF_DIR.value and not pathlib.Path(_REF_DIR.value).is_dir():
    raise app.UsageError(f"--ref_dir {_REF_DIR.value}: no such folder")
  references = spine.index_references(_REF_DIR.value) if _REF_DIR.value else None
  root = batch.input_root(_INPUT.value)
  paths_of = {job: job.outputs() for job in jobs}
  todo, failures, skipped = _triage(jobs, lambda job: paths_of[job].values(), lambda job: paths_of[job]["semantic"])
  models = spine.load_spine_models(_SEMANTIC_CHECKPOINT.value, _INSTANCE_CHECKPOINT.value) if todo else None
  labeling_model = (spine.load_labeling_model(_LABELING_CHECKPOINT.value, models[0].mesh)
                    if models and _LABELING_CHECKPOINT.value else None)
  if models:
    inference_overrides(models[0].config, _DISABLE_TTA.value, _STEP_SIZE.value, _NO_N4.value, _N4_BACKEND.value)
  py_logging.getLogger(spine.PHASE2_LOGGER).setLevel(py_logging.ERROR)  # its warnings are printed per scan below
  progress = _Progress(len(todo))
  digests = dict(todo)
  failed = {source for source, _ in failures}
  segmented, dice = 0, []
  for job in jobs:
    if job.source in failed:
      continue
    paths = paths_of[job]
    if job in digests:
      progress.file(segmented + 1, job.source.name)
      try:
        result = spine.segment_file(*models, job.source, paths, first_vertebra=first, progress=progress.stage,
                                    input_digest=digests[job], output_format=_OUTPUT_FORMAT.value,
                                    labeling_model=labeling_model)
      except (ValueError, OSError, RuntimeError, MemoryError) as e:  # bad files; a scan too large for the device
        failures.append((job.source, e))
        print(f"\nFAILED {job.source.name} (reason at the end)", file=sys.stderr, flush=True)
        continue
      segmented += 1
      if not result["centroids"]["vertebrae"]:
        result["messages"].append("no vertebra found (blank or not a spine T2w scan?)")
      _print_spine_result(paths["instance"], result)
    ref = _reference(spine, job, paths, references, root)
    if ref is not None:  # also for scans done before: metrics read the written mask
      try:
        dice.append(_report_metrics(job.source, paths["instance"], ref)["groups"]["vertebrae"]["by_overlap"]["mean_dice"])
      except (ValueError, OSError) as e:
        failures.append((job.source, f"reference {ref}: {e}"))
  print(f"{segmented} segmented, {skipped} already done, {len(failures)} failed", flush=True)
  scored = [d for d in dice if d is not None]
  if scored:
    print(f"mean vertebra Dice (paired by overlap) over {len(scored)} scan(s): {sum(scored) / len(scored):.3f}")
  return _report_failures(failures, len(jobs))


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: python -m spine_jax.predict {{{'|'.join(COMMANDS)}}} --flags (got {argv[1:]})")
  logging.set_verbosity(logging.WARNING)
  cli.use_compilation_cache(_CACHE.value)
  try:
    return {"bone_quality": run_bone_quality, "semantic": run_semantic, "spine": run_spine}[argv[1]]()
  except (batch.BatchError, checkpoints.CheckpointError, level_classes.HeadError) as e:  # the run cannot start
    print(f"error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  cli.run(main, "spine_jax.predict")

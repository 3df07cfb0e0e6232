"""Entry point for metrics between masks.

  python -m spine_jax.evaluate seg --pred=pred_seg-spine_msk.nii.gz --ref=ref.nii.gz [--output=report.json]

  python -m spine_jax.evaluate instances --pred=pred_seg-vert_msk.nii.gz --ref=ref.nii.gz [--output=report.json|.csv]

`seg`: per-structure Dice and average symmetric surface distance (mm) between two masks on one grid.
`instances`: per-vertebra (disc, endplate) Dice and ASSD paired by id and by overlap, detection
precision / recall / F1 and panoptic quality of two instance masks with SPINEPS ids.
A table goes to the console; the report (JSON, or one CSV row per instance) is written atomically
to --output, or printed as JSON without it.
"""
from __future__ import annotations

import json
import pathlib

from absl import app
from absl import flags

from spine_jax import cli
from spine_jax.data import nifti
from spine_jax.inference import batch
from spine_jax.metrics import instances
from spine_jax.metrics import segmentation

_PRED = flags.DEFINE_string("pred", None, "Predicted mask (NIfTI).")
_REF = flags.DEFINE_string("ref", None, "Reference mask (NIfTI) on the same grid.")
_OUTPUT = flags.DEFINE_string(
    "output", None, "Report file: JSON; for instances, .csv gives one row per instance (default: print JSON).")
_LABELS = flags.DEFINE_list("labels", None, "seg: label ids to score (default: every label in either mask).")
flags.register_validator("labels", lambda v: v is None or all(x.strip().isdigit() for x in v),
                         "--labels takes label numbers separated by commas, e.g. 49,100")
_GROUPS = flags.DEFINE_list("groups", list(instances.INSTANCE_GROUPS),
                            f"instances: groups to score, among {','.join(instances.INSTANCE_GROUPS)}.")
flags.register_validator("groups", lambda v: bool(v) and all(g in instances.INSTANCE_GROUPS for g in v),
                         f"--groups takes some of {','.join(instances.INSTANCE_GROUPS)}")
_IOU_THRESHOLD = flags.DEFINE_float("iou_threshold", 0.5, "instances: detection IoU threshold, in [0.5, 1).")
flags.register_validator("iou_threshold", lambda v: 0.5 <= v < 1.0, "--iou_threshold must be in [0.5, 1)")
_ASSD = flags.DEFINE_bool("assd", True, "instances: surface distances (--noassd skips them, the slow part).")

COMMANDS = ("seg", "instances")
PROGRAM = "spine_jax.evaluate"


def _output_path() -> pathlib.Path | None:
  """--output, checked before any work: not a folder, and its folder can be written."""
  if not _OUTPUT.value:
    return None
  path = pathlib.Path(_OUTPUT.value)
  if path.is_dir():
    raise app.UsageError(f"--output {path}: is a folder; give the report's file name")
  try:
    batch.check_output_dir(path.parent, named=path)
  except batch.BatchError as e:
    raise app.UsageError(str(e)) from None
  return path


def _report(command: str) -> tuple[str, str]:
  """(console table, report file text) of one command."""
  if command == "seg":
    labels = [int(v) for v in _LABELS.value] if _LABELS.value else None
    report = segmentation.compare_files(_PRED.value, _REF.value, labels)
    return segmentation.summary_table(report), json.dumps(report, indent=2) + "\n"
  groups = {g: instances.INSTANCE_GROUPS[g] for g in _GROUPS.value}
  report = instances.compare_instance_files(_PRED.value, _REF.value, groups, iou_threshold=_IOU_THRESHOLD.value,
                                            with_assd=_ASSD.value)
  as_csv = bool(_OUTPUT.value) and pathlib.Path(_OUTPUT.value).suffix.lower() == ".csv"
  text = instances.report_csv(report) if as_csv else json.dumps(report, indent=2) + "\n"
  return instances.summary_table(report), text


def main(argv) -> None:
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: python -m {PROGRAM} {{{'|'.join(COMMANDS)}}} --pred=P --ref=R [--output=F]"
                         + (f"; unexpected {' '.join(argv[1:])!r}" if len(argv) > 1 else ""))
  if not _PRED.value or not _REF.value:
    raise app.UsageError(f"{argv[1]} needs --pred and --ref")
  output = _output_path()
  try:
    table, text = _report(argv[1])
  except nifti.NiftiError as e:
    raise SystemExit(f"error: {e}") from None
  print(table)
  if output is None:
    print(text, end="")
    return
  nifti.atomic_write_text(output, text)
  print(f"report -> {output}")


if __name__ == "__main__":
  cli.run(main, PROGRAM)

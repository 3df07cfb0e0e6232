"""Entry point for checkpoint inference.

  python -m spine_jax.predict ct --checkpoint=RUN_DIR --image=ct.nii.gz --mask=vertebrae.nii.gz \
      --scheme=totalsegmentator --output=OUT_DIR
  python -m spine_jax.predict ct --checkpoint=RUN_DIR --pairs=scans.csv --scheme=spineps --output=OUT_DIR

`ct` classifies every labelled vertebra of a CT (bone quality, posterolateral involvement, partial
SINS) and writes <name>_vertebrae.json and .csv. With --pairs (a CSV with columns image,mask), each
scan is done in turn; a failing scan is reported and the others go on.
"""
from __future__ import annotations

import csv
import pathlib
import sys

from absl import app
from absl import flags
from absl import logging

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training work directory or checkpoint folder.")
_IMAGE = flags.DEFINE_string("image", None, "CT NIfTI in Hounsfield units.")
_MASK = flags.DEFINE_string("mask", None, "Vertebra label NIfTI on the CT's grid.")
_PAIRS = flags.DEFINE_string("pairs", None, "CSV with columns image,mask (paths relative to the CSV).")
_SCHEME = flags.DEFINE_enum("scheme", "spineps", ["spineps", "totalsegmentator"], "Label numbering of the mask.")
_LABELS = flags.DEFINE_list("labels", None, "Only these mask labels (default: every vertebra label).")
_OUTPUT = flags.DEFINE_string("output", None, "Output folder.")
_NAME = flags.DEFINE_string("name", None, "Output name stem (default: the image file's name).")

COMMANDS = ("ct",)


def _stem(path: pathlib.Path) -> str:
  name = path.name
  for suffix in (".nii.gz", ".nii"):
    if name.endswith(suffix):
      return name[: -len(suffix)]
  return path.stem


def _read_pairs(path: str) -> list[tuple[pathlib.Path, pathlib.Path]]:
  base = pathlib.Path(path).parent
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    if not reader.fieldnames or not {"image", "mask"} <= set(reader.fieldnames):
      raise app.UsageError(f"{path}: needs the columns image,mask (found {reader.fieldnames})")
    pairs = [(base / r["image"], base / r["mask"]) for r in reader]
  if not pairs:
    raise app.UsageError(f"{path}: no rows")
  return pairs


def run_ct() -> int:
  from spine_jax.inference import vertebrae
  from spine_jax.reports import vertebra_report

  if not _CHECKPOINT.value or not _OUTPUT.value:
    raise app.UsageError("ct needs --checkpoint and --output")
  if _PAIRS.value:
    pairs = _read_pairs(_PAIRS.value)
  elif _IMAGE.value and _MASK.value:
    pairs = [(pathlib.Path(_IMAGE.value), pathlib.Path(_MASK.value))]
  else:
    raise app.UsageError("ct needs --image and --mask, or --pairs")
  state, config, mesh = vertebrae.load_classifier(_CHECKPOINT.value)
  failures = []
  for i, (image, mask) in enumerate(pairs, 1):
    name = _NAME.value if (_NAME.value and len(pairs) == 1) else _stem(image)
    try:
      rows = vertebrae.classify_ct(state, config, mesh, image, mask, scheme=_SCHEME.value, labels=_LABELS.value)
      meta = {"image": str(image), "mask": str(mask), "scheme": _SCHEME.value,
              "checkpoint": str(pathlib.Path(_CHECKPOINT.value).absolute()),
              "classes": {"quality": list(vertebrae.QUALITY_NAMES),
                          "posterolateral": list(vertebrae.POSTEROLATERAL_NAMES)}}
      json_path, csv_path = vertebra_report.write_reports(rows, meta, _OUTPUT.value, name)
      print(f"[{i}/{len(pairs)}] {image}: {len(rows)} vertebrae -> {json_path}, {csv_path}", flush=True)
      for row in rows:
        sins_total = row.get("sins", {}).get("partial_total") if row.get("sins") else None
        print(f"    {row['level']:>4} (label {row['label']}): {row.get('quality', '-'):8s} "
              f"posterolateral {row.get('posterolateral', '-'):10s} partial SINS "
              f"{'-' if sins_total is None else sins_total}  [{row['num_slices']} slices]"
              + (f"  ERROR {row['error']}" if "error" in row else ""), flush=True)
    except (ValueError, OSError) as e:  # NiftiError, SliceError, LevelError are ValueErrors
      failures.append((image, e))
      print(f"[{i}/{len(pairs)}] FAILED {image}: {e}", file=sys.stderr, flush=True)
  if failures:
    print(f"{len(failures)} of {len(pairs)} scan(s) failed:", file=sys.stderr)
    for image, e in failures:
      print(f"  {image}: {e}", file=sys.stderr)
    return 1
  return 0


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: python -m spine_jax.predict {{{'|'.join(COMMANDS)}}} --flags (got {argv[1:]})")
  logging.set_verbosity(logging.WARNING)
  return {"ct": run_ct}[argv[1]]()


if __name__ == "__main__":
  app.run(main)

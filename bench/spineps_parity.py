"""The same weights through SPINEPS 2.1.3 and through spine_jax, on the same scans: masks compared, times measured.

  python bench/spineps_parity.py --semantic_checkpoint=RUN --instance_checkpoint=RUN --output=DIR \
      [--phantoms=2] [--no_n4]

1. The two models are exported as SPINEPS model folders (`convert export_spineps`) and converted back
   (`convert spineps`), so spine_jax runs them with the settings it reads from SPINEPS folders.
2. Scans: phantoms written in PIR, LPS and RAS (one set with 3.3 mm sagittal slices) and the real T2w MRI
   that the TPTBox wheel ships.
3. `spineps sample` (in SPINEPS' own environment, scripts/spineps_env.sh; CPU; no crop model; no labelling
   model) and `python -m spine_jax.predict spine`, each timed as a whole command per scan set.
4. Per scan: Dice of every semantic structure present in either mask, and per vertebra id the Dice of that
   id in both instance masks (so a different numbering shows as low Dice). Written to DIR/parity.json and
   printed as a table.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import time

import nibabel as nib
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spine_jax.conversion import export_spineps  # noqa: E402
from spine_jax.conversion import spineps  # noqa: E402
from spine_jax.data import nifti  # noqa: E402
from spine_jax.data import spine_labels  # noqa: E402
from spine_jax.data.phantoms import mri  # noqa: E402
from tests import spineps_oracle  # noqa: E402

ORIENTATIONS = (("P", "I", "R"), ("L", "P", "S"), ("R", "A", "S"))


def write_scans(folder: pathlib.Path, phantoms: int) -> list[pathlib.Path]:
  """Phantom T2w scans in three orientations (and 3.3 mm slices in LPS) plus the TPTBox MRI."""
  scans = []
  for k, codes in enumerate(ORIENTATIONS):
    written = mri.write_mri_phantom_nifti(folder / "tmp", phantoms, 100 + k, axcodes=codes,
                                          name=f"{''.join(codes).lower()}")
    scans += [pathlib.Path(v["image"]) for v in written["volumes"]]
  thick = mri.default_mri_phantom_config()
  thick.spacing_mm = (0.75, 0.75, 3.3)
  written = mri.write_mri_phantom_nifti(folder / "tmp", phantoms, 200, axcodes=("L", "P", "S"), cfg=thick,
                                        name="thick")
  scans += [pathlib.Path(v["image"]) for v in written["volumes"]]
  real = spineps_oracle.call("worker.test_mri", {})
  nifti.atomic_save_nifti(real["image"], real["affine"], folder / "tmp" / "sub-tptbox_T2w.nii.gz")
  scans.append(folder / "tmp" / "sub-tptbox_T2w.nii.gz")
  out = []
  for scan in scans:  # one folder per scan: SPINEPS writes its derivatives beside the input
    target = folder / scan.name.replace("_T2w.nii.gz", "") / scan.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(scan, target)
    out.append(target)
  shutil.rmtree(folder / "tmp")
  return out


def run_spineps(scans, models: pathlib.Path, n4: bool) -> float:
  start = time.perf_counter()
  for scan in scans:
    args = ["sample", "-i", str(scan), "-ms", str(models / "semantic"), "-mi", str(models / "instance"),
            "-ml", "none", "--cpu", "--no-crop"] + ([] if n4 else ["--no-n4"])
    done = spineps_oracle.run_cli(args)
    (scan.parent / "spineps.log").write_text(done.stdout + done.stderr)
  return time.perf_counter() - start


def run_spine_jax(folder: pathlib.Path, bundles: pathlib.Path, output: pathlib.Path, n4: bool) -> float:
  """One `predict spine` over the folder of scans (one start-up and compilation for all, as a user runs it)."""
  start = time.perf_counter()
  done = subprocess.run([sys.executable, "-m", "spine_jax.predict", "spine",
                         f"--semantic_checkpoint={bundles / 'semantic'}",
                         f"--instance_checkpoint={bundles / 'instance'}", f"--input={folder}", f"--output={output}",
                         "--overwrite"] + ([] if n4 else ["--no_n4"]), capture_output=True, text=True, cwd=ROOT)
  output.mkdir(parents=True, exist_ok=True)
  (output / "predict.log").write_text(done.stdout + done.stderr)
  return time.perf_counter() - start


def _load(path):
  return np.asarray(nib.load(str(path)).dataobj).astype(np.int64) if path else None


def dice(a: np.ndarray, b: np.ndarray) -> float:
  total = a.sum() + b.sum()
  return float(2 * np.logical_and(a, b).sum() / total) if total else float("nan")


def compare(scan: pathlib.Path, ours_dir: pathlib.Path) -> dict:
  theirs = {kind: next(iter(sorted(scan.parent.rglob(f"*seg-{kind}_msk.nii.gz"))), None) for kind in ("spine", "vert")}
  ours = {kind: next(iter(sorted(ours_dir.rglob(f"*seg-{kind}_msk.nii.gz"))), None) for kind in ("spine", "vert")}
  row = {"scan": scan.parent.name}
  for kind in ("spine", "vert"):
    a, b = _load(theirs[kind]), _load(ours[kind])
    if a is None or b is None:
      row[kind] = {"missing": [side for side, m in (("spineps", a), ("spine_jax", b)) if m is None]}
      continue
    if a.shape != b.shape:
      row[kind] = {"shape": [list(a.shape), list(b.shape)]}
      continue
    ids = sorted((set(np.unique(a)) | set(np.unique(b))) - {0})
    names = (lambda i: spine_labels.structure_name(i)) if kind == "spine" else str
    row[kind] = {names(i): round(dice(a == i, b == i), 4) for i in ids}
  return row


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--semantic_checkpoint", required=True)
  parser.add_argument("--instance_checkpoint", required=True)
  parser.add_argument("--output", required=True)
  parser.add_argument("--phantoms", type=int, default=2, help="phantoms per orientation")
  parser.add_argument("--no_n4", action="store_true", help="run SPINEPS without its N4 bias-field correction")
  args = parser.parse_args()
  reason = spineps_oracle.available()
  if reason:
    print(f"error: {reason}", file=sys.stderr)
    return 1
  out = pathlib.Path(args.output).absolute()
  if out.exists():
    shutil.rmtree(out)
  export_spineps.export_pair(out / "models", semantic_checkpoint=args.semantic_checkpoint,
                             instance_checkpoint=args.instance_checkpoint)
  spineps.convert_pair(out / "bundles", semantic_folder=out / "models" / "semantic",
                       instance_folder=out / "models" / "instance", trust_pickle=True)
  scans = write_scans(out / "scans", args.phantoms)
  # spine_jax first: its batch run searches the scans' folder, where SPINEPS then writes its derivatives.
  times = {"spine_jax_s": run_spine_jax(out / "scans", out / "bundles", out / "spine_jax", n4=not args.no_n4),
           "spineps_s": run_spineps(scans, out / "models", not args.no_n4)}
  rows = [compare(scan, out / "spine_jax" / scan.parent.name) for scan in scans]
  report = {"scans": len(scans), "n4": not args.no_n4, **times, "rows": rows}
  (out / "parity.json").write_text(json.dumps(report, indent=2))
  print(f"{len(scans)} scans; SPINEPS {times['spineps_s']:.1f} s, spine_jax {times['spine_jax_s']:.1f} s "
        f"(ratio {times['spine_jax_s'] / times['spineps_s']:.2f})")
  for row in rows:
    for kind in ("spine", "vert"):
      scores = row[kind]
      finite = [v for v in scores.values() if isinstance(v, float) and v == v]
      summary = f"min {min(finite):.3f} mean {np.mean(finite):.3f}" if finite else json.dumps(scores)
      print(f"  {row['scan']:28s} {kind:5s} {summary}  {json.dumps(scores)[:200]}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

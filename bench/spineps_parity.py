"""The same weights through SPINEPS 2.1.3 and through spine_jax, on the same scans: masks compared, times measured.

  python bench/spineps_parity.py --semantic_checkpoint=RUN --instance_checkpoint=RUN --output=DIR \
      [--phantoms=2] [--no_n4]

1. The two models are exported as SPINEPS model folders (`convert export_spineps`) and converted back twice
   (`convert spineps`): as a user gets them (spine_jax's corrections of SPINEPS' defects on) and with
   `--spineps_defects` (SPINEPS' float16 window weights and its abort on an empty couple kept).
2. Scans: phantoms written in PIR, LPS and RAS (one set with 3.3 mm sagittal slices) and the real T2w MRI
   that the TPTBox wheel ships.
3. `python -m spine_jax.predict spine` over the scans' folder with each pair of bundles (one command each,
   as a user runs a batch), then SPINEPS in its own environment: `spineps sample ... -ml none --cpu --no-crop`
   per scan, in one process that loads the models once (tests/spineps_worker.py `timed_samples`).
4. Per scan: Dice of every semantic structure present in either mask, and per vertebra id the Dice of that
   id in both instance masks (so a different numbering shows as low Dice), for both spine_jax runs. Times:
   each side's whole run, and per step (spine_jax's from the centroid JSON's `seconds`, SPINEPS' from its
   seg_run.py steps). Written to DIR/parity.json and printed as tables.
"""
from __future__ import annotations

import argparse
import json
import os
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


def run_spineps(scans, models: pathlib.Path, n4: bool) -> dict:
  """SPINEPS on every scan in one process: {total_s, startup_s, steps: {step: seconds summed over scans}, errors}."""
  start = time.perf_counter()
  out = spineps_oracle.call("worker.timed_samples", {}, _timeout=6 * 3600, scans=[str(s) for s in scans],
                            semantic=str(models / "semantic"), instance=str(models / "instance"), n4=n4)
  total = time.perf_counter() - start
  steps = {}
  for key, value in out.items():
    index, _, step = key.partition("/")
    if step.endswith("_s") and step != "total_s":
      steps[step[:-2]] = steps.get(step[:-2], 0.0) + float(value)
  errors = {scans[int(k.partition("/")[0])].parent.name: str(v) for k, v in out.items()
            if k.endswith("/errcode") and not str(v).endswith(("OK", "ALL_DONE"))}
  return {"total_s": total, "startup_s": float(out["startup_s"]), "steps": steps, "errors": errors}


def run_spine_jax(folder: pathlib.Path, bundles: pathlib.Path, output: pathlib.Path, n4: bool,
                  cache: pathlib.Path) -> dict:
  """One `predict spine` over the folder of scans (one start-up and compilation for all, as a user runs it):
  {total_s, steps: {step: seconds summed over scans from the centroid JSONs}}. `cache` is its compilation
  cache: the first run fills it (cold), the second reads it (warm, as every later run of a user)."""
  start = time.perf_counter()
  done = subprocess.run([sys.executable, "-m", "spine_jax.predict", "spine",
                         f"--semantic_checkpoint={bundles / 'semantic'}",
                         f"--instance_checkpoint={bundles / 'instance'}", f"--input={folder}", f"--output={output}",
                         "--overwrite"] + ([] if n4 else ["--no_n4"]), capture_output=True, text=True, cwd=ROOT,
                        env={**os.environ, "SPINE_JAX_CACHE_DIR": str(cache)})
  total = time.perf_counter() - start
  output.mkdir(parents=True, exist_ok=True)
  (output / "predict.log").write_text(done.stdout + done.stderr)
  steps: dict[str, float] = {}
  for path in output.rglob("*_ctd.json"):
    for step, value in json.loads(path.read_text()).get("seconds", {}).items():
      steps[step] = steps.get(step, 0.0) + float(value)
  return {"total_s": total, "returncode": done.returncode, "steps": steps}


# Steps of the two pipelines that do the same work (spine_jax's resampling to the model grid is in its
# preprocess, SPINEPS' in its semantic step, so the two are compared together).
PHASES = {"phase 1 (N4, resampling, network, clean-up)": (("preprocess", "semantic_network", "semantic_cleanup"),
                                                          ("preprocess", "semantic")),
          "phase 2 (instances)": (("instance",), ("instance",)),
          "joint post-processing": (("postprocess",), ("postprocess",)),
          "centroids": (("centroids",), ("centroids",))}


def phase_table(ours: dict, theirs: dict) -> list[dict]:
  rows = []
  for phase, (our_steps, their_steps) in PHASES.items():
    a = sum(ours["steps"].get(s, 0.0) for s in our_steps)
    b = sum(theirs["steps"].get(s, 0.0) for s in their_steps)
    rows.append({"phase": phase, "spine_jax_s": round(a, 1), "spineps_s": round(b, 1),
                 "ratio": round(a / b, 2) if b else None})
  a, b = ours["total_s"], theirs["total_s"]
  rows.append({"phase": "whole run (start-up, compilation, files included)", "spine_jax_s": round(a, 1),
               "spineps_s": round(b, 1), "ratio": round(a / b, 2)})
  return rows


def _load(path):
  return np.asarray(nib.load(str(path)).dataobj).astype(np.int64) if path else None


def dice(a: np.ndarray, b: np.ndarray) -> float:
  total = a.sum() + b.sum()
  return float(2 * np.logical_and(a, b).sum() / total) if total else float("nan")


def compare(scan: pathlib.Path, ours_dir: pathlib.Path) -> dict:
  theirs = {kind: next(iter(sorted(scan.parent.rglob(f"*seg-{kind}_msk.nii.gz"))), None) for kind in ("spine", "vert")}
  ours = {kind: next(iter(sorted(ours_dir.rglob(f"*seg-{kind}_msk.nii.gz"))), None) for kind in ("spine", "vert")}
  row = {}
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


def _summary(scores: dict) -> str:
  finite = [v for v in scores.values() if isinstance(v, float) and v == v]
  if not finite:
    return json.dumps(scores)
  worst = min(scores, key=lambda k: scores[k] if isinstance(scores[k], float) and scores[k] == scores[k] else 2)
  return f"{np.mean(finite):.4f} / {min(finite):.4f} ({worst})"


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
  spineps.convert_pair(out / "bundles_spineps_defects", semantic_folder=out / "models" / "semantic",
                       instance_folder=out / "models" / "instance", trust_pickle=True, spineps_defects=True)
  scans = write_scans(out / "scans", args.phantoms)
  n4 = not args.no_n4
  # spine_jax first: its batch run searches the scans' folder, where SPINEPS then writes its derivatives.
  # The first run compiles into an empty cache; the second (the same networks) reads it.
  runs = {"spine_jax": run_spine_jax(out / "scans", out / "bundles", out / "spine_jax", n4, out / "xla_cache"),
          "spine_jax_defects": run_spine_jax(out / "scans", out / "bundles_spineps_defects",
                                             out / "spine_jax_defects", n4, out / "xla_cache")}
  theirs = run_spineps(scans, out / "models", n4)
  rows = [{"scan": scan.parent.name, **{name: compare(scan, out / name / scan.parent.name) for name in runs}}
          for scan in scans]
  phases = phase_table(runs["spine_jax"], theirs)
  report = {"scans": len(scans), "n4": n4, "spineps": theirs, **runs, "phases": phases, "rows": rows}
  (out / "parity.json").write_text(json.dumps(report, indent=2))
  print(f"{len(scans)} scans, N4 {'on' if n4 else 'off'}; Dice of each structure / vertebra id, mean / worst:")
  print("| scan | semantic | instances | semantic, --spineps_defects | instances, --spineps_defects |")
  print("|---|---|---|---|---|")
  for row in rows:
    cells = [_summary(row[name][kind]) for name in runs for kind in ("spine", "vert")]
    print(f"| {row['scan']} | " + " | ".join(cells) + " |")
  print("\n| step | spine_jax s | SPINEPS s | spine_jax / SPINEPS |\n|---|---|---|---|")
  for r in phases:
    print(f"| {r['phase']} | {r['spine_jax_s']} | {r['spineps_s']} | {r['ratio']} |")
  warm = runs["spine_jax_defects"]["total_s"]
  print(f"SPINEPS start-up (imports, models) {theirs['startup_s']:.1f} s; the --spineps_defects run (compilation "
        f"cache warm) {warm:.1f} s, {warm / theirs['total_s']:.2f} x SPINEPS; SPINEPS errors: {theirs['errors'] or 'none'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

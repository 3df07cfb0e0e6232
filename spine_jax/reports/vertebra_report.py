"""Per-vertebra CT reports as JSON and CSV, written atomically."""
from __future__ import annotations

import csv
import io
import json
import pathlib

from spine_jax.data import nifti

CSV_COLUMNS = ("label", "level", "num_slices", "quality", "p_normal", "p_blastic", "p_mixed", "p_lytic",
               "posterolateral", "p_none", "p_unilateral", "p_bilateral", "sins_location", "sins_bone_lesion",
               "sins_posterolateral", "sins_partial_total", "sins_total_min", "sins_total_max",
               "sins_category_range", "error")


def flat_row(row: dict) -> dict:
  """One CSV line of a vertebra's report."""
  out = {k: row.get(k, "") for k in ("label", "level", "num_slices", "quality", "posterolateral", "error")}
  for name, p in row.get("quality_probs", {}).items():
    out[f"p_{name}"] = f"{p:.4f}"
  for name, p in row.get("posterolateral_probs", {}).items():
    out[f"p_{name}"] = f"{p:.4f}"
  s = row.get("sins")
  if s:
    comp = s["components"]
    out.update(sins_location=comp["location"], sins_bone_lesion=_blank(comp["bone_lesion"]),
               sins_posterolateral=comp["posterolateral"], sins_partial_total=_blank(s["partial_total"]),
               sins_total_min=_blank(s["total_range"] and s["total_range"][0]),
               sins_total_max=_blank(s["total_range"] and s["total_range"][1]),
               sins_category_range="/".join(s["category_range"]))
  return out


def _blank(v):
  return "" if v is None else v


def write_reports(rows: list[dict], meta: dict, out_dir, name: str) -> tuple[pathlib.Path, pathlib.Path]:
  """<name>_bone_quality.json (meta + rows) and <name>_bone_quality.csv in out_dir."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  json_path = out_dir / f"{name}_bone_quality.json"
  csv_path = out_dir / f"{name}_bone_quality.csv"
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
  writer.writeheader()
  for row in rows:
    writer.writerow(flat_row(row))
  nifti.atomic_write_text(json_path, json.dumps({**meta, "vertebrae": rows}, indent=2))
  nifti.atomic_write_text(csv_path, buf.getvalue())
  return json_path, csv_path

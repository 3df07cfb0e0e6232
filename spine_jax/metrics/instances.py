"""Instance metrics of masks with SPINEPS instance ids: per-vertebra Dice and ASSD, detection, panoptic quality.

Ids fall in groups scored apart, since a disc never stands for a vertebra: vertebrae 1..99
(1-25 C1-L6, 26 sacrum, 28 T13), discs 100..199 (100 + the vertebra above), endplates 200..299.

Predicted and reference instances are paired two ways:
- by label: id X against id X. Segmentation and numbering are scored together: a vertebra drawn
  perfectly but numbered one level off scores 0 twice (X missed, X + 1 invented). This is what a
  reader of levels gets.
- by overlap: the one-to-one pairing with the largest summed Dice over overlapping pairs
  (Hungarian, `scipy.optimize.linear_sum_assignment`), ids ignored. This scores how well the
  instances are separated and drawn, whatever their numbers (the paper's instance-wise Dice when
  the numbering is right, where the two agree).
Each pairing lists every instance of either mask once; an unpaired one scores Dice 0 and ASSD
inf (null in JSON). `mean_dice` averages over that list, `mean_assd_mm` over the finite ASSDs.
Dice and ASSD are `metrics.segmentation`'s, on the pair's bounding box (which changes nothing).

Detection: a prediction detects a reference instance when their IoU exceeds 0.5; such pairs are
one-to-one by construction (an instance cannot cover more than half of two disjoint others).
TP, FP (unpaired predictions), FN (missed references) give precision, recall and F1, and
panoptic quality PQ = sum of TP IoUs / (TP + FP / 2 + FN / 2) = SQ (mean TP IoU) x RQ
(TP / (TP + FP / 2 + FN / 2)). Empty cases give NaN (null), never a made-up 0 or 1.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import math
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage
from scipy import optimize

from spine_jax.data import levels as levels_lib
from spine_jax.data import nifti
from spine_jax.metrics import segmentation as seg_metrics
from spine_jax.metrics.classification import nan_to_none

INSTANCE_GROUPS = {'vertebrae': (1, 99), 'discs': (100, 199), 'endplates': (200, 299)}  # inclusive id ranges
# Every id a SPINEPS instance mask can hold: a vertebra X, the disc below it 100 + X, its endplate 200 + X.
KNOWN_INSTANCE_IDS = frozenset(offset + v for v in levels_lib.scheme_labels('spineps') for offset in (0, 100, 200))
CSV_COLUMNS = ('group', 'pairing', 'ref_id', 'pred_id', 'name', 'dice', 'iou', 'assd_mm', 'ref_voxels', 'pred_voxels')


@dataclasses.dataclass(frozen=True)
class OverlapTable:
  """Instance ids of both masks, their sizes and every pairwise intersection (voxels)."""
  pred_ids: np.ndarray  # (P,)
  ref_ids: np.ndarray  # (R,)
  pred_sizes: np.ndarray  # (P,)
  ref_sizes: np.ndarray  # (R,)
  intersection: np.ndarray  # (P, R)

  def dice(self) -> np.ndarray:
    total = self.pred_sizes[:, None] + self.ref_sizes[None, :]
    return np.divide(2.0 * self.intersection, total, out=np.zeros(total.shape), where=total > 0)

  def iou(self) -> np.ndarray:
    union = self.pred_sizes[:, None] + self.ref_sizes[None, :] - self.intersection
    return np.divide(self.intersection, union, out=np.zeros(union.shape), where=union > 0)


def _in_group(mask: np.ndarray, id_range) -> np.ndarray:
  lo, hi = id_range
  return np.where((mask >= lo) & (mask <= hi), mask, 0).astype(np.int64)


def overlap_table(pred: np.ndarray, ref: np.ndarray, id_range=(1, 99)) -> OverlapTable:
  """The `OverlapTable` of the instances with ids in `id_range` (inclusive), in one pass over the foreground."""
  pred, ref = seg_metrics.same_shape(pred, ref)
  p, r = _in_group(pred, id_range), _in_group(ref, id_range)
  pred_ids = np.unique(p[p > 0])
  ref_ids = np.unique(r[r > 0])
  fg = (p > 0) | (r > 0)
  base = int(max(r.max(initial=0), 0)) + 1
  keys, counts = np.unique(p[fg] * base + r[fg], return_counts=True)
  intersection = np.zeros((len(pred_ids), len(ref_ids)), np.int64)
  pred_index = {int(v): i for i, v in enumerate(pred_ids)}
  ref_index = {int(v): i for i, v in enumerate(ref_ids)}
  for key, count in zip(keys.tolist(), counts.tolist()):
    pv, rv = divmod(key, base)
    if pv and rv:
      intersection[pred_index[pv], ref_index[rv]] = count
  pred_sizes = np.bincount(p[fg])[pred_ids].astype(np.int64)
  ref_sizes = np.bincount(r[fg])[ref_ids].astype(np.int64)
  return OverlapTable(pred_ids, ref_ids, pred_sizes, ref_sizes, intersection)


def match_by_label(table: OverlapTable) -> list[tuple[int | None, int | None]]:
  """(pred id, ref id) pairs of equal ids, then unpaired predictions (ref None) and references (pred None)."""
  pred, ref = set(table.pred_ids.tolist()), set(table.ref_ids.tolist())
  return ([(v, v) for v in sorted(pred & ref)] + [(v, None) for v in sorted(pred - ref)]
          + [(None, v) for v in sorted(ref - pred)])


def match_by_overlap(table: OverlapTable) -> list[tuple[int | None, int | None]]:
  """The one-to-one pairing of overlapping instances with the largest summed Dice, then the unpaired."""
  pairs = []
  if table.intersection.size:
    dice = table.dice()
    rows, cols = optimize.linear_sum_assignment(dice, maximize=True)
    pairs = [(int(table.pred_ids[i]), int(table.ref_ids[j])) for i, j in zip(rows, cols) if dice[i, j] > 0]
  paired_pred, paired_ref = {p for p, _ in pairs}, {r for _, r in pairs}
  pairs.sort(key=lambda pair: pair[1])
  return (pairs + [(int(v), None) for v in table.pred_ids if int(v) not in paired_pred]
          + [(None, int(v)) for v in table.ref_ids if int(v) not in paired_ref])


def detection(table: OverlapTable, iou_threshold: float = 0.5) -> dict:
  """TP / FP / FN at IoU > `iou_threshold` (>= 0.5 keeps pairs one-to-one), precision, recall, F1."""
  if iou_threshold < 0.5:
    raise ValueError(f'iou_threshold below 0.5 ({iou_threshold}) can pair one instance twice')
  iou = table.iou()
  tp = int(np.count_nonzero(iou > iou_threshold))
  fp, fn = len(table.pred_ids) - tp, len(table.ref_ids) - tp
  return {'iou_threshold': float(iou_threshold), 'tp': tp, 'fp': fp, 'fn': fn,
          'precision': tp / (tp + fp) if tp + fp else math.nan,
          'recall': tp / (tp + fn) if tp + fn else math.nan,
          'f1': 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan}


def panoptic_quality(table: OverlapTable, iou_threshold: float = 0.5) -> dict:
  """PQ, SQ (mean IoU of the detected pairs) and RQ (F1 of detection): PQ = SQ x RQ."""
  counts = detection(table, iou_threshold)
  iou = table.iou()
  matched = iou[iou > iou_threshold]
  denominator = counts['tp'] + 0.5 * counts['fp'] + 0.5 * counts['fn']
  return {'pq': float(matched.sum() / denominator) if denominator else math.nan,
          'sq': float(matched.mean()) if matched.size else math.nan,
          'rq': counts['tp'] / denominator if denominator else math.nan}


def instance_name(value: int | None) -> str | None:
  """'L1' for a vertebra, 'disc_L1' for the disc below L1, 'endplate_L1'; 'id_<n>' without a level."""
  if value is None:
    return None
  group, level = ('', value) if value < 100 else (('disc_', value - 100) if value < 200 else ('endplate_', value - 200))
  try:
    return group + levels_lib.label_to_level(level, 'spineps')
  except levels_lib.LevelError:
    return f'id_{value}'


def _boxes(mask: np.ndarray) -> list:
  return ndimage.find_objects(np.where(mask > 0, mask, 0).astype(np.int64)) if mask.any() else []


def _union_box(a, b) -> tuple:
  if a is None:
    return b
  if b is None:
    return a
  return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


def score_pairs(pred: np.ndarray, ref: np.ndarray, pairs, spacing, table: OverlapTable, *,
                with_assd: bool = True) -> dict:
  """{mean_dice, mean_assd_mm, instances: [one row per pair or unpaired instance]} of a pairing."""
  pred_boxes, ref_boxes = _boxes(pred), _boxes(ref)
  iou = table.iou()
  pred_index = {int(v): i for i, v in enumerate(table.pred_ids)}
  ref_index = {int(v): i for i, v in enumerate(table.ref_ids)}
  rows = []
  for p, r in pairs:
    pb = pred_boxes[p - 1] if p is not None else None
    rb = ref_boxes[r - 1] if r is not None else None
    box = _union_box(pb, rb)
    pm = pred[box] == p if p is not None else np.zeros(ref[box].shape, bool)
    rm = ref[box] == r if r is not None else np.zeros(pm.shape, bool)
    rows.append({
        'ref_id': r, 'pred_id': p, 'name': instance_name(r if r is not None else p),
        'dice': seg_metrics.dice(pm, rm),
        'iou': float(iou[pred_index[p], ref_index[r]]) if p is not None and r is not None else 0.0,
        'assd_mm': seg_metrics.assd(pm, rm, spacing) if with_assd else math.nan,
        'ref_voxels': int(table.ref_sizes[ref_index[r]]) if r is not None else 0,
        'pred_voxels': int(table.pred_sizes[pred_index[p]]) if p is not None else 0,
    })
  return {'mean_dice': seg_metrics.nanmean(row['dice'] for row in rows),
          'mean_assd_mm': seg_metrics.nanmean(row['assd_mm'] for row in rows),
          'instances': rows}


def instance_report(pred: np.ndarray, ref: np.ndarray, spacing, groups: Mapping[str, Sequence[int]] | None = None, *,
                    iou_threshold: float = 0.5, with_assd: bool = True) -> dict:
  """JSON-safe report per id group: pairings by label and by overlap, detection, panoptic quality.

  `groups` maps a name to an inclusive id range (default `INSTANCE_GROUPS`); NaN and inf become
  null. `with_assd=False` skips the surface distances (the slow part on large masks).
  """
  pred, ref = seg_metrics.same_shape(pred, ref)
  pred, ref = pred.astype(np.int64), ref.astype(np.int64)
  spacing = [float(s) for s in spacing]
  report = {'shape': list(pred.shape), 'spacing_mm': spacing, 'groups': {}}
  for name, id_range in (groups if groups is not None else INSTANCE_GROUPS).items():
    table = overlap_table(pred, ref, tuple(id_range))
    p, r = _in_group(pred, id_range), _in_group(ref, id_range)
    report['groups'][name] = {
        'id_range': [int(v) for v in id_range],
        'pred_ids': table.pred_ids.tolist(), 'ref_ids': table.ref_ids.tolist(),
        'by_label': score_pairs(p, r, match_by_label(table), spacing, table, with_assd=with_assd),
        'by_overlap': score_pairs(p, r, match_by_overlap(table), spacing, table, with_assd=with_assd),
        'detection': detection(table, iou_threshold),
        'panoptic': panoptic_quality(table, iou_threshold),
    }
  return nan_to_none(report)


def compare_instance_files(pred_path, ref_path, groups=None, *, iou_threshold: float = 0.5,
                           with_assd: bool = True) -> dict:
  """Load two instance NIfTIs on the same grid (checked, as `evaluate seg`) and return their `instance_report`."""
  pred, pred_affine, _ = nifti.load_mask(pred_path)
  ref, ref_affine, _ = nifti.load_mask(ref_path)
  nifti.check_same_grid(pred_path, pred_affine, pred.shape, ref_path, ref_affine, ref.shape)
  for path, mask in ((pred_path, pred), (ref_path, ref)):
    seg_metrics.check_known_labels(mask, KNOWN_INSTANCE_IDS, path,
                                   'SPINEPS instance ids (vertebrae 1-28, discs 100 + X, endplates 200 + X)')
  report = instance_report(pred, ref, nifti.spacing_from_affine(pred_affine), groups, iou_threshold=iou_threshold,
                           with_assd=with_assd)
  return {'pred': str(pred_path), 'ref': str(ref_path), **report}


def report_rows(report: dict) -> list[dict]:
  """One flat row per group, pairing and instance (the CSV's rows)."""
  rows = []
  for group, entry in report['groups'].items():
    for pairing in ('by_label', 'by_overlap'):
      for row in entry[pairing]['instances']:
        rows.append({'group': group, 'pairing': pairing[3:], **row})
  return rows


def report_csv(report: dict) -> str:
  buffer = io.StringIO(newline='')
  writer = csv.DictWriter(buffer, fieldnames=list(CSV_COLUMNS), lineterminator='\n')
  writer.writeheader()
  for row in report_rows(report):
    writer.writerow({k: '' if row.get(k) is None else row[k] for k in CSV_COLUMNS})
  return buffer.getvalue()


def summary_table(report: dict) -> str:
  """The console table of a report."""
  def cell(value, digits):
    return '-' if value is None else f'{value:.{digits}f}'
  lines = [f"{'group':10s} {'n_ref':>5s} {'n_pred':>6s} {'dice_id':>7s} {'dice_ov':>7s} {'assd_mm':>7s} "
           f"{'prec':>5s} {'recall':>6s} {'f1':>5s} {'pq':>5s}"]
  for name, g in report['groups'].items():
    d, pq = g['detection'], g['panoptic']
    lines.append(f"{name:10s} {len(g['ref_ids']):5d} {len(g['pred_ids']):6d} {cell(g['by_label']['mean_dice'], 3):>7s} "
                 f"{cell(g['by_overlap']['mean_dice'], 3):>7s} {cell(g['by_overlap']['mean_assd_mm'], 2):>7s} "
                 f"{cell(d['precision'], 2):>5s} {cell(d['recall'], 2):>6s} {cell(d['f1'], 2):>5s} "
                 f"{cell(pq['pq'], 3):>5s}")
  return '\n'.join(lines)

"""Segmentation metrics of the SPINEPS paper: Dice per label, global Dice, ASSD in mm.

Conventions:
- Dice of a label absent from both masks is NaN (nothing to score), never 1 or 0; means skip NaN.
- Surfaces are the mask minus its 6-connected erosion, with the outside of the array counted as
  background, so a structure cut by the field of view has a surface there.
- ASSD (average symmetric surface distance) = (sum of each pred-surface voxel's distance to the
  nearest ref-surface voxel + the same from ref to pred) / (number of surface voxels of both), in
  mm with per-axis spacing. It is NaN when both masks are empty and inf when only one is (the
  structure was missed or invented: no finite distance describes that). JSON reports turn NaN and
  inf into null; their voxel counts say which case it was.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from spine_jax.data import nifti
from spine_jax.data import spine_labels
from spine_jax.metrics.classification import nan_to_none

# Merged structures of the paper's global Dice: the whole vertebra (its subregions and endplates),
# the discs, the canal with the cord inside it.
SEMANTIC_GROUPS = {
    'vertebrae': (41, 42, 43, 44, 45, 46, 47, 48, 49, 62),
    'discs': (100,),
    'spinal_canal': (60, 61),
}


def dice(pred_mask: np.ndarray, ref_mask: np.ndarray) -> float:
  """2|P & R| / (|P| + |R|) of two binary masks; NaN when both are empty."""
  pred_mask, ref_mask = np.asarray(pred_mask, bool), np.asarray(ref_mask, bool)
  total = int(np.count_nonzero(pred_mask)) + int(np.count_nonzero(ref_mask))
  if total == 0:
    return math.nan
  return 2.0 * int(np.count_nonzero(pred_mask & ref_mask)) / total


def finite_mean(values) -> float | None:
  """Mean of the finite values (None and NaN, e.g. structures absent from both masks, are skipped);
  None when there are none: what a report averages over volumes or structures."""
  vals = [v for v in values if v is not None and np.isfinite(v)]
  return float(np.mean(vals)) if vals else None


def format_score(v) -> str:
  return "n/a" if v is None else f"{v:.3f}"


def dice_per_label(pred: np.ndarray, ref: np.ndarray, labels: Sequence[int]) -> dict[int, float]:
  """{label: Dice of pred == label vs ref == label}; NaN for a label in neither mask."""
  pred, ref = same_shape(pred, ref)
  return {int(label): dice(pred == label, ref == label) for label in labels}


def global_dice(pred: np.ndarray, ref: np.ndarray, labels: Sequence[int]) -> float:
  """Dice of the union of `labels` in each mask (e.g. all vertebra subregions as one structure)."""
  pred, ref = same_shape(pred, ref)
  return dice(np.isin(pred, labels), np.isin(ref, labels))


def nanmean(values) -> float:
  """Mean of the finite values (NaN and inf skipped); NaN when there are none."""
  finite = [float(v) for v in values if v is not None and math.isfinite(v)]
  return float(np.mean(finite)) if finite else math.nan


def same_shape(pred, ref) -> tuple[np.ndarray, np.ndarray]:
  """(pred, ref) as arrays; a ValueError naming both shapes when they differ."""
  pred, ref = np.asarray(pred), np.asarray(ref)
  if pred.shape != ref.shape:
    raise ValueError(f'prediction shape {pred.shape} differs from reference shape {ref.shape}')
  return pred, ref


def surface(mask: np.ndarray) -> np.ndarray:
  """Voxels of the mask with a 6-neighbour outside it (the array's outside counts as background)."""
  mask = np.asarray(mask, bool)
  return mask & ~ndimage.binary_erosion(mask, ndimage.generate_binary_structure(mask.ndim, 1), border_value=0)


def surface_distances(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
  """(pred surface -> nearest ref surface, ref surface -> nearest pred surface) distances in mm.

  Against an empty mask every distance is inf. Work is confined to the bounding box of both
  masks, which changes nothing: all surface voxels lie inside it, and beyond it is background.
  """
  pred_mask, ref_mask = same_shape(np.asarray(pred_mask, bool), np.asarray(ref_mask, bool))
  spacing = np.asarray(spacing, np.float64)
  if spacing.shape != (pred_mask.ndim,) or np.any(spacing <= 0):
    raise ValueError(f'spacing must give one positive size per axis, got {spacing.tolist()}')
  box = ndimage.find_objects((pred_mask | ref_mask).astype(np.int8))
  if not box:
    return np.zeros(0), np.zeros(0)
  pred_surface, ref_surface = surface(pred_mask[box[0]]), surface(ref_mask[box[0]])

  def to(target, source):
    if not source.any():
      return np.zeros(0)
    if not target.any():
      return np.full(int(np.count_nonzero(source)), np.inf)
    return ndimage.distance_transform_edt(~target, sampling=spacing)[source]
  return to(ref_surface, pred_surface), to(pred_surface, ref_surface)


def assd(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing) -> float:
  """Average symmetric surface distance (mm): NaN if both masks are empty, inf if only one is."""
  pred_to_ref, ref_to_pred = surface_distances(pred_mask, ref_mask, spacing)
  count = pred_to_ref.size + ref_to_pred.size
  if count == 0:
    return math.nan
  return float((pred_to_ref.sum() + ref_to_pred.sum()) / count)


def assd_per_label(pred: np.ndarray, ref: np.ndarray, spacing, labels: Sequence[int]) -> dict[int, float]:
  """{label: ASSD (mm) of pred == label vs ref == label}."""
  pred, ref = same_shape(pred, ref)
  return {int(label): assd(pred == label, ref == label, spacing) for label in labels}


def check_known_labels(mask: np.ndarray, known, path, what: str) -> None:
  """Raise NiftiError naming `path` when `mask` holds labels outside `known` (an image given as a mask,
  or a mask of another kind): listing at most a few of them, and how many there are."""
  present = np.unique(mask)
  unknown = np.setdiff1d(present, np.asarray(sorted(set(int(k) for k in known) | {0})))
  if unknown.size:
    shown = ', '.join(str(int(v)) for v in unknown[:8]) + (', ...' if unknown.size > 8 else '')
    raise nifti.NiftiError(f'{path}: {unknown.size} label value(s) ({shown}) are not {what}; is it an image or '
                           f'a mask of another kind?')


def segmentation_report(pred: np.ndarray, ref: np.ndarray, spacing, label_names: Mapping[int, str],
                        groups: Mapping[str, Sequence[int]] | None = None) -> dict:
  """JSON-safe report: per-label Dice, ASSD and voxel counts, their means, and grouped (global) Dice.

  `label_names` maps each scored label id to its name. 'mean_dice' averages the labels present in
  either mask; 'mean_assd_mm' the labels present in both (finite ASSD). NaN and inf become null.
  """
  pred, ref = same_shape(pred, ref)
  spacing = [float(s) for s in spacing]
  labels = [int(label) for label in label_names]
  dices = dice_per_label(pred, ref, labels)
  assds = assd_per_label(pred, ref, spacing, labels)
  per_label = {
      str(label_names[label]): {
          'label': label, 'dice': dices[label], 'assd_mm': assds[label],
          'pred_voxels': int(np.count_nonzero(pred == label)), 'ref_voxels': int(np.count_nonzero(ref == label)),
      } for label in labels}
  report = {
      'shape': list(pred.shape),
      'spacing_mm': spacing,
      'labels': per_label,
      'mean_dice': nanmean(dices.values()),
      'mean_assd_mm': nanmean(assds.values()),
      'groups': {name: {'labels': [int(v) for v in members], 'dice': global_dice(pred, ref, list(members))}
                 for name, members in (groups or {}).items()},
  }
  return nan_to_none(report)


def compare_files(pred_path, ref_path, labels: Sequence[int] | None = None,
                  label_names: Mapping[int, str] | None = None,
                  groups: Mapping[str, Sequence[int]] | None = None) -> dict:
  """Load two label NIfTIs on the same grid (checked) and return their `segmentation_report`.

  `labels` defaults to every non-zero label in either file, which must then be SPINEPS semantic ids
  (or named in `label_names`): an image given as a mask is refused. Names default to
  `spine_labels.structure_name`, `groups` to the SPINEPS semantic groups that contain a scored label.
  """
  pred, pred_affine, _ = nifti.load_mask(pred_path)
  ref, ref_affine, _ = nifti.load_mask(ref_path)
  nifti.check_same_grid(pred_path, pred_affine, pred.shape, ref_path, ref_affine, ref.shape)
  if labels is None:
    known = set(label_names or {}) | set(spine_labels.STRUCTURE_NAMES)
    for path, mask in ((pred_path, pred), (ref_path, ref)):
      check_known_labels(mask, known, path, 'SPINEPS semantic ids (pass --labels to score other ids)')
    labels = sorted((set(np.unique(pred).tolist()) | set(np.unique(ref).tolist())) - {0})
  labels = [int(label) for label in labels]
  names = {label: (label_names or {}).get(label, spine_labels.structure_name(label)) for label in labels}
  if groups is None:
    groups = {name: members for name, members in SEMANTIC_GROUPS.items() if set(members) & set(labels)}
  report = segmentation_report(pred, ref, nifti.spacing_from_affine(pred_affine), names, groups)
  return {'pred': str(pred_path), 'ref': str(ref_path), **report}



def summary_table(report: dict) -> str:
  """The console table of a report."""
  def cell(value, digits):
    return '-' if value is None else f'{value:.{digits}f}'
  lines = [f"{'structure':28s} {'label':>5s} {'dice':>6s} {'assd_mm':>8s}"]
  for name, row in report['labels'].items():
    lines.append(f"{name:28s} {row['label']:5d} {cell(row['dice'], 3):>6s} {cell(row['assd_mm'], 2):>8s}")
  lines.append(f"{'mean':28s} {'':5s} {cell(report['mean_dice'], 3):>6s} {cell(report['mean_assd_mm'], 2):>8s}")
  for name, group in report['groups'].items():
    lines.append(f"{'global ' + name:28s} {'':5s} {cell(group['dice'], 3):>6s}")
  return '\n'.join(lines)

"""CT vertebrae: slice predictions from a train state and the slice -> vertebra decisions.

Shared by the final evaluation of training and by checkpoint inference on users' scans, so both
score slices and decide vertebrae the same way.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from spine_jax.data import pipelines
from spine_jax.data.classes import POSTEROLATERAL_CLASSES, QUALITY_CLASSES
from spine_jax.engine import predict as predict_lib
from spine_jax.metrics import classification



def predict_slices(predict, images: np.ndarray, *, in_channels: int, batch_size: int) -> dict[str, np.ndarray]:
  """Probabilities for every slice of `images` (N, H, W), batched and un-padded."""
  chunks: dict[str, list] = {}
  for batch, n in pipelines.eval_batches({"image": images}, ("image",), batch_size):
    for k, v in predict(pipelines.model_input(batch["image"], in_channels)).items():
      chunks.setdefault(k, []).append(np.asarray(v)[:n])
  return {k: np.concatenate(v) for k, v in chunks.items()}


def vertebra_decisions(probs: dict[str, np.ndarray], vertebra_ids: np.ndarray, eval_cfg) -> dict[str, np.ndarray]:
  """Per-vertebra classes (and mean slice probabilities) from per-slice probabilities."""
  out: dict[str, np.ndarray] = {}
  ids = np.unique(vertebra_ids)
  out["vertebra"] = ids
  if "quality" in probs:
    got_ids, dec = classification.vertebra_quality_decision(
        probs["quality"].argmax(-1), vertebra_ids, eval_cfg.normal_fraction, eval_cfg.dominant_share)
    assert np.array_equal(got_ids, ids)
    out["quality"] = dec
    out["quality_probs"] = np.stack([probs["quality"][vertebra_ids == v].mean(0) for v in ids])
  if "posterolateral" in probs:
    got_ids, dec = classification.vertebra_posterolateral_decision(
        probs["posterolateral"].argmax(-1), vertebra_ids, eval_cfg.posterolateral_min_fraction)
    assert np.array_equal(got_ids, ids)
    out["posterolateral"] = dec
    out["posterolateral_probs"] = np.stack([probs["posterolateral"][vertebra_ids == v].mean(0) for v in ids])
  return out


def load_bone_quality(checkpoint, mesh=None):
  """(state, config, mesh) of a CT classifier from a training work directory or checkpoint folder."""
  from spine_jax.inference import restore
  return restore.load_for_inference(checkpoint, "bone_quality", mesh)


class CTClassification(NamedTuple):
  """`classify_ct`'s result: a report per vertebra, and the mask's labels that name no vertebra of the
  scheme (TotalSegmentator's organs, SPINEPS' discs and endplates), which were not classified."""
  vertebrae: list[dict]
  ignored_labels: list[int]


def classify_ct(state, config, mesh, image_path, mask_path, *, scheme: str, labels=None) -> CTClassification:
  """Every labelled vertebra of a CT (or those in `labels`): bone quality, posterolateral involvement, SINS.

  The CT and its mask are checked to share a grid and taken to RAS; each vertebra's axial slices are
  cut exactly as in training, classified, and decided by the slice -> vertebra rules of config.eval.
  A mask whose labels imply the other numbering scheme is refused (`levels.split_mask_labels`).
  """
  from spine_jax.data import levels as levels_lib
  from spine_jax.data import nifti
  from spine_jax.data import slices as slices_lib
  from spine_jax.reports import sins

  scan = nifti.load_image_and_mask(image_path, mask_path)
  present = [int(v) for v in np.unique(scan.mask) if v != 0]
  known, ignored = levels_lib.split_mask_labels(present, scheme, source=f"mask {mask_path}")
  if labels:
    wanted = [int(v) for v in labels]
    missing = [v for v in wanted if v not in present]
    if missing:
      raise slices_lib.SliceError(f"mask {mask_path}: label(s) {missing} are absent (present: {present})")
    not_vertebrae = [v for v in wanted if v not in known]
    if not_vertebrae:
      raise slices_lib.SliceError(f"mask {mask_path}: label(s) {not_vertebrae} name no vertebra in the {scheme!r} "
                                  f"numbering (its vertebra labels present: {known})")
    ignored = sorted(set(present) - set(wanted))
  else:
    wanted = known
    if not wanted:
      raise slices_lib.SliceError(f"mask {mask_path}: no vertebra label of the {scheme!r} numbering "
                                  f"(labels present: {present})")
  wanted = sorted(wanted, key=lambda v: levels_lib.level_index(levels_lib.label_to_level(v, scheme)))
  predict = predict_lib.classifier_predict_fn(state, mesh)
  rows = []
  for label in wanted:
    level = levels_lib.label_to_level(label, scheme)
    try:
      images, z = slices_lib.extract_vertebra_slices(scan.image, scan.mask, label, scan.spacing, config.data.slices)
    except slices_lib.SliceError as e:
      rows.append({"label": label, "level": level, "num_slices": 0, "error": str(e)})
      continue
    probs = predict_slices(predict, images, in_channels=config.data.in_channels, batch_size=config.eval.batch_size)
    decided = vertebra_decisions(probs, np.zeros(len(images), np.int64), config.eval)
    row = {"label": label, "level": level, "num_slices": int(len(images)),
           "slice_range_ras": [int(z.min()), int(z.max())]}
    q = pl = None
    if "quality" in decided:
      q = int(decided["quality"][0])
      row["quality"] = QUALITY_CLASSES[q]
      row["quality_probs"] = dict(zip(QUALITY_CLASSES, map(float, decided["quality_probs"][0])))
      row["slice_quality_counts"] = dict(zip(QUALITY_CLASSES, map(int, np.bincount(
          probs["quality"].argmax(-1), minlength=4))))
    if "posterolateral" in decided:
      pl = int(decided["posterolateral"][0])
      row["posterolateral"] = POSTEROLATERAL_CLASSES[pl]
      row["posterolateral_probs"] = dict(zip(POSTEROLATERAL_CLASSES, map(float, decided["posterolateral_probs"][0])))
    if q is not None and pl is not None:
      row["sins"] = sins.partial_sins(level, q, pl)
    rows.append(row)
  return CTClassification(rows, ignored)

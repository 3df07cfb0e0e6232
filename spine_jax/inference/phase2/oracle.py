"""A stand-in for the instance network from a reference instance map: what the network would mark
in each cutout were it perfect (tests, and the ceiling of what phase 2 can reach).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from spine_jax.data import spatial
from spine_jax.inference.phase2 import centres as centres_lib
from spine_jax.inference.phase2.common import (ABOVE, BELOW, CENTRE, DISC_OFFSET, INFERIOR_AXIS, VERTEBRA_LABELS,
                                               centres_of_mass)
from spine_jax.inference.phase2.cutouts import cutout, relabel_for_instance


def _reference_order(semantic: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, list[int]]:
  """(reference vertebra ids on semantic 41..49, else 0; those ids top to bottom by centre of mass along I)."""
  reference = np.asarray(reference)
  vertebrae = np.where((reference > 0) & (reference < DISC_OFFSET), reference, 0).astype(np.int64)
  sizes, centres = centres_of_mass(vertebrae)
  present = np.flatnonzero(sizes[1:]) + 1
  order = [int(v) for v in present[np.argsort(centres[present, INFERIOR_AXIS], kind='stable')]]
  return np.where(np.isin(semantic, VERTEBRA_LABELS), vertebrae, 0), order


def reference_cutout_classes(semantic: np.ndarray, reference: np.ndarray, centre, size, *, _order=None) -> np.ndarray:
  """What a perfect network answers for one cutout (classes 0..3, uint8), from a reference instance map.

  The vertebra at the centre voxel of `reference`, and the vertebrae before and after it in the
  reference's top-to-bottom order (centres of mass along I; ids under 100), each over its voxels
  labelled 41..49 in `semantic` (what the network sees). Nothing when the centre is no vertebra.
  """
  seen, order = _order if _order is not None else _reference_order(semantic, reference)
  out = np.zeros(tuple(int(s) for s in size), np.uint8)
  own = int(np.asarray(reference)[tuple(np.asarray(centre, np.int64))])
  if own not in order:
    return out
  at = order.index(own)
  seen = cutout(seen, centre, size)
  for position, k in ((ABOVE, at - 1), (CENTRE, at), (BELOW, at + 1)):
    if 0 <= k < len(order):
      out[seen == order[k]] = position
  return out


def oracle_predict_fn(semantic: np.ndarray, reference: np.ndarray, centres, size) -> Callable:
  """A `predict_fn` that answers from a reference instance map: phase 2 with a perfect network.

  It knows the cutouts around `centres` (`reference_cutout_classes` for each) and recognises
  each input by its content, so batch order and padding do not matter; an unknown non-empty
  cutout is an error. Gives the ceiling of consolidation and labelling, and a test double.
  Returns (N, P, I, R) integer classes.
  """
  semantic = np.asarray(semantic)
  size = tuple(int(s) for s in size)
  classes = relabel_for_instance(semantic)
  order = _reference_order(semantic, reference)
  known = {}
  for centre in np.asarray(centres, np.int64).reshape(-1, 3):
    key = cutout(classes, centre, size).tobytes()
    known.setdefault(key, reference_cutout_classes(semantic, reference, centre, size, _order=order))

  def predict(batch):
    batch = np.asarray(batch)
    out = np.zeros(batch.shape[:4], np.uint8)
    for k, item in enumerate(batch):
      if not item.any():
        continue  # batch padding
      key = item.argmax(-1).astype(np.uint8).tobytes()
      if key not in known:
        raise KeyError('oracle_predict_fn: a cutout around none of its centres')
      out[k] = known[key]
    return out
  return predict


def oracle_for_scan(semantic: np.ndarray, affine: np.ndarray, reference: np.ndarray, config) -> Callable:
  """`oracle_predict_fn` for an instance model's `config` on a scan: the semantic and reference masks (one
  grid, `affine`) go into the config's model space, where the body centres are found as phase 2 finds them."""
  prep, cfg = config.data.preprocess, config.inference
  model_semantic, space = spatial.mask_to_model_space(semantic, affine, axcodes=tuple(prep.axcodes),
                                                      spacing=tuple(prep.spacing), grid=spatial.grid_of(prep))
  centres, _ = centres_lib.vertebral_body_centres(model_semantic, space.model_spacing, erosion=int(cfg.body_erosion),
                                                  min_voxels=cfg.min_body_voxels)
  return oracle_predict_fn(model_semantic, spatial.apply_model_space(reference, space, is_mask=True), centres,
                           tuple(cfg.cutout_size))

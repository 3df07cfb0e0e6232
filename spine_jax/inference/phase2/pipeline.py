"""Phase 2 as one call (`segment_instances`: centres, cutouts, consolidation, labelling; `instance_mask`: the
raw instances in either mode) and its summary for `*_seg-spine_ctd.json` (`centroids`).
"""
from __future__ import annotations

from typing import Callable

import ml_collections
import numpy as np

from spine_jax.data import levels as levels_lib
from spine_jax.data import spine_labels
from spine_jax.inference.phase2 import spineps_instances
from spine_jax.inference.phase2.common import (DISC_OFFSET, ENDPLATE_OFFSET, PHASE2_MODES, REFERENCE_SPACING,
                                               SPINE_JAX_MODE, SPINEPS_MODE, centres_of_mass, check_mask,
                                               default_instance_config, note, scaled_voxel_count)
from spine_jax.inference.phase2.centres import vertebral_body_centres
from spine_jax.inference.phase2.consolidation import consolidate
from spine_jax.inference.phase2.cutouts import CutoutMask, predict_cutouts
from spine_jax.inference.phase2.labelling import label_spine


def segment_instances(semantic: np.ndarray, predict_fn: Callable, cfg: ml_collections.ConfigDict | None = None, *,
                      spacing=REFERENCE_SPACING) -> tuple[np.ndarray, list[str]]:
  """SPINEPS phase 2 on a PIR model-space semantic mask: (instance mask int16 with SPINEPS ids, messages).

  `predict_fn` is the instance network as `predict_cutouts` calls it; `cfg` as
  `default_instance_config` (its voxel thresholds are at the reference spacing and scaled to
  `spacing`, the mask's own; `phase2_mode` picks whose rules make the raw instances, `instance_mask`).
  With no vertebral body the result has no vertebra (only the sacrum, if any) and a message says why.
  """
  cfg = cfg if cfg is not None else default_instance_config()
  semantic = check_mask(semantic, 'semantic mask')
  instances, messages = instance_mask(semantic, predict_fn, cfg, spacing=spacing)
  out, more = label_spine(instances, semantic, first_vertebra=cfg.first_vertebra, endplate_owner=cfg.endplate_owner,
                          reassign_articular=bool(cfg.reassign_articular), assign_missing=bool(cfg.assign_missing))
  return out, messages + more


def instance_mask(semantic: np.ndarray, predict_fn: Callable, cfg: ml_collections.ConfigDict, *,
                  spacing=REFERENCE_SPACING) -> tuple[np.ndarray, list[str]]:
  """The raw instance mask before labelling (int32, 1..n in merge order) and messages, by `cfg.phase2_mode`:
  'spine_jax' (centres, cutouts, consolidation here) or 'spineps' (`spineps_instances.instance_mask`)."""
  mode = cfg.get('phase2_mode', SPINE_JAX_MODE)
  if mode == SPINEPS_MODE:
    found = spineps_instances.instance_mask(
        semantic, predict_fn, spacing, cutout_size=tuple(cfg.cutout_size), batch_size=int(cfg.batch_size),
        min_body_voxels=cfg.min_body_voxels, min_instance_voxels=cfg.min_instance_voxels,
        detect_merged=bool(cfg.detect_merged_bodies), fill_holes=bool(cfg.fill_holes),
        abort_on_empty_couple=bool(cfg.get('abort_on_empty_couple', False)))
    return found.instances, found.messages
  if mode != SPINE_JAX_MODE:
    raise ValueError(f'inference.phase2_mode {mode!r}: expected one of {PHASE2_MODES}')
  centres, messages = vertebral_body_centres(
      semantic, spacing, erosion=int(cfg.body_erosion), min_voxels=cfg.min_body_voxels,
      detect_merged=bool(cfg.detect_merged_bodies), duplicate_distance=cfg.duplicate_distance,
      merged_ratio=cfg.merged_ratio, merged_window=int(cfg.merged_window),
      max_split_erosions=int(cfg.max_split_erosions), edge_bodies=bool(cfg.get('edge_bodies', True)))
  instances = np.zeros(semantic.shape, np.int32)
  if len(centres):
    predictions = predict_cutouts(predict_fn, semantic, centres, tuple(cfg.cutout_size), int(cfg.batch_size))
    for centre, (_, middle, _) in zip(centres, predictions):
      if middle is None or not _covers(middle, centre):
        note(messages, f'the cutout at {tuple(int(c) for c in centre)} does not mark its own centre as its vertebra')
    instances, more = consolidate(
        predictions, semantic.shape, couple_dice=cfg.couple_dice, neighbour_range=int(cfg.neighbour_range),
        vote_agreement=cfg.vote_agreement, max_taken=cfg.max_taken,
        min_instance_voxels=scaled_voxel_count(cfg.min_instance_voxels, spacing), fill_holes=bool(cfg.fill_holes))
    messages += more
  return instances, messages


def _covers(mask: CutoutMask, point) -> bool:
  local = [int(p) - b.start for p, b in zip(point, mask.box)]
  return all(0 <= q < n for q, n in zip(local, mask.mask.shape)) and bool(mask.mask[tuple(local)])


def _level(vertebra_id: int) -> str | None:
  try:
    return levels_lib.label_to_level(vertebra_id, 'spineps')
  except levels_lib.LevelError:
    return None


def centroids(instance_mask: np.ndarray, semantic: np.ndarray, affine: np.ndarray) -> dict:
  """JSON-ready centroids (world mm through `affine`) for `<name>_seg-spine_ctd.json`.

  {'coordinate_system', 'vertebrae': {id: {level, voxels, centroid_mm, structures: {semantic
  name: centroid_mm}}}, 'discs': {id: {above_level, ...}}, 'endplates': {id: {level, ...}}},
  ids as strings. A vertebra's centroid is that of its voxels (arch and body, not its discs or
  endplates); its structures are the semantic labels inside it (vertebra_corpus, ...).
  """
  instance_mask = check_mask(instance_mask, 'instance mask')
  semantic = check_mask(semantic, 'semantic mask')
  if instance_mask.shape != semantic.shape:
    raise ValueError(f'instance mask shape {instance_mask.shape} differs from semantic mask shape {semantic.shape}')
  affine = np.asarray(affine, np.float64)
  if affine.shape != (4, 4):
    raise ValueError(f'affine must be 4 x 4, got {affine.shape}')

  def world(point) -> list[float]:
    return [round(float(v), 3) for v in affine[:3, :3] @ np.asarray(point, np.float64) + affine[:3, 3]]

  ids = instance_mask.astype(np.int64)
  sizes, centres = centres_of_mass(ids)
  keyed = np.where(ids > 0, ids * 256 + np.clip(semantic, 0, 255), 0)
  flat = np.flatnonzero(keyed)
  keys, inverse = np.unique(keyed.ravel()[flat], return_inverse=True)
  coords = np.unravel_index(flat, ids.shape)
  key_sizes = np.bincount(inverse)
  key_centres = np.stack([np.bincount(inverse, weights=c) for c in coords], axis=-1) / key_sizes[:, None]
  structures: dict[int, dict] = {}
  for key, centre in zip(keys, key_centres):
    structures.setdefault(int(key) // 256, {})[spine_labels.structure_name(int(key) % 256)] = world(centre)

  out = {'coordinate_system': 'world (RAS+) mm of voxel centres, through the mask affine',
         'vertebrae': {}, 'discs': {}, 'endplates': {}}
  for value in np.flatnonzero(sizes[1:]) + 1:
    value = int(value)
    entry = {'voxels': int(sizes[value]), 'centroid_mm': world(centres[value])}
    if value < DISC_OFFSET:
      out['vertebrae'][str(value)] = {'level': _level(value), **entry, 'structures': structures.get(value, {})}
    elif value < ENDPLATE_OFFSET:
      out['discs'][str(value)] = {'above_level': _level(value - DISC_OFFSET), **entry}
    else:
      out['endplates'][str(value)] = {'level': _level(value - ENDPLATE_OFFSET), **entry}
  return out

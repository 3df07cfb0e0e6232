"""Phase 3: name every vertebra of a numbered instance mask with the labelling network and the level path
(SPINEPS 2.1.3 `phase_labeling.perform_labeling_step`).

The instances arrive numbered by position (phase 2). Each vertebra's patch (data/labeling_patches.py, SPINEPS'
cut) goes through the network; the heads' softmaxes, top to bottom, go to the level path
(`level_path.solve`), which gives one SPINEPS id per vertebra. With a semantic mask holding the dens, the
instance it overlaps by more than 250 mm³ is pinned to C2 and the one above to C1 (unless C1 is disabled). As
SPINEPS: an instance the network saw no patch of is deleted, except the topmost, which becomes C1 when the path
named C2 and no C1. `relabel` then carries the names to the discs (100 + X) and endplates (200 + X).

Two rules of ours, off for SPINEPS' models:
- `inference.sacrum_anchor`: the lowest vertebra, when it (with its disc and endplates) lies within
  SACRUM_CONTACT_MM of the semantic mask's sacrum, is the last lumbar vertebra (L5, or L6), as a radiologist counts
  from the sacrum. SPINEPS pins only C2 by the dens.
- `inference.name_edge_vertebrae`: a vertebra at the field's top or bottom edge without a patch (no corpus in the
  semantic mask, or one too thin to survive the patch zoom) is named by counting on from its nearest named
  neighbour (`edge_level`) instead of being deleted: a sliver of T1 under a named C7 is T1.

A labelling bundle's config says how: `data` (patch size, zoom, crop margin, corpus masking, rotation: the
training sampler's fields), `model.heads`, and `inference` (`default_inference_config`: the path's weights and
switches, the batch size).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import ml_collections
import numpy as np
from scipy import ndimage

from spine_jax.data import labeling_patches as lp
from spine_jax.data import level_classes
from spine_jax.data import levels as levels_lib
from spine_jax.data import nifti
from spine_jax.data import spatial
from spine_jax.data import spineps_preprocess
from spine_jax.data.spine_labels import DISC_OFFSET, ENDPLATE_OFFSET, SACRUM
from spine_jax.inference.phase3 import level_path

NETWORK_METHOD = 'labelling network and level path'
C1_ID = levels_lib.level_to_label('C1', 'spineps')
C2_ID = levels_lib.level_to_label('C2', 'spineps')
# A vertebra rests on the sacrum when it, its disc or its endplates come this close to the sacrum (voxel centres):
# the L5/S1 disc touches the sacrum; the vertebra above L5 stays a whole body height (> 20 mm) away.
SACRUM_CONTACT_MM = 8.0


def default_inference_config() -> ml_collections.ConfigDict:
  """`level_path.PathOptions`' fields with their defaults (SPINEPS' `find_vert_path_from_predictions`), but the
  forced indices (per scan), the number of patches per network call, and our two rules (the sacrum anchor, edge
  vertebrae named from their neighbour; off as in SPINEPS)."""
  fields = {f.name: f.default for f in dataclasses.fields(level_path.PathOptions) if not f.name.startswith('force_')}
  return ml_collections.ConfigDict({**fields, 'batch_size': 8, 'sacrum_anchor': False, 'name_edge_vertebrae': False})


@dataclasses.dataclass(frozen=True)
class NamingSpec:
  """What phase 3 needs from a labelling bundle's config."""
  heads: tuple[tuple[str, int], ...]
  patch_size: tuple[int, int, int]
  zoom: tuple[float, float, float]
  zoom_range: tuple[tuple[float, ...], tuple[float, ...]] | None  # SPINEPS' (min, max) resolution_range
  crop_margin_mm: float
  corpus_masked: bool
  rotate: bool
  batch_size: int
  options: level_path.PathOptions
  sacrum_anchor: bool = False
  name_edge_vertebrae: bool = False


def spec_of(config) -> NamingSpec:
  """A labelling config's NamingSpec; HeadError for heads the path cannot read, ValueError for a bad field."""
  data = config.data
  path_fields = {f.name for f in dataclasses.fields(level_path.PathOptions)}
  inference = dict(config.get('inference', default_inference_config()))
  options = level_path.PathOptions(**{k: v for k, v in inference.items() if k in path_fields})
  batch_size = int(inference.get('batch_size', 8))
  zoom_range = data.get('zoom_range', None)
  if zoom_range is not None:
    zoom_range = tuple(tuple(float(z) for z in bound) for bound in zoom_range)
  if batch_size < 1:
    raise ValueError(f'inference.batch_size must be at least 1, got {batch_size}')
  return NamingSpec(heads=level_classes.check_heads(config.model.heads),
                    patch_size=lp.check_size(data.patch_size, 'data.patch_size'),
                    zoom=tuple(float(z) for z in data.zoom), zoom_range=zoom_range, crop_margin_mm=float(data.crop_margin_mm),
                    corpus_masked=bool(data.get('corpus_masked', True)), rotate=bool(data.get('rotate', False)),
                    batch_size=batch_size, options=options,
                    sacrum_anchor=bool(inference.get('sacrum_anchor', False)),
                    name_edge_vertebrae=bool(inference.get('name_edge_vertebrae', False)))


@dataclasses.dataclass(frozen=True)
class Naming:
  """Phase 3's result for one scan. `mapping`: instance id -> SPINEPS id (0: deleted); `vertebrae`: per
  instance id its level, SPINEPS id and the heads' probabilities; `cost`: the path's; `method`: how the
  vertebrae were named; `messages`: what a reader should know."""
  mapping: dict[int, int]
  vertebrae: dict[int, dict]
  cost: float | None
  method: str
  messages: tuple[str, ...]

  def report(self) -> dict:
    """The centroid JSON's `labeling` entry."""
    return {'method': self.method, 'path_cost': self.cost,
            'vertebrae': {str(k): v for k, v in self.vertebrae.items()}, 'messages': list(self.messages)}


def patch_zoom(spec: NamingSpec, affine: np.ndarray) -> tuple[float, ...]:
  """The zoom (mm, P, I, R) the scan is rescaled to: the spec's, or with a (min, max) range the scan's own
  spacing clamped into it per axis (SPINEPS' seg_model.py `calc_recommended_resampling_zoom`)."""
  if spec.zoom_range is None:
    return spec.zoom
  _, pir_affine, _ = nifti.reorient(np.zeros((1, 1, 1), np.uint8), affine, spatial.PIR)
  scan = spatial.tptbox_zoom(nifti.spacing_from_affine(pir_affine))
  low, high = spec.zoom_range
  return tuple(float(max(min(s, hi), lo)) for s, lo, hi in zip(scan, low, high))


def rests_on_sacrum(instances: np.ndarray, semantic: np.ndarray, affine: np.ndarray, vertebra: int) -> bool:
  """Whether instance `vertebra`, its disc (100 + X) or its endplates (200 + X) come within SACRUM_CONTACT_MM of
  the semantic mask's sacrum."""
  own = np.isin(instances, (vertebra, DISC_OFFSET + vertebra, ENDPLATE_OFFSET + vertebra))
  if not own.any():
    return False
  spacing = np.asarray(nifti.spacing_from_affine(affine), float)
  reach = np.ceil(SACRUM_CONTACT_MM / spacing).astype(int)
  where = np.nonzero(own)
  box = tuple(slice(max(int(w.min()) - r, 0), int(w.max()) + r + 1) for w, r in zip(where, reach))
  sacrum = np.asarray(semantic)[box] == SACRUM
  if not sacrum.any():
    return False
  distance = ndimage.distance_transform_edt(~sacrum, sampling=spacing)
  return bool(distance[own[box]].min() <= SACRUM_CONTACT_MM)


def edge_level(vertebra: int, present: list[int], mapping: dict[int, int]) -> int:
  """SPINEPS id of a vertebra without a patch that lies above or below every named one (`mapping`: the instances
  the level path named): the standard level as many positions on from the nearest named vertebra as `present`
  (every vertebra instance, top to bottom) puts between them. 0 (delete) between named vertebrae, past C1, at the
  sacrum, or where the path named that level already."""
  named = [v for v in present if mapping.get(v)]
  if not named or named[0] < vertebra < named[-1]:
    return 0
  nearest = named[0] if vertebra < named[0] else named[-1]
  level = levels_lib.neighbour_level(levels_lib.label_to_level(mapping[nearest], 'spineps'),
                                     present.index(vertebra) - present.index(nearest))
  if level is None or levels_lib.level_region(level) == 'sacral':
    return 0
  label = levels_lib.level_to_label(level, 'spineps')
  return 0 if label in mapping.values() else label


def _batched(predict_fn: Callable, patches: np.ndarray, batch_size: int) -> list[dict[str, np.ndarray]]:
  """Per patch {head: softmax} from `predict_fn` on fixed-size batches (one compiled shape; padding dropped)."""
  out = []
  for start in range(0, len(patches), batch_size):
    chunk = patches[start:start + batch_size]
    batch = np.zeros((batch_size, *patches.shape[1:], 1), np.float32)
    batch[:len(chunk), ..., 0] = chunk
    probabilities = predict_fn(batch)
    out += [{h: np.asarray(p[k], np.float32) for h, p in probabilities.items()} for k in range(len(chunk))]
  return out


def name_vertebrae(image: np.ndarray, affine: np.ndarray, instances: np.ndarray, semantic: np.ndarray | None,
                   predict_fn: Callable, spec: NamingSpec) -> Naming:
  """Names the vertebrae (ids 1..28 but the sacrum, numbered top to bottom) of `instances` on `image`'s grid.

  `predict_fn(patches (B, P, I, R, 1) float32) -> {head: (B, classes) softmax}`; `semantic` (same grid) masks
  each instance to its corpus when the spec says so and gives the dens; the scan is cropped to the semantic
  mask's box plus 1.5 mm first (`labeling_patches.spine_crop`), as SPINEPS' joint post-processing does."""
  vertebrae = lp.vertebra_instances(instances)
  present = [int(v) for v in np.unique(vertebrae) if v]
  if not present:
    return Naming({}, {}, None, NETWORK_METHOD, ('no vertebra to name',))
  if semantic is not None and (box := lp.spine_crop(semantic, affine)) is not None:  # as SPINEPS hands it over
    image, instances, semantic = image[box], instances[box], semantic[box]
    affine = spineps_preprocess.crop_affine(affine, box)
  patches = lp.cut_patches(image, affine, instances, semantic if spec.corpus_masked else None,
                           zoom=patch_zoom(spec, affine),
                           patch_size=spec.patch_size, orientation=spatial.PIR, crop_margin_mm=spec.crop_margin_mm,
                           rotate=spec.rotate)
  messages = []
  if not patches.ids:
    return Naming({v: 0 for v in present}, {}, None, NETWORK_METHOD,
                  ('no vertebra has a corpus in the semantic mask: none could be named, all deleted',))
  ids = [int(i) for i in patches.ids]
  options = spec.options
  if semantic is not None:
    dens = [float(patches.dens_volumes_mm3.get(i, 0.0)) for i in ids]
    force_c1, force_c2 = level_path.dens_forced_indices(ids, dens, disable_c1=options.disable_c1)
    if force_c2 is not None:
      options = dataclasses.replace(options, force_c1_index=force_c1, force_c2_index=force_c2)
      messages.append(f'instance {ids[force_c2]} holds the dens: C2')
    last = len(ids) - 1
    if (spec.sacrum_anchor and last not in (options.force_c1_index, options.force_c2_index)
        and rests_on_sacrum(instances, semantic, affine, ids[last])):
      options = dataclasses.replace(options, force_last_lumbar_index=last)
      messages.append(f'instance {ids[last]} rests on the sacrum: the last lumbar vertebra')
  predictions = _batched(predict_fn, patches.patches, spec.batch_size)
  try:
    path = level_path.solve(predictions, options)
  except ValueError as e:  # e.g. more vertebrae than levels: the positions stay
    return Naming({}, {}, None, NETWORK_METHOD, (*messages, f'the level path failed ({e}): numbered by position'))
  by_path = dict(zip(ids, (int(i) for i in path.ids)))
  mapping = dict(by_path)
  named = {}
  for k, i in enumerate(ids):
    named[i] = {'id': mapping[i], 'level': levels_lib.label_to_level(mapping[i], 'spineps'),
                'probabilities': {h: [round(float(x), 6) for x in p] for h, p in path.probabilities[k].items()}}
  for v in (v for v in present if v not in by_path):
    if v == min(present) and not options.disable_c1 and C2_ID in mapping.values() and C1_ID not in mapping.values():
      mapping[v] = C1_ID
      messages.append(f'instance {v} (no patch) above C2: C1')
    elif (spec.name_edge_vertebrae and (label := edge_level(v, present, by_path))
          and label not in mapping.values()):
      mapping[v] = label
      level = levels_lib.label_to_level(label, 'spineps')
      named[v] = {'id': label, 'level': level, 'probabilities': None}
      messages.append(f'instance {v} (no patch) at the edge of the field: {level}, counted on from its neighbour')
    else:
      mapping[v] = 0
      messages.append(f'instance {v} has no patch (no corpus in the semantic mask, or too thin at the patch zoom): '
                      'deleted')
  return Naming(mapping, dict(sorted(named.items())), float(path.cost), NETWORK_METHOD, tuple(messages))


def relabel(instances: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
  """Vertebra X -> mapping[X], its disc 100 + X and endplates 200 + X with it; mapping[X] = 0 deletes all three.
  Ids the mapping does not hold (the sacrum) stay."""
  table = np.arange(max(int(instances.max(initial=0)), ENDPLATE_OFFSET + 99) + 1, dtype=np.int32)
  for old, new in mapping.items():
    table[old] = new
    table[DISC_OFFSET + old] = DISC_OFFSET + new if new else 0
    table[ENDPLATE_OFFSET + old] = ENDPLATE_OFFSET + new if new else 0
  return table[np.asarray(instances, np.int32)].astype(instances.dtype)

"""SPINEPS phase 2 (SPEC section 3, "Phase 2, instance") on PIR model-space arrays.

The semantic mask says what each voxel is (body, arch, disc ...) but not which vertebra it
belongs to. Phase 2 separates the vertebrae:

1. `vertebral_body_centres`: one centre per vertebral body (label 49), bottom to top, with
   fused bodies split and body fragments at one height merged.
2. `predict_cutouts`: a fixed-size block of the relabelled semantic mask around each centre goes
   through the instance network, which marks the vertebra above, the one at the centre and the
   one below. Each vertebra is so seen by up to three cutouts.
3. `consolidate`: those overlapping views are paired by Dice into "couples" and merged by voting
   into one instance map (SPEC's rules, as SPINEPS' `create_prediction_couples` and
   `merge_coupled_predictions`).
4. `label_spine`: the joint post-processing of instances and semantics: vertebra voxels follow
   the semantic mask exactly, vertebrae are numbered top to bottom, the sacrum is 26, disc
   below vertebra X is 100 + X, endplates 200 + X.

`segment_instances` runs all four; `centroids` summarises the result for `*_seg-spine_ctd.json`;
`oracle_predict_fn` stands in for the network from a reference instance map (tests, and the
ceiling of what the network can reach).
Axis 1 (I) points inferior, so a larger axis-1 index is lower in the body. Size and distance
thresholds are voxel counts at the reference spacing (0.75 x 0.75 x 1.65 mm), scaled to the
actual spacing; erosions are in voxels. Functions that can meet a degenerate spine return
`(result, messages)`: each message is also logged as a warning, so callers can show and store them.

Where this differs from the public SPINEPS code: a fused body is cut by nearest seed after
erosion rather than by a fitted plane; body pieces at one height are merged into one centre
(SPINEPS only drops them from its alternation check); uncovered vertebra voxels are grouped
over all vertebra labels at once, not label by label; and there is no labelling network, so
numbering is positional (`label_spine`).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable

import ml_collections
import numpy as np
from scipy import ndimage

from spine_jax.data import levels as levels_lib
from spine_jax.data import spatial
from spine_jax.data import spine_labels
from spine_jax.inference import semantic_postprocess

logger = logging.getLogger(__name__)

SACRUM, BODY, ENDPLATE, DISC = 26, 49, 62, 100
VERTEBRA_LABELS = (41, 42, 43, 44, 45, 46, 47, 48, 49)  # what an instance covers
ARTICULAR_LABELS = (45, 46, 47, 48)
INPUT_CHANNELS = 10  # background, 41..48 -> 1..8, 49 -> 9
OUTPUT_CHANNELS = 4  # background, above, centre, below
ABOVE, CENTRE, BELOW = 1, 2, 3
POSITIONS = ('above', 'centre', 'below')
DISC_OFFSET, ENDPLATE_OFFSET = 100, 200
SACRUM_ID = 26  # instance id of the sacrum (S1)
LAST_LUMBAR_ID = 25  # L6: the last id of a numbering from C1
INFERIOR_AXIS = 1
REFERENCE_SPACING = spatial.REFERENCE_SPACING
ENDPLATE_OWNERS = ('above', 'vertebra')

_FACES = ndimage.generate_binary_structure(3, 1)
_EDGES = ndimage.generate_binary_structure(3, 2)
_CUBE = ndimage.generate_binary_structure(3, 3)


def default_instance_config() -> ml_collections.ConfigDict:
  """Every setting of phase 2; voxel counts and distances are at the reference spacing."""
  cfg = ml_collections.ConfigDict()
  cfg.cutout_size = (248, 304, 64)  # P, I, R voxels (sides divisible by 8 for the network)
  cfg.batch_size = 4
  # Centres.
  cfg.body_erosion = 2  # voxels (18-connected), so touching bodies come apart
  cfg.min_body_voxels = 100  # smaller eroded body components are noise
  cfg.detect_merged_bodies = True
  cfg.duplicate_distance = 10  # voxels along I: body pieces closer than this are one body
  cfg.merged_ratio = 1.5  # a body this much larger than its neighbours' mean is two
  cfg.merged_window = 5  # neighbours: positions within this many in the body/disc sequence
  cfg.max_split_erosions = 10
  cfg.edge_bodies = True  # body slivers cut by the field's edge, gone after erosion, still get a centre
  # Consolidation.
  cfg.couple_dice = 0.3
  cfg.neighbour_range = 2  # cutouts within this many centre indices can form a couple
  cfg.vote_agreement = 0.45  # a 3-member couple with this mean Dice needs 2 votes per voxel
  cfg.max_taken = 0.6  # a couple whose voxels are already labelled beyond this is skipped
  cfg.min_instance_voxels = 250  # smaller 6-connected pieces of an instance are deleted
  cfg.fill_holes = True
  # Labelling (see `label_spine`).
  cfg.first_vertebra = 1
  cfg.endplate_owner = 'above'
  cfg.reassign_articular = True
  cfg.assign_missing = True
  return cfg


def _note(messages: list, text: str) -> None:
  logger.warning(text)
  messages.append(text)


def scaled_voxel_count(count: float, spacing, reference=REFERENCE_SPACING) -> int:
  """A voxel count at `reference` spacing -> the same volume in voxels of `spacing` (at least 1)."""
  ratio = float(np.prod(np.asarray(reference, np.float64)) / np.prod(spatial.check_spacing(spacing)))
  return max(1, int(round(count * ratio)))


def scaled_distance(voxels: float, spacing, axis: int = INFERIOR_AXIS, reference=REFERENCE_SPACING) -> float:
  """A distance in voxels along `axis` at `reference` spacing -> voxels of `spacing`."""
  return float(voxels) * float(reference[axis]) / float(spatial.check_spacing(spacing)[axis])


def _check_mask(array, name: str) -> np.ndarray:
  array = np.asarray(array)
  if array.ndim != 3:
    raise ValueError(f'{name}: expected a 3D (P, I, R) mask, got shape {array.shape}')
  if not np.issubdtype(array.dtype, np.integer):
    raise ValueError(f'{name}: expected integer labels, got dtype {array.dtype}')
  return array


# ---------------------------------------------------------------------------------------------
# Label statistics


def _centres_of_mass(labels: np.ndarray, count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(sizes (n + 1,), centres (n + 1, 3)) of labels 0..n in one pass over the labelled voxels."""
  flat = np.flatnonzero(labels)
  values = labels.ravel()[flat].astype(np.int64)
  n = int(count if count is not None else (values.max() if values.size else 0)) + 1
  sizes = np.bincount(values, minlength=n).astype(np.float64)
  coords = np.unravel_index(flat, labels.shape)
  sums = np.stack([np.bincount(values, weights=c, minlength=n) for c in coords], axis=-1)
  with np.errstate(invalid='ignore', divide='ignore'):
    centres = sums / sizes[:, None]
  return sizes, centres


def _grow(box: tuple, margin: int, shape) -> tuple:
  return tuple(slice(max(0, b.start - margin), min(n, b.stop + margin)) for b, n in zip(box, shape))


# ---------------------------------------------------------------------------------------------
# 1. Vertebral body centres


def split_fused_body(mask: np.ndarray, max_erosions: int = 10, spur_fraction: float = 0.2) -> np.ndarray | None:
  """A body mask that is really two bodies -> labels 1 and 2 over it, or None if it never separates.

  Erodes (26-connected) until the mask falls apart; pieces under `spur_fraction` of the largest
  are corners and spurs that erosion cut off first, so they are dropped and erosion goes on.
  Once two real pieces remain, every voxel of the original mask goes to the nearer of the two
  largest (Euclidean distance): the cut follows the narrowest part of the bridge between them,
  where SPINEPS fits a plane.
  """
  mask = np.asarray(mask, bool)
  box = ndimage.find_objects(mask.astype(np.int8))
  if not box:
    return None
  box = _grow(box[0], 1, mask.shape)
  local = mask[box]
  eroded = local
  for _ in range(int(max_erosions)):
    eroded = ndimage.binary_erosion(eroded, _CUBE)
    pieces, count = ndimage.label(eroded, _CUBE)
    if count == 0:
      return None
    sizes = np.bincount(pieces.ravel())[1:]
    real = np.flatnonzero(sizes >= spur_fraction * sizes.max()) + 1
    if len(real) >= 2:
      two = real[np.argsort(sizes[real - 1])[::-1][:2]]
      seeds = np.zeros(local.shape, np.uint8)
      seeds[pieces == two[0]] = 1
      seeds[pieces == two[1]] = 2
      nearest = ndimage.distance_transform_edt(seeds == 0, return_distances=False, return_indices=True)
      out = np.zeros(mask.shape, np.uint8)
      out[box] = np.where(local, seeds[tuple(nearest)], 0)
      return out
    eroded = np.isin(pieces, real)
  return None


def _body_components(semantic, spacing, erosion: int, min_voxels: int) -> tuple[np.ndarray, int]:
  """Labels of the eroded body's 26-connected components that are at least `min_voxels` large."""
  body = semantic == BODY
  if erosion > 0:
    body = ndimage.binary_erosion(body, _EDGES, iterations=int(erosion))
  components, count = ndimage.label(body, _CUBE)
  if count == 0:
    return components, 0
  keep = np.bincount(components.ravel()) >= scaled_voxel_count(min_voxels, spacing)
  keep[0] = False
  lut = np.zeros(count + 1, np.int32)
  lut[keep] = np.arange(1, int(keep.sum()) + 1)
  return lut[components], int(keep.sum())


def _edge_slivers(semantic, components, count, erosion: int, min_voxels: int) -> tuple[np.ndarray, int]:
  """Adds the body pieces that touch the field's top or bottom and vanished in the erosion as components.

  A vertebra cut by the field of view can leave a body only a voxel or two thick, which the erosion
  (there to part bodies touching across thin discs) removes; it is still a vertebra to find, and
  training centres cutouts on such slivers too. The pieces are what the body loses in an opening
  (erosion, then the kept components grown back), so a sliver stays apart from the whole body next
  to it; pieces that touch a kept body are its rim and stay out."""
  body = semantic == BODY
  kept = components > 0
  if erosion > 0 and count:
    kept = ndimage.binary_dilation(kept, _EDGES, iterations=int(erosion)) & body
  pieces, n = ndimage.label(body & ~kept, _CUBE)
  if n == 0:
    return components, count
  sizes = np.bincount(pieces.ravel(), minlength=n + 1)
  keep = np.zeros(n + 1, bool)
  keep[pieces[:, 0]] = keep[pieces[:, -1]] = True  # the field's top and bottom rows, where it cuts the spine
  keep &= sizes >= min_voxels
  # A piece against a kept body is that body's rim, not a vertebra of its own.
  keep[np.unique(pieces[ndimage.binary_dilation(kept, _CUBE)])] = False
  keep[0] = False
  if not keep.any():
    return components, count
  lut = np.zeros(n + 1, np.int32)
  lut[keep] = np.arange(count + 1, count + 1 + int(keep.sum()))
  components = np.where(components > 0, components, lut[pieces])
  return components, count + int(keep.sum())


def _merge_duplicates(components: np.ndarray, count: int, distance: float, messages: list) -> tuple[np.ndarray, int]:
  """Body pieces whose centres lie closer than `distance` voxels along I are one body (chained)."""
  if count < 2:
    return components, count
  _, centres = _centres_of_mass(components, count)
  heights = centres[1:, INFERIOR_AXIS]
  order = np.argsort(heights, kind='stable')
  lut = np.arange(count + 1)
  group = order[0] + 1
  for prev, cur in zip(order[:-1], order[1:]):
    if heights[cur] - heights[prev] < distance:
      lut[cur + 1] = group
      _note(messages, f'vertebral body pieces at rows {heights[prev]:.0f} and {heights[cur]:.0f} are closer than '
                      f'{distance:.1f} voxels: taken as one body')
    else:
      group = cur + 1
  if np.array_equal(lut, np.arange(count + 1)):
    return components, count
  _, compact = np.unique(lut, return_inverse=True)
  return compact.astype(np.int32)[components], int(compact.max())


def _disc_heights(semantic) -> np.ndarray:
  """Axis-1 centres of the 26-connected pieces of disc and endplate (one piece per disc space)."""
  discs, count = ndimage.label((semantic == DISC) | (semantic == ENDPLATE), _CUBE)
  if count == 0:
    return np.zeros(0)
  return _centres_of_mass(discs, count)[1][1:, INFERIOR_AXIS]


def _alternation_errors(body_heights: np.ndarray, disc_heights: np.ndarray, distance: float):
  """Positions where two bodies or two discs follow each other along I, and the sorted sequence.

  Returns (errors, sequence): sequence is [(height, is_disc, body index or -1)] top to bottom,
  each error the index of the first of two same-kind neighbours. Two discs closer than
  `distance` are one disc in two pieces, not an error.
  """
  sequence = sorted([(float(h), False, i) for i, h in enumerate(body_heights)]
                    + [(float(h), True, -1) for h in disc_heights])
  errors = [k for k in range(len(sequence) - 1)
            if sequence[k][1] == sequence[k + 1][1]
            and not (sequence[k][1] and sequence[k + 1][0] - sequence[k][0] < distance)]
  return errors, sequence


def _fused_candidate(sequence, error: int, sizes: np.ndarray, window: int, ratio: float) -> tuple[int, float] | None:
  """(body index, size / mean of the others) of the largest body near an alternation error, if oversized."""
  lo, hi = max(0, error - window), min(len(sequence), error + 2 + window)
  bodies = [item[2] for item in sequence[lo:hi] if not item[1]]
  if len(bodies) < 4:  # the suspect and at least three others to compare with, as SPINEPS
    return None
  volumes = sizes[bodies]
  big = int(np.argmax(volumes))
  others = np.delete(volumes, big).mean()
  factor = float(volumes[big] / others) if others > 0 else math.inf
  return (bodies[big], factor) if factor > ratio else None


def _split_merged_bodies(components, count, semantic, distance, ratio, window, max_erosions, messages):
  """Find bodies/discs out of alternation and split the oversized body next to each, until none is left."""
  disc_heights = _disc_heights(semantic)
  if disc_heights.size == 0:
    return components, count
  failed, reported = set(), set()
  splits_left = count  # each split adds a body; more than doubling them is no longer repair
  while splits_left > 0:
    sizes, centres = _centres_of_mass(components, count)
    errors, sequence = _alternation_errors(centres[1:, INFERIOR_AXIS], disc_heights, distance)
    split_one = False
    for error in errors:
      found = _fused_candidate(sequence, error, sizes[1:], window, ratio)
      if found is None:
        row = round(sequence[error][0])
        if row not in reported:
          reported.add(row)
          _note(messages, f'vertebral bodies and discs do not alternate near row {sequence[error][0]:.0f}: '
                          'a body or disc is missing or fused')
        continue
      index, factor = found
      label = index + 1
      if label in failed:
        continue
      parts = split_fused_body(components == label, max_erosions)
      row = centres[label, INFERIOR_AXIS]
      if parts is None:
        failed.add(label)
        _note(messages, f'fused vertebral bodies near row {row:.0f} ({factor:.1f}x the size of their neighbours) '
                        'could not be separated: they get one cutout')
        continue
      count += 1
      components[parts == 2] = count
      _note(messages, f'fused vertebral bodies near row {row:.0f} ({factor:.1f}x the size of their neighbours): '
                      'split in two')
      split_one = True
      splits_left -= 1
      break
    if not split_one:
      break
  return components, count


def _inside(component: np.ndarray, centre: np.ndarray) -> np.ndarray:
  """The rounded centre if it lies in the component, else the component's voxel nearest to it."""
  point = np.clip(np.rint(centre).astype(np.int64), 0, np.asarray(component.shape) - 1)
  if component[tuple(point)]:
    return point
  voxels = np.argwhere(component)
  return voxels[np.argmin(((voxels - centre) ** 2).sum(axis=1))]


def vertebral_body_centres(semantic: np.ndarray, spacing=REFERENCE_SPACING, *, erosion: int = 2,
                           min_voxels: int = 100, detect_merged: bool = True, duplicate_distance: float = 10,
                           merged_ratio: float = 1.5, merged_window: int = 5,
                           max_split_erosions: int = 10, edge_bodies: bool = True) -> tuple[np.ndarray, list[str]]:
  """(centres (n, 3) int voxel indices ordered bottom to top, messages) of the vertebral bodies.

  Bodies are the 26-connected components of label 49 after an `erosion`-voxel erosion (which
  parts bodies touching across a thin disc), those under `min_voxels` dropped. Pieces closer than
  `duplicate_distance` voxels along I are merged (one body broken in two). With `detect_merged`,
  bodies and disc spaces (disc plus endplate pieces) must alternate along I; where two of a kind
  follow each other, the largest body within `merged_window` positions that is more than
  `merged_ratio` times the mean of at least three others is split (`split_fused_body`). Each
  centre is the component's centre of mass, moved to the nearest voxel of the component when it
  falls outside. With `edge_bodies`, body slivers at the field's edge that the erosion removed and
  that are at least `min_voxels` large are bodies too (`_edge_slivers`). Sizes and distances are at
  the reference spacing and scaled to `spacing`.
  """
  semantic = _check_mask(semantic, 'semantic mask')
  messages: list[str] = []
  empty = np.zeros((0, 3), np.int64)
  if not np.any(semantic == BODY):
    _note(messages, 'no vertebral body (label 49) in the semantic mask: no vertebra instances can be made')
    return empty, messages
  components, count = _body_components(semantic, spacing, erosion, min_voxels)
  if edge_bodies:
    components, count = _edge_slivers(semantic, components, count, erosion, scaled_voxel_count(min_voxels, spacing))
  if count == 0:
    _note(messages, f'no vertebral body survives a {erosion}-voxel erosion with at least '
                    f'{scaled_voxel_count(min_voxels, spacing)} voxels: no vertebra instances can be made')
    return empty, messages
  distance = scaled_distance(duplicate_distance, spacing)
  components, count = _merge_duplicates(components, count, distance, messages)
  if detect_merged:
    components, count = _split_merged_bodies(components, count, semantic, distance, merged_ratio,
                                             int(merged_window), int(max_split_erosions), messages)
  _, centres = _centres_of_mass(components, count)
  boxes = ndimage.find_objects(components)
  points = []
  for label in range(1, count + 1):
    box = boxes[label - 1]
    offset = np.array([b.start for b in box])
    points.append(offset + _inside(components[box] == label, centres[label] - offset))
  points = np.array(points, np.int64)
  points = points[np.argsort(-centres[1:, INFERIOR_AXIS], kind='stable')]
  if len(points) == 1:
    _note(messages, 'a single vertebral body: its cutout alone decides the instances (no neighbours to agree with)')
  return points, messages


# ---------------------------------------------------------------------------------------------
# 2. Cutouts and the network's input


def cutout_boxes(centre, size, shape) -> tuple[tuple, tuple]:
  """(volume slices, cutout slices): where a `size` block centred on `centre` overlaps the volume.

  The block spans [centre - size // 2, centre - size // 2 + size) per axis, so the centre voxel
  sits at index size // 2 of the cutout; the parts outside the volume are padding.
  """
  volume_box, cut_box = [], []
  for c, s, n in zip(np.asarray(centre, np.int64), size, shape):
    start = int(c) - int(s) // 2
    lo, hi = min(max(start, 0), n), max(min(start + int(s), n), 0)
    hi = max(hi, lo)
    volume_box.append(slice(lo, hi))
    cut_box.append(slice(lo - start, hi - start))
  return tuple(volume_box), tuple(cut_box)


def cutout(volume: np.ndarray, centre, size, fill=0) -> np.ndarray:
  """The `size` block of `volume` (trailing axes kept) centred on `centre`, `fill` beyond the edges."""
  volume = np.asarray(volume)
  size = tuple(int(s) for s in size)
  volume_box, cut_box = cutout_boxes(centre, size, volume.shape[:3])
  out = np.full(size + volume.shape[3:], fill, volume.dtype)
  out[cut_box] = volume[volume_box]
  return out


def paste(cut: np.ndarray, centre, shape, out: np.ndarray | None = None) -> np.ndarray:
  """Inverse of `cutout`: the block's in-volume part written into `out` (zeros of `shape` if None)."""
  cut = np.asarray(cut)
  shape = tuple(int(n) for n in shape)[:3]
  if out is None:
    out = np.zeros(shape + cut.shape[3:], cut.dtype)
  volume_box, cut_box = cutout_boxes(centre, cut.shape[:3], shape)
  out[volume_box] = cut[cut_box]
  return out


def relabel_for_instance(semantic: np.ndarray) -> np.ndarray:
  """SPINEPS ids -> the instance network's classes: 41..48 -> 1..8, 49 -> 9, everything else 0 (uint8)."""
  semantic = np.asarray(semantic)
  if semantic.size and semantic.min() < 0:
    raise ValueError(f'semantic mask has negative labels ({int(semantic.min())})')
  lut = np.zeros(max(int(semantic.max(initial=0)) + 1, BODY + 1), np.uint8)
  lut[list(VERTEBRA_LABELS)] = np.arange(1, len(VERTEBRA_LABELS) + 1)
  return lut[semantic]


def one_hot_instance_input(classes: np.ndarray) -> np.ndarray:
  """Classes 0..9 (from `relabel_for_instance`) -> float32 one-hot with 10 trailing channels."""
  return np.eye(INPUT_CHANNELS, dtype=np.float32)[np.asarray(classes)]


def instance_network_input(semantic: np.ndarray) -> np.ndarray:
  """A semantic (cutout) in SPINEPS ids -> the network's (..., 10) float32 input."""
  return one_hot_instance_input(relabel_for_instance(semantic))


@dataclasses.dataclass(frozen=True)
class CutoutMask:
  """One vertebra predicted by one cutout, kept over its own bounding box in volume coordinates."""
  box: tuple  # slices into the volume
  mask: np.ndarray  # bool, the box's shape

  @property
  def size(self) -> int:
    return int(np.count_nonzero(self.mask))

  def dense(self, shape) -> np.ndarray:
    out = np.zeros(tuple(shape), bool)
    out[self.box] = self.mask
    return out


def _trimmed(mask: np.ndarray, offset) -> CutoutMask | None:
  box = ndimage.find_objects(mask.astype(np.int8))
  if not box:
    return None
  box = box[0]
  return CutoutMask(tuple(slice(o + b.start, o + b.stop) for o, b in zip(offset, box)), mask[box].copy())


def _output_classes(output, count: int, size: tuple) -> np.ndarray:
  """The network's answer for a batch -> (count, *size) classes 0..3."""
  output = np.asarray(output)
  if output.ndim == 5 and output.shape[1:] == size + (OUTPUT_CHANNELS,):
    return output[:count].argmax(-1)
  if output.ndim == 4 and output.shape[1:] == size and np.issubdtype(output.dtype, np.integer):
    return output[:count]
  sides = ', '.join(map(str, size))
  raise ValueError(f'predict_fn returned shape {output.shape} ({output.dtype}); expected (N, {sides}, '
                   f'{OUTPUT_CHANNELS}) scores or (N, {sides}) integer classes')


def predict_cutouts(predict_fn: Callable, semantic: np.ndarray, centres, size=(248, 304, 64), batch_size: int = 4,
                    *, pad_batches: bool = True) -> list[tuple]:
  """Per centre, the (above, centre, below) vertebrae the instance network finds in its cutout.

  `predict_fn(batch)` gets float32 (N, P, I, R, 10), the one-hot relabelled semantic cutouts
  (beyond the volume: background; with `pad_batches` N is always `batch_size`, the last batch
  filled with all-zero cutouts, so a jitted function compiles once), and returns numpy or JAX
  (N, P, I, R, 4) scores (logits, probabilities or one-hot: argmax over background, above,
  centre, below) or (N, P, I, R) integer classes 0..3 (cheaper to bring back from a device).
  The next batch is dispatched before the previous answer is read, so device work overlaps the
  host's; two input buffers alternate, so a batch's array is refilled once its answer has been
  read (copy it to keep it). Each mask is a `CutoutMask` in volume coordinates, None where
  nothing was predicted.
  """
  semantic = _check_mask(semantic, 'semantic mask')
  size = tuple(int(s) for s in size)
  if len(size) != 3 or min(size) < 1:
    raise ValueError(f'cutout size must be three positive sides, got {size}')
  if batch_size < 1:
    raise ValueError(f'batch_size must be at least 1, got {batch_size}')
  centres = np.asarray(centres, np.int64).reshape(-1, 3)
  classes = relabel_for_instance(semantic)
  channels = np.arange(INPUT_CHANNELS, dtype=np.uint8)
  buffers: list = [None, None]
  results: list[tuple] = []

  def dispatch(index, chunk):
    if buffers[index % 2] is None:
      buffers[index % 2] = np.zeros((batch_size,) + size + (INPUT_CHANNELS,), np.float32)
    batch = buffers[index % 2]
    for k, centre in enumerate(chunk):  # one-hot written in place: no temporary of the cutout's size x 10
      np.equal(cutout(classes, centre, size)[..., None], channels, out=batch[k], casting='unsafe')
    batch[len(chunk):] = 0
    return predict_fn(batch if pad_batches else batch[:len(chunk)])

  def collect(chunk, output):
    for centre, cut in zip(chunk, _output_classes(output, len(chunk), size)):
      volume_box, cut_box = cutout_boxes(centre, size, semantic.shape)
      offset = [b.start for b in volume_box]
      results.append(tuple(_trimmed(cut[cut_box] == k, offset) for k in (ABOVE, CENTRE, BELOW)))

  chunks = [centres[i:i + batch_size] for i in range(0, len(centres), batch_size)]
  pending = None
  for index, chunk in enumerate(chunks + [None]):
    current = (chunk, dispatch(index, chunk)) if chunk is not None else None
    if pending is not None:
      collect(*pending)
    pending = current
  return results


def _reference_order(semantic: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, list[int]]:
  """(reference vertebra ids on semantic 41..49, else 0; those ids top to bottom by centre of mass along I)."""
  reference = np.asarray(reference)
  vertebrae = np.where((reference > 0) & (reference < DISC_OFFSET), reference, 0).astype(np.int64)
  sizes, centres = _centres_of_mass(vertebrae)
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


# ---------------------------------------------------------------------------------------------
# 3. Consolidation


def _box_overlap(a: tuple, b: tuple) -> tuple | None:
  out = tuple(slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(a, b))
  return None if any(s.start >= s.stop for s in out) else out


def _local(box: tuple, window: tuple) -> tuple:
  return tuple(slice(w.start - b.start, w.stop - b.start) for b, w in zip(box, window))


def cutout_dice(a: CutoutMask, b: CutoutMask) -> float:
  """Dice of two cutout masks, computed only where their boxes overlap."""
  total = a.size + b.size
  if total == 0:
    return math.nan
  window = _box_overlap(a.box, b.box)
  if window is None:
    return 0.0
  return 2.0 * int(np.count_nonzero(a.mask[_local(a.box, window)] & b.mask[_local(b.box, window)])) / total


def _flatten(predictions) -> dict:
  """[(above, centre, below) per centre] or {(index, position): mask} -> {(index, position): mask}."""
  if isinstance(predictions, dict):
    return {k: v for k, v in predictions.items() if v is not None and v.size}
  return {(i, k): m for i, masks in enumerate(predictions) for k, m in enumerate(masks) if m is not None and m.size}


def find_couple(key, masks: dict, count: int, *, min_dice: float = 0.3,
                neighbour_range: int = 2) -> tuple[tuple, float]:
  """(members sorted by (centre index, position), agreement) of one prediction and its best partners.

  Partners are predictions of other cutouts within `neighbour_range` centre indices whose Dice
  with it exceeds `min_dice`; the two best are kept, or only the best when those two do not
  overlap each other by `min_dice` (they cannot be one vertebra). Agreement is the partners'
  mean Dice with the prediction (0 without partners).
  """
  index, _ = key
  anchor = masks[key]
  lo, hi = max(0, index - neighbour_range), min(count - 1, index + neighbour_range)
  scores = []
  for other in sorted(k for k in masks if lo <= k[0] <= hi and k[0] != index):
    scores.append((cutout_dice(anchor, masks[other]), other))
  scores.sort(key=lambda item: -item[0])
  partners = [(d, k) for d, k in scores[:2] if d > min_dice]
  if len(partners) == 2 and cutout_dice(masks[partners[0][1]], masks[partners[1][1]]) < min_dice:
    partners = partners[:1]
  agreement = float(np.mean([d for d, _ in partners])) if partners else 0.0
  return tuple(sorted([key] + [k for _, k in partners])), agreement


def rank_couples(masks: dict, count: int, *, min_dice: float = 0.3,
                 neighbour_range: int = 2) -> list[tuple[tuple, float]]:
  """Every prediction's couple (duplicates averaged), best first by (members + 1) x agreement."""
  found: dict[tuple, list] = {}
  for key in sorted(masks):
    members, agreement = find_couple(key, masks, count, min_dice=min_dice, neighbour_range=neighbour_range)
    found.setdefault(members, []).append(agreement)
  ranked = [(members, float(np.mean(values))) for members, values in found.items()]
  ranked.sort(key=lambda item: -(len(item[0]) + 1) * item[1])  # stable: ties keep their discovery order
  return ranked


def _remove_small_pieces(instances: np.ndarray, min_voxels: int) -> np.ndarray:
  """Delete 6-connected pieces of each instance under `min_voxels` (SPINEPS' clean_cc_artifacts, only_delete)."""
  boxes = ndimage.find_objects(instances)
  for label, box in enumerate(boxes, start=1):
    if box is None:
      continue
    region = instances[box]
    pieces, count = ndimage.label(region == label, _FACES)
    small = np.bincount(pieces.ravel()) < min_voxels
    small[0] = False
    if small.any():
      region[small[pieces]] = 0
  return instances


def _renumber(instances: np.ndarray) -> np.ndarray:
  ids = np.unique(instances)
  lut = np.zeros(int(ids.max()) + 1, np.int32)
  lut[ids] = np.arange(len(ids))
  return lut[instances]


def consolidate(predictions, shape, *, couple_dice: float = 0.3, neighbour_range: int = 2,
                vote_agreement: float = 0.45, max_taken: float = 0.6, min_instance_voxels: int = 250,
                fill_holes: bool = True) -> tuple[np.ndarray, list[str]]:
  """Overlapping cutout predictions -> (instance map int32 numbered 1..n, messages).

  `predictions` as `predict_cutouts` returns them (index = centre order, bottom to top). Couples
  (`rank_couples`) are merged best first: a voxel joins when at least 2 members mark it if the
  couple has 3 members and agreement >= `vote_agreement`, else when 1 does; a couple whose
  selected voxels are more than `max_taken` already labelled is skipped; only unlabelled voxels
  are filled, each couple a new instance. Then 6-connected pieces of an instance under
  `min_instance_voxels` are deleted (a whole small instance is one such piece), holes are filled
  per instance (never over another instance) and the instances renumbered 1..n in merge order.
  `min_instance_voxels` is a count on this grid (`segment_instances` scales it).
  """
  shape = tuple(int(n) for n in shape)
  messages: list[str] = []
  masks = _flatten(predictions)
  count = 1 + max((k[0] for k in masks), default=-1)
  instances = np.zeros(shape, np.int32)
  if not masks:
    _note(messages, 'the instance network found no vertebra in any cutout')
    return instances, messages
  next_id = 1
  for members, agreement in rank_couples(masks, count, min_dice=couple_dice, neighbour_range=neighbour_range):
    votes_needed = 2 if len(members) >= 3 and agreement >= vote_agreement else 1
    window = tuple(slice(min(masks[m].box[a].start for m in members), max(masks[m].box[a].stop for m in members))
                   for a in range(3))
    votes = np.zeros(tuple(s.stop - s.start for s in window), np.uint8)
    for m in members:
      votes[_local(window, masks[m].box)] += masks[m].mask
    selected = votes >= votes_needed
    total = int(np.count_nonzero(selected))
    if total == 0:
      continue
    target = instances[window]
    free = selected & (target == 0)
    if (total - int(np.count_nonzero(free))) / total > max_taken:
      continue
    target[free] = next_id
    next_id += 1
  if min_instance_voxels > 1:
    instances = _remove_small_pieces(instances, int(min_instance_voxels))
  if fill_holes:
    instances = semantic_postprocess.fill_holes(instances, [int(v) for v in np.unique(instances) if v])
  instances = _renumber(instances)
  made = int(instances.max())
  if made == 0:
    _note(messages, f'no instance of at least {min_instance_voxels} voxels came out of the cutouts')
  elif made < count:
    _note(messages, f'{made} vertebra instances from {count} vertebral bodies: some cutouts did not agree')
  return instances, messages


# ---------------------------------------------------------------------------------------------
# 4. Joint post-processing and numbering


def reassign_articular_processes(instances: np.ndarray, semantic: np.ndarray, dominance: float = 0.5) -> np.ndarray:
  """Each 26-connected articular process (45..48) goes wholly to the instance covering most of it.

  As SPINEPS' `assign_vertebra_inconsistency`: only when that instance (unlabelled counts as a
  candidate) covers more than twice the runner-up; a process already in one instance is left.
  """
  out = np.array(instances, copy=True)
  for label in ARTICULAR_LABELS:
    pieces, count = ndimage.label(semantic == label, _CUBE)
    for index, box in enumerate(ndimage.find_objects(pieces), start=1):
      if box is None:
        continue
      piece = pieces[box] == index
      owners, votes = np.unique(out[box][piece], return_counts=True)
      if len(owners) < 2:
        continue
      order = np.argsort(votes)[::-1]
      if votes[order[0]] * dominance > votes[order[1]]:
        out[box][piece] = owners[order[0]]
  return out


def assign_uncovered(instances: np.ndarray, vertebra: np.ndarray, grow: int = 2) -> tuple[np.ndarray, int]:
  """Vertebra voxels no instance covers join the instance around them, or are deleted: (instances, deleted).

  As SPINEPS' `assign_missing_cc`: instances first grow `grow` 6-connected steps inside the
  vertebra mask (the larger id wins a contested voxel); each remaining uncovered 18-connected
  piece then takes the instance most common among its 18-neighbours, or, with none, is
  deleted (left 0: a speck of bone far from every vertebra).
  """
  out = np.where(vertebra, instances, 0)
  for _ in range(int(grow)):
    hole = vertebra & (out == 0)
    if not hole.any():
      return out, 0
    grown = ndimage.grey_dilation(out, footprint=_FACES)
    out[hole] = grown[hole]
  pieces, count = ndimage.label(vertebra & (out == 0), _EDGES)
  deleted = 0
  for index, box in enumerate(ndimage.find_objects(pieces), start=1):
    if box is None:
      continue
    box = _grow(box, 1, out.shape)
    piece = pieces[box] == index
    ring = ndimage.binary_dilation(piece, _EDGES) & ~piece
    neighbours = out[box][ring]
    neighbours = neighbours[neighbours > 0]
    if neighbours.size:
      out[box][piece] = np.bincount(neighbours).argmax()
    else:
      deleted += int(piece.sum())
  return out, deleted


def first_vertebra_id(first) -> int:
  """A numbering start (SPINEPS id 1..25 or a level name C1..L6) as an id."""
  if isinstance(first, str):
    first = levels_lib.level_to_label(first, 'spineps')
  first = int(first)
  if not 1 <= first <= LAST_LUMBAR_ID:
    raise ValueError(f'first_vertebra must be a level C1..L6 or its SPINEPS id 1..{LAST_LUMBAR_ID}, got {first}')
  return first


def vertebra_ids(first, count: int) -> list[int]:
  """`count` consecutive SPINEPS ids from `first`, skipping the sacrum's 26."""
  ids, value = [], first_vertebra_id(first)
  while len(ids) < count:
    if value != SACRUM_ID:
      ids.append(value)
    value += 1
  if ids and ids[-1] >= DISC_OFFSET:
    raise ValueError(f'{count} vertebrae from id {first} reach {ids[-1]}, which collides with disc ids (100 + X)')
  return ids


def number_top_to_bottom(instances: np.ndarray, first=1) -> tuple[np.ndarray, dict[int, int]]:
  """Instances renumbered by their centre of mass along I, the highest `first` (int16), and the id map."""
  present = [int(v) for v in np.unique(instances) if v]
  if not present:
    return np.zeros(instances.shape, np.int16), {}
  _, centres = _centres_of_mass(instances)
  order = sorted(present, key=lambda v: centres[v, INFERIOR_AXIS])
  mapping = dict(zip(order, vertebra_ids(first, len(order))))
  lut = np.zeros(int(max(present)) + 1, np.int16)
  for old, new in mapping.items():
    lut[old] = new
  return lut[instances], mapping


def _vertebra_heights(numbered: np.ndarray, semantic: np.ndarray) -> dict[int, float]:
  """Axis-1 centre of each vertebra's body (label 49), or of the whole instance without one (C1).

  The sacrum is left out: nothing it could number lies below it, and alone it would number the
  discs of a spine whose vertebrae were all lost.
  """
  ids = [int(v) for v in np.unique(numbered) if 0 < v < DISC_OFFSET and v != SACRUM_ID]
  if not ids:
    return {}
  body_sizes, body_centres = _centres_of_mass(np.where(semantic == BODY, numbered, 0), max(ids))
  _, all_centres = _centres_of_mass(numbered, max(ids))
  return {v: float(body_centres[v, INFERIOR_AXIS] if body_sizes[v] > 0 else all_centres[v, INFERIOR_AXIS])
          for v in ids}


def _nearest_above(heights: dict[int, float], row: float) -> int | None:
  above = [(h, v) for v, h in heights.items() if h < row]
  return max(above)[1] if above else None


def _label_discs(out, semantic, heights, messages) -> None:
  """Each 26-connected disc piece -> 100 + the vertebra nearest above its centre (top: the one before)."""
  pieces, count = ndimage.label(semantic == DISC, _CUBE)
  if count == 0:
    return
  if not heights:
    _note(messages, f'{count} disc(s) but no vertebra to number them after: discs left 0')
    return
  top = min(heights, key=heights.get)
  _, centres = _centres_of_mass(pieces, count)
  lut = np.zeros(count + 1, np.int16)
  for index in range(1, count + 1):
    owner = _nearest_above(heights, centres[index, INFERIOR_AXIS])
    if owner is None:  # above the topmost vertebra: the disc below the vertebra before it, as SPINEPS
      owner = top - 1 if top - 1 != SACRUM_ID else top - 2
      if owner < 1:
        _note(messages, 'a disc above the first vertebra (C1) has no vertebra to be numbered after: left 0')
        continue
    lut[index] = DISC_OFFSET + owner
  out[pieces > 0] = lut[pieces[pieces > 0]]


def _label_endplates(out, semantic, heights, owner_rule: str, messages) -> None:
  """Endplates -> 200 + X: X the vertebra nearest above each piece's centre ('above') or nearest voxel ('vertebra')."""
  endplate = semantic == ENDPLATE
  if not endplate.any():
    return
  if not heights:
    _note(messages, 'endplates but no vertebra to number them after: endplates left 0')
    return
  if owner_rule == 'vertebra':
    box = _grow(ndimage.find_objects(endplate.astype(np.int8))[0], 4, out.shape)
    bone = np.where((out[box] > 0) & (out[box] < DISC_OFFSET), out[box], 0)
    if bone.any():
      nearest = ndimage.distance_transform_edt(bone == 0, return_distances=False, return_indices=True)
      owners = bone[tuple(nearest)]
      region = out[box]
      region[endplate[box]] = ENDPLATE_OFFSET + owners[endplate[box]]
      return
  pieces, count = ndimage.label(endplate, _CUBE)
  _, centres = _centres_of_mass(pieces, count)
  top = min(heights, key=heights.get)
  lut = np.zeros(count + 1, np.int16)
  for index in range(1, count + 1):
    owner = _nearest_above(heights, centres[index, INFERIOR_AXIS])
    lut[index] = ENDPLATE_OFFSET + (owner if owner is not None else top)
  out[pieces > 0] = lut[pieces[pieces > 0]]


def label_spine(instances: np.ndarray, semantic: np.ndarray, *, first_vertebra=1, endplate_owner: str = 'above',
                reassign_articular: bool = True, assign_missing: bool = True) -> tuple[np.ndarray, list[str]]:
  """Consolidated instances + semantic mask -> (instance mask with SPINEPS ids (int16), messages).

  In order (SPINEPS' `phase_postprocess_combined`): instances are cut to the semantic vertebra
  labels 41..49; articular processes go to the instance that dominates them
  (`reassign_articular_processes`); uncovered vertebra voxels join a neighbouring instance or
  are dropped (`assign_uncovered`), so every vertebra voxel of the semantic mask ends up in
  exactly one vertebra (or nowhere); vertebrae are numbered top to bottom from `first_vertebra`
  (an id 1..25 or a level name; 26 is skipped); semantic sacrum voxels become 26; each disc
  piece becomes 100 + X and each endplate 200 + X.

  Numbering: there is no labelling network here, so ids are positions. The default 1 makes a
  field whose topmost vertebra is C1 come out right: the phantoms draw C1 (arch, no body), and
  C2's cutout brings it back as "the vertebra above". (SPINEPS' T2w models do not segment C1,
  so SPINEPS starts at 2 and lets its labelling model fix the levels.) For a field starting
  lower, pass its top level, e.g. first_vertebra='T10'.

  X is the nearest vertebra above (smaller I) by its body's centre, as SPEC and SPINEPS: for a
  disc that is the vertebra it lies under. For endplates, `endplate_owner='above'` (SPEC,
  SPINEPS) gives both endplates around disc 100 + X the id 200 + X, so a vertebra's upper
  endplate carries the number of the vertebra above it; 'vertebra' gives each endplate voxel the
  nearest vertebra voxel's number, the endplates of X being 200 + X (the phantoms' convention).
  """
  instances = _check_mask(instances, 'instance mask')
  semantic = _check_mask(semantic, 'semantic mask')
  if instances.shape != semantic.shape:
    raise ValueError(f'instance mask shape {instances.shape} differs from semantic mask shape {semantic.shape}')
  if endplate_owner not in ENDPLATE_OWNERS:
    raise ValueError(f'endplate_owner must be one of {ENDPLATE_OWNERS}, got {endplate_owner!r}')
  messages: list[str] = []
  vertebra = np.isin(semantic, VERTEBRA_LABELS)
  work = np.where(vertebra, instances, 0).astype(np.int32)
  if reassign_articular:
    work = reassign_articular_processes(work, semantic)
  if assign_missing and work.any():
    work, deleted = assign_uncovered(work, vertebra)
    if deleted:
      _note(messages, f'{deleted} vertebra voxel(s) of the semantic mask touch no vertebra instance: left 0')
  numbered, mapping = number_top_to_bottom(work, first_vertebra)
  if mapping and max(mapping.values()) > LAST_LUMBAR_ID:
    _note(messages, f'{len(mapping)} vertebrae numbered from {first_vertebra_id(first_vertebra)} run past L6 (25): '
                    'the ids after 25 are positions, not levels (is first_vertebra too low?)')
  if vertebra.any() and not mapping:
    _note(messages, 'the semantic mask has vertebra voxels but no vertebra instance')
  out = numbered.copy()
  out[semantic == SACRUM] = SACRUM_ID
  heights = _vertebra_heights(out, semantic)
  _label_discs(out, semantic, heights, messages)
  _label_endplates(out, semantic, heights, endplate_owner, messages)
  return out, messages


# ---------------------------------------------------------------------------------------------
# The whole phase, and centroids


def segment_instances(semantic: np.ndarray, predict_fn: Callable, cfg: ml_collections.ConfigDict | None = None, *,
                      spacing=REFERENCE_SPACING) -> tuple[np.ndarray, list[str]]:
  """SPINEPS phase 2 on a PIR model-space semantic mask: (instance mask int16 with SPINEPS ids, messages).

  `predict_fn` is the instance network as `predict_cutouts` calls it; `cfg` as
  `default_instance_config` (its voxel thresholds are at the reference spacing and scaled to
  `spacing`, the mask's own). With no vertebral body the result has no vertebra (only the sacrum,
  if any) and a message says why.
  """
  cfg = cfg if cfg is not None else default_instance_config()
  semantic = _check_mask(semantic, 'semantic mask')
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
        _note(messages, f'the cutout at {tuple(int(c) for c in centre)} does not mark its own centre as its vertebra')
    instances, more = consolidate(
        predictions, semantic.shape, couple_dice=cfg.couple_dice, neighbour_range=int(cfg.neighbour_range),
        vote_agreement=cfg.vote_agreement, max_taken=cfg.max_taken,
        min_instance_voxels=scaled_voxel_count(cfg.min_instance_voxels, spacing), fill_holes=bool(cfg.fill_holes))
    messages += more
  out, more = label_spine(instances, semantic, first_vertebra=cfg.first_vertebra, endplate_owner=cfg.endplate_owner,
                          reassign_articular=bool(cfg.reassign_articular), assign_missing=bool(cfg.assign_missing))
  return out, messages + more


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
  instance_mask = _check_mask(instance_mask, 'instance mask')
  semantic = _check_mask(semantic, 'semantic mask')
  if instance_mask.shape != semantic.shape:
    raise ValueError(f'instance mask shape {instance_mask.shape} differs from semantic mask shape {semantic.shape}')
  affine = np.asarray(affine, np.float64)
  if affine.shape != (4, 4):
    raise ValueError(f'affine must be 4 x 4, got {affine.shape}')

  def world(point) -> list[float]:
    return [round(float(v), 3) for v in affine[:3, :3] @ np.asarray(point, np.float64) + affine[:3, 3]]

  ids = instance_mask.astype(np.int64)
  sizes, centres = _centres_of_mass(ids)
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

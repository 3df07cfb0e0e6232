"""Training cutouts for SPINEPS' instance network: label maps around one vertebral body each.

The network reads a block of the semantic mask (model space: PIR, class indices of
`spine_labels`) relabelled {41..48 -> 1..8, 49 -> 9, else 0}, and must mark the vertebra at
the block's centre (2), the one above it (1) and the one below (3). Targets come from the
instance map (SPINEPS ids, vertebrae under 100) exactly as `inference.phase2.oracle` reads a
reference: vertebrae are ordered top to bottom by their centres of mass along I (axis 1), and
each target covers its vertebra's voxels that the input shows (41..49), so discs, endplates and
the sacrum's own label (26) are never targets, as they are never inputs.

A cutout centres on a vertebral body's centroid (body = label 49 of that vertebra), moved by a
random jitter (the inference finds centres from eroded components, which sit a little off the
centroid), with patches.py's rotation, scaling and elastic deformation in one nearest-neighbour
resampling pass (its geometry and conventions: cutout voxel o samples centre + A (o - size // 2)
+ displacement, zeros beyond the volume) and mirroring along R, which swaps the left/right input
classes.
"""
from __future__ import annotations

import ml_collections
import numpy as np

from spine_jax.data import patches
from spine_jax.data import spine_labels

INPUT_CLASSES = 10  # background, 41..48 -> 1..8, 49 -> 9
NUM_TARGETS = 4  # background, above, centre, below
ABOVE, CENTRE, BELOW = 1, 2, 3
INPUT_OF_ID = {label: k for k, label in enumerate(spine_labels.VERTEBRA_PARTS, start=1)}
VERTEBRA_MAX_ID = spine_labels.DISC_OFFSET - 1  # SPINEPS instance ids: vertebrae 1..99
_BODY = spine_labels.SEMANTIC_IDS.index(spine_labels.CORPUS)


def default_cutout_config() -> ml_collections.ConfigDict:
  """SPINEPS' cutout (248 x 304 x 64 voxels P, I, R at the reference spacing) and its augmentation."""
  return ml_collections.ConfigDict(dict(
      cutout_size=(248, 304, 64),  # sides divisible by the network's 2 ** (levels - 1)
      min_body_mm3=200.0,  # a vertebra with less body in the field is never a cutout's centre
      centre_jitter_mm=(4.0, 4.0, 2.0),  # (P, I, R): uniform in +-these
      augment=ml_collections.ConfigDict(dict(
          enabled=True,
          # patches.py's spatial transforms, in one nearest-neighbour pass.
          p_rotation=0.3, rotation_deg=((-5.0, 5.0), (-5.0, 5.0), (-15.0, 15.0)),
          p_scale=0.3, scale_range=(0.85, 1.15),
          p_elastic=0.2, elastic_sigma_mm=(10.0, 15.0), elastic_magnitude_mm=(1.0, 4.0),
          mirror_axes=(2,), p_mirror=0.5,
      )),
  ))


def input_lut() -> np.ndarray:
  """Semantic class index (spine_labels order) -> input class 0..9."""
  lut = np.zeros(spine_labels.NUM_CLASSES, np.uint8)
  for label, k in INPUT_OF_ID.items():
    lut[spine_labels.SEMANTIC_IDS.index(label)] = k
  return lut


def input_left_right_swap() -> np.ndarray:
  """Input classes with left and right exchanged (43 <-> 44, 45 <-> 46, 47 <-> 48), for mirroring."""
  lut = np.arange(INPUT_CLASSES, dtype=np.uint8)
  for left, right in spine_labels.LEFT_RIGHT_PAIRS:
    lut[INPUT_OF_ID[left]], lut[INPUT_OF_ID[right]] = INPUT_OF_ID[right], INPUT_OF_ID[left]
  return lut


def vertebra_order(instance: np.ndarray) -> list[int]:
  """Vertebra ids (1..99) present in `instance`, top to bottom by centre of mass along I."""
  vert = np.where((instance > 0) & (instance <= VERTEBRA_MAX_ID), instance, 0).astype(np.int64).ravel()
  rows = np.broadcast_to(np.arange(instance.shape[1])[None, :, None], instance.shape).ravel()
  counts = np.bincount(vert, minlength=VERTEBRA_MAX_ID + 1)
  sums = np.bincount(vert, weights=rows, minlength=VERTEBRA_MAX_ID + 1)
  ids = np.flatnonzero(counts[1:]) + 1
  return [int(v) for v in ids[np.argsort(sums[ids] / counts[ids], kind='stable')]]


def volume_record(labels: np.ndarray, instance: np.ndarray, spacing, name: str = 'volume',
                  min_body_mm3: float = 200.0) -> dict:
  """What cutouts are cut from: input classes, each input voxel's vertebra as its position in the
  top-to-bottom order (1-based, 0 for none), and the vertebrae with a body to centre on.

  `labels` are semantic class indices, `instance` SPINEPS instance ids, both in model space.
  """
  if instance is None:
    raise ValueError(f'{name}: the instance task needs an instance mask (manifest column "instance")')
  labels, instance = np.asarray(labels), np.asarray(instance)
  if labels.shape != instance.shape:
    raise ValueError(f'{name}: semantic {labels.shape} and instance {instance.shape} masks differ in shape')
  inputs = input_lut()[labels]
  order = vertebra_order(instance)  # at most 99 ids: positions fit uint8
  rank = np.zeros(max(int(instance.max(initial=0)), VERTEBRA_MAX_ID) + 1, np.uint8)
  rank[order] = np.arange(1, len(order) + 1)
  position = np.where(inputs > 0, rank[np.clip(instance, 0, None)], 0).astype(np.uint8)
  spacing = np.asarray(spacing, np.float32)
  body = np.where(labels == _BODY, position, 0)
  counts = np.bincount(body.ravel(), minlength=len(order) + 1)
  coords = np.nonzero(body)
  values = body[coords]
  centres = np.stack([np.bincount(values, weights=c, minlength=len(order) + 1) for c in coords], -1)
  keep = np.flatnonzero(counts[1:] * float(np.prod(spacing)) >= min_body_mm3) + 1
  return {'name': name, 'input': inputs, 'position': position, 'spacing': spacing,
          'body_positions': keep.astype(np.int32),
          'body_centres': (centres[keep] / counts[keep, None]).astype(np.float32)}


def targets_of(position: np.ndarray, centre_position: int) -> np.ndarray:
  """Positions -> targets 0..3 for the cutout whose centre vertebra has `centre_position`."""
  lut = np.zeros(256, np.uint8)
  for target, p in ((ABOVE, centre_position - 1), (CENTRE, centre_position), (BELOW, centre_position + 1)):
    if p >= 1:
      lut[p] = target
  return lut[position]


def _sample_nearest(arrays, coords: np.ndarray) -> list[np.ndarray]:
  """Each array at the nearest voxel of `coords` (3, *size), 0 beyond the volume.

  Reads a zero-padded crop of the region the coordinates span, so every index lies inside it.
  """
  flat = coords.reshape(3, -1)
  lo = np.floor(flat.min(axis=1)).astype(np.int64)
  size = np.floor(flat.max(axis=1)).astype(np.int64) + 2 - lo
  idx = np.floor(coords - lo.reshape(3, 1, 1, 1) + 0.5).astype(np.intp)
  flat_idx = (idx[0] * size[1] + idx[1]) * size[2] + idx[2]
  return [patches.crop_box(a, lo, size, a.dtype).ravel().take(flat_idx) for a in arrays]


def extract_cutout(record: dict, body: int, rng: np.random.Generator | None, cfg) -> tuple[np.ndarray, np.ndarray]:
  """(input classes, targets), both uint8 of `cfg.cutout_size`, around body `body` of a record.

  With `rng` None (or augmentation off) the cutout is the exact block centred on the rounded
  body centroid, as inference cuts it.
  """
  size = tuple(int(s) for s in cfg.cutout_size)
  spacing = record['spacing']
  centre = np.asarray(record['body_centres'][body], np.float64)
  aug = cfg.augment
  use_aug = rng is not None and aug.get('enabled', True)
  affine = displacement = None
  if use_aug:
    centre = centre + rng.uniform(-1.0, 1.0, 3) * np.asarray(cfg.centre_jitter_mm) / spacing
    affine = patches.draw_affine(rng, aug, spacing)
    if rng.random() < aug.p_elastic:
      displacement = patches.elastic_displacement(size, spacing, rng, aug.elastic_sigma_mm, aug.elastic_magnitude_mm)
  centre = np.rint(centre).astype(np.int64)
  if affine is None and displacement is None:
    start = centre - np.asarray(size) // 2
    inputs, position = (patches.crop_box(record[k], start, size, np.uint8)
                        for k in ('input', 'position'))
  else:
    coords = patches.sampling_coords(centre, size, affine, displacement)
    inputs, position = (a.reshape(size) for a in _sample_nearest((record['input'], record['position']), coords))
  targets = targets_of(position, int(record['body_positions'][body]))
  if use_aug:
    for axis in aug.mirror_axes:
      if rng.random() < aug.p_mirror:
        inputs, targets = np.flip(inputs, axis), np.flip(targets, axis)
        if axis == 2:
          inputs = input_left_right_swap()[inputs]
  return np.ascontiguousarray(inputs, np.uint8), np.ascontiguousarray(targets, np.uint8)


class CutoutSource:
  """Random access to every (volume, body) pair: each vertebral body is one element, so training
  sees every body equally often whatever the number of vertebrae per volume."""

  def __init__(self, records: list[dict]):
    self._records = records
    self._pairs = [(r, b) for r, rec in enumerate(records) for b in range(len(rec['body_positions']))]
    if not self._pairs:
      raise ValueError('no vertebral body to centre a cutout on in the data set')

  def __len__(self) -> int:
    return len(self._pairs)

  def __getitem__(self, index: int) -> dict:
    r, b = self._pairs[index]
    return {'record': self._records[r], 'body': b}


def cutout_transform(cfg):
  """grain random_map function: {record, body} -> {input (X, Y, Z) uint8, labels (X, Y, Z) uint8}."""
  def fn(element, rng):
    inputs, targets = extract_cutout(element['record'], element['body'], rng, cfg)
    return {'input': inputs, 'labels': targets}
  return fn

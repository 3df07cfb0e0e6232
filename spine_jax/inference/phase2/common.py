"""Phase 2's shared settings and helpers: label groups, the instance network's classes, the reference
spacing and sizes scaled to a mask's own, mask checks, label statistics, and the one logger whose
warnings every stage also returns as messages.
"""
from __future__ import annotations

import logging

import ml_collections
import numpy as np
from scipy import ndimage

from spine_jax.data import instance_cutouts
from spine_jax.data import spatial
from spine_jax.data import spine_labels
from spine_jax.inference.semantic_postprocess import SPINE_JAX_MODE, SPINEPS_MODE

logger = logging.getLogger(__name__)

SACRUM, BODY, ENDPLATE, DISC = spine_labels.SACRUM, spine_labels.CORPUS, spine_labels.ENDPLATE, spine_labels.DISC
# The instance network's encoding, as training cuts it (data/instance_cutouts.py): input classes
# 41..48 -> 1..8, 49 -> 9 (what an instance covers), outputs background, above, centre, below.
VERTEBRA_LABELS = tuple(instance_cutouts.INPUT_OF_ID)
INPUT_CHANNELS = instance_cutouts.INPUT_CLASSES
OUTPUT_CHANNELS = instance_cutouts.NUM_TARGETS
ABOVE, CENTRE, BELOW = instance_cutouts.ABOVE, instance_cutouts.CENTRE, instance_cutouts.BELOW
ARTICULAR_LABELS = spine_labels.ARTICULAR
POSITIONS = ('above', 'centre', 'below')
DISC_OFFSET, ENDPLATE_OFFSET = spine_labels.DISC_OFFSET, spine_labels.ENDPLATE_OFFSET
SACRUM_ID = spine_labels.SACRUM_INSTANCE
LAST_LUMBAR_ID = 25  # L6: the last id of a numbering from C1
INFERIOR_AXIS = 1
REFERENCE_SPACING = spatial.REFERENCE_SPACING
ENDPLATE_OWNERS = ('above', 'vertebra')

PHASE2_MODES = (SPINE_JAX_MODE, SPINEPS_MODE)  # the same two names as the semantic clean-up's modes

FACES = ndimage.generate_binary_structure(3, 1)
EDGES = ndimage.generate_binary_structure(3, 2)
CUBE = ndimage.generate_binary_structure(3, 3)


def default_instance_config() -> ml_collections.ConfigDict:
  """Every setting of phase 2; voxel counts and distances are at the reference spacing."""
  cfg = ml_collections.ConfigDict()
  cfg.cutout_size = (248, 304, 64)  # P, I, R voxels (sides divisible by 8 for the network)
  # Cutouts per network call, the last call padded: a scan has 2-8 cutouts, and on CPU a cutout costs the same
  # at 2 as at 4 (BUILD_NOTES.md, "Convolution on CPU"), so 2 pads less and compiles a smaller program.
  cfg.batch_size = 2
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
  # Whose rules find the centres and merge the cutouts: 'spine_jax' (the settings above) or 'spineps',
  # SPINEPS 2.1.3's own (spineps_instances.py), where min_body_voxels and min_instance_voxels act as its
  # corpus_size_cleaning and vert_size_threshold and cutout_size, batch_size, detect_merged_bodies and
  # fill_holes apply; the other settings above are 'spine_jax' only.
  cfg.phase2_mode = SPINE_JAX_MODE
  cfg.abort_on_empty_couple = False  # 'spineps': True drops every instance on an empty couple, as SPINEPS does
  # Labelling (see `label_spine`).
  cfg.first_vertebra = 1
  cfg.endplate_owner = 'above'
  cfg.reassign_articular = True
  cfg.assign_missing = True
  # Whose joint post-processing of instances and semantics runs on the input grid: 'spine_jax'
  # (`label_spine` with the three settings above) or 'spineps', SPINEPS 2.1.3's own
  # (joint_postprocess.py: it also rewrites the semantic mask); first_vertebra applies to both.
  cfg.postprocess_mode = SPINE_JAX_MODE
  return cfg


def note(messages: list, text: str) -> None:
  logger.warning(text)
  messages.append(text)


def scaled_voxel_count(count: float, spacing, reference=REFERENCE_SPACING) -> int:
  """A voxel count at `reference` spacing -> the same volume in voxels of `spacing` (at least 1)."""
  ratio = float(np.prod(np.asarray(reference, np.float64)) / np.prod(spatial.check_spacing(spacing)))
  return max(1, int(round(count * ratio)))


def scaled_distance(voxels: float, spacing, axis: int = INFERIOR_AXIS, reference=REFERENCE_SPACING) -> float:
  """A distance in voxels along `axis` at `reference` spacing -> voxels of `spacing`."""
  return float(voxels) * float(reference[axis]) / float(spatial.check_spacing(spacing)[axis])


def check_mask(array, name: str) -> np.ndarray:
  array = np.asarray(array)
  if array.ndim != 3:
    raise ValueError(f'{name}: expected a 3D (P, I, R) mask, got shape {array.shape}')
  if not np.issubdtype(array.dtype, np.integer):
    raise ValueError(f'{name}: expected integer labels, got dtype {array.dtype}')
  return array




def centres_of_mass(labels: np.ndarray, count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
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


def grow_box(box: tuple, margin: int, shape) -> tuple:
  return tuple(slice(max(0, b.start - margin), min(n, b.stop + margin)) for b, n in zip(box, shape))

"""SPINEPS label ids with one name each, the instance ids' offsets, and the network's channel order.

The semantic network predicts 15 channels: background and the 14 structures below, in the order
of `SEMANTIC_IDS`. Masks on disk always hold the SPINEPS ids; indices exist only inside the model.
"""
from __future__ import annotations

import numpy as np

# SPINEPS semantic ids (SPEC section 3).
SACRUM = 26
ARCUS, SPINOUS = 41, 42
COSTAL_LEFT, COSTAL_RIGHT = 43, 44
SUPERIOR_ARTICULAR_LEFT, SUPERIOR_ARTICULAR_RIGHT = 45, 46
INFERIOR_ARTICULAR_LEFT, INFERIOR_ARTICULAR_RIGHT = 47, 48
CORPUS = 49
# TPTBox's Vertebra_Corpus without its border; SPINEPS' models write the body as CORPUS (its corpus border).
CORPUS_INNER = 50
CORD, CANAL, ENDPLATE, DISC = 60, 61, 62, 100
# TPTBox's Dens_axis, the odontoid process of C2: SPINEPS' MRI models do not write it (its CT ones do); the
# labelling phase keeps it with the corpus and forces C2 on the instance that holds most of it.
DENS = 51
# An endplate as its vertebra's upper or lower plate (TPTBox's Location 52, 53). No network here predicts
# them; SPINEPS' post-processing splits ENDPLATE into them (the instance 'spineps' post-processing mode).
ENDPLATE_SUPERIOR, ENDPLATE_INFERIOR = 52, 53
ARTICULAR = (SUPERIOR_ARTICULAR_LEFT, SUPERIOR_ARTICULAR_RIGHT, INFERIOR_ARTICULAR_LEFT, INFERIOR_ARTICULAR_RIGHT)
# The structures a vertebra's instance covers (its posterior elements and its body).
VERTEBRA_PARTS = (ARCUS, SPINOUS, COSTAL_LEFT, COSTAL_RIGHT, *ARTICULAR, CORPUS)

# SPINEPS instance ids: vertebrae 1..99 (C1 = 1 ... L6 = 25, S1 = 26 = the sacrum, T13 = 28), the disc
# below vertebra X is DISC_OFFSET + X and vertebra X's endplates ENDPLATE_OFFSET + X.
SACRUM_INSTANCE = SACRUM
DISC_OFFSET, ENDPLATE_OFFSET = 100, 200

SEMANTIC_IDS = (0, *VERTEBRA_PARTS, CORD, CANAL, ENDPLATE, DISC, SACRUM)
STRUCTURE_NAMES = {
    41: "arcus_vertebrae", 42: "spinous_process",
    43: "costal_process_left", 44: "costal_process_right",
    45: "superior_articular_left", 46: "superior_articular_right",
    47: "inferior_articular_left", 48: "inferior_articular_right",
    49: "vertebra_corpus", 60: "spinal_cord", 61: "spinal_canal", 62: "endplate",
    100: "intervertebral_disc", 26: "sacrum",
}
LEFT_RIGHT_PAIRS = ((COSTAL_LEFT, COSTAL_RIGHT), (SUPERIOR_ARTICULAR_LEFT, SUPERIOR_ARTICULAR_RIGHT),
                    (INFERIOR_ARTICULAR_LEFT, INFERIOR_ARTICULAR_RIGHT))
NUM_CLASSES = len(SEMANTIC_IDS)

# Names of the split endplates, which masks on disk may hold (SPINEPS writes them) but no network predicts.
SPLIT_ENDPLATE_NAMES = {ENDPLATE_SUPERIOR: "endplate_superior", ENDPLATE_INFERIOR: "endplate_inferior"}

_ID_TO_INDEX = np.full(256, -1, np.int16)
_ID_TO_INDEX[list(SEMANTIC_IDS)] = np.arange(NUM_CLASSES)
_ID_TO_INDEX[list(SPLIT_ENDPLATE_NAMES)] = SEMANTIC_IDS.index(ENDPLATE)  # a split endplate is an endplate


class LabelError(ValueError):
  """A mask holds values that are not SPINEPS semantic ids."""


def check_ids(seg: np.ndarray, name: str = "mask") -> None:
  """Raise a LabelError naming the mask and its values that are not SPINEPS semantic ids."""
  values = np.unique(np.asarray(seg))
  bad = [int(v) for v in values if v < 0 or v > 255 or _ID_TO_INDEX[int(v)] < 0]
  if bad:
    raise LabelError(f"{name}: labels {bad} are not SPINEPS semantic ids {sorted(SEMANTIC_IDS[1:])}")


def ids_to_indices(seg: np.ndarray, name: str = "mask") -> np.ndarray:
  """SPINEPS ids -> channel indices (uint8); unknown ids are an error naming them and the mask."""
  seg = np.asarray(seg)
  check_ids(seg, name)
  return _ID_TO_INDEX[seg.astype(np.int64)].astype(np.uint8)


def indices_to_ids(indices: np.ndarray) -> np.ndarray:
  """Channel indices -> SPINEPS ids (uint8 holds all of them)."""
  return np.asarray(SEMANTIC_IDS, np.uint8)[np.asarray(indices)]


def left_right_swap() -> np.ndarray:
  """A permutation of channel indices that exchanges left and right structures (for mirroring)."""
  lut = np.arange(NUM_CLASSES)
  index = {v: i for i, v in enumerate(SEMANTIC_IDS)}
  for left, right in LEFT_RIGHT_PAIRS:
    lut[index[left]], lut[index[right]] = index[right], index[left]
  return lut


def structure_name(label: int) -> str:
  label = int(label)
  return STRUCTURE_NAMES.get(label, SPLIT_ENDPLATE_NAMES.get(label, f"label_{label}"))

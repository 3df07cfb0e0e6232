"""SPINEPS semantic label ids, their names, and the network's channel order.

The semantic network predicts 15 channels: background and the 14 structures below, in the order
of `SEMANTIC_IDS`. Masks on disk always hold the SPINEPS ids; indices exist only inside the model.
"""
from __future__ import annotations

import numpy as np

SEMANTIC_IDS = (0, 41, 42, 43, 44, 45, 46, 47, 48, 49, 60, 61, 62, 100, 26)
STRUCTURE_NAMES = {
    41: "arcus_vertebrae", 42: "spinous_process",
    43: "costal_process_left", 44: "costal_process_right",
    45: "superior_articular_left", 46: "superior_articular_right",
    47: "inferior_articular_left", 48: "inferior_articular_right",
    49: "vertebra_corpus", 60: "spinal_cord", 61: "spinal_canal", 62: "endplate",
    100: "intervertebral_disc", 26: "sacrum",
}
LEFT_RIGHT_PAIRS = ((43, 44), (45, 46), (47, 48))
NUM_CLASSES = len(SEMANTIC_IDS)

_ID_TO_INDEX = np.full(256, -1, np.int16)
_ID_TO_INDEX[list(SEMANTIC_IDS)] = np.arange(NUM_CLASSES)


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
  return STRUCTURE_NAMES.get(int(label), f"label_{int(label)}")

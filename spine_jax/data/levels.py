"""Vertebra level names and the label numbers that segmentation tools give them.

Masks from different tools number the same vertebra differently (SPINEPS: L1 = 20;
TotalSegmentator: L1 = 31), so everything that reports a level goes through here.
"""
from __future__ import annotations

import numbers
import re

SCHEMES = ('spineps', 'totalsegmentator')

# Cranio-caudal order; the transitional T13 and L6 sit where they occur anatomically.
LEVELS = (tuple(f'C{i}' for i in range(1, 8)) + tuple(f'T{i}' for i in range(1, 14))
          + tuple(f'L{i}' for i in range(1, 7)) + ('S1',))

_SPINEPS = {
    **{i: f'C{i}' for i in range(1, 8)},
    **{7 + i: f'T{i}' for i in range(1, 13)},
    **{19 + i: f'L{i}' for i in range(1, 7)},
    26: 'S1',
    28: 'T13',
}
# TotalSegmentator 'total' (v2): vertebrae_S1 = 26, then upward L5 = 27 ... C1 = 50.
_STANDARD = tuple(f'C{i}' for i in range(1, 8)) + tuple(f'T{i}' for i in range(1, 13)) + tuple(
    f'L{i}' for i in range(1, 6)) + ('S1',)
_TOTALSEGMENTATOR = {50 - k: level for k, level in enumerate(_STANDARD)}

_LABEL_TO_LEVEL = {'spineps': _SPINEPS, 'totalsegmentator': _TOTALSEGMENTATOR}
_LEVEL_TO_LABEL = {s: {v: k for k, v in m.items()} for s, m in _LABEL_TO_LEVEL.items()}
_INDEX = {level: i for i, level in enumerate(LEVELS)}
_REGIONS = {'C': 'cervical', 'T': 'thoracic', 'L': 'lumbar', 'S': 'sacral'}
_NAME = re.compile(r'^\s*([CTLS])\s*(\d+)\s*$', re.IGNORECASE)


class LevelError(ValueError):
  """An unknown level name, label number or numbering scheme."""


def _scheme(scheme: str) -> str:
  name = str(scheme).strip().lower()
  if name not in _LABEL_TO_LEVEL:
    raise LevelError(f'unknown label scheme {scheme!r}; expected one of {", ".join(SCHEMES)}')
  return name


def normalise_level(level: str) -> str:
  """Canonical spelling ('l 3' -> 'L3'); raises LevelError for names outside LEVELS."""
  match = _NAME.match(str(level))
  name = f'{match.group(1).upper()}{int(match.group(2))}' if match else None
  if name not in _INDEX:
    raise LevelError(f'unknown vertebra level {level!r}; expected one of {", ".join(LEVELS)}')
  return name


def _label_int(label) -> int:
  if isinstance(label, bool) or not isinstance(label, numbers.Real) or float(label) != int(label):
    raise LevelError(f'vertebra label must be an integer, got {label!r}')
  return int(label)


def label_to_level(label, scheme: str) -> str:
  """Level name of a mask label under a numbering scheme, e.g. (29, 'totalsegmentator') -> 'L3'."""
  table = _LABEL_TO_LEVEL[_scheme(scheme)]
  value = _label_int(label)
  if value not in table:
    raise LevelError(f'label {value} is not a vertebra in the {_scheme(scheme)} scheme '
                     f'(vertebra labels: {min(table)}..{max(table)}: {sorted(table)})')
  return table[value]


def level_to_label(level: str, scheme: str) -> int:
  """Mask label of a level under a numbering scheme, e.g. ('L1', 'spineps') -> 20."""
  name = normalise_level(level)
  table = _LEVEL_TO_LABEL[_scheme(scheme)]
  if name not in table:
    raise LevelError(f'level {name} has no label in the {_scheme(scheme)} scheme')
  return table[name]


def scheme_labels(scheme: str) -> dict[int, str]:
  """All vertebra labels of a scheme, {label: level}."""
  return dict(_LABEL_TO_LEVEL[_scheme(scheme)])


def level_index(level: str) -> int:
  """Cranio-caudal position (C1 = 0, ..., T12, T13, L1, ..., L6, S1): sort key for reports."""
  return _INDEX[normalise_level(level)]


def sort_levels(levels) -> list[str]:
  """Level names in cranio-caudal order, canonical spelling."""
  return sorted((normalise_level(v) for v in levels), key=level_index)


def level_region(level: str) -> str:
  """'cervical', 'thoracic', 'lumbar' or 'sacral'."""
  return _REGIONS[normalise_level(level)[0]]


def neighbour_level(level: str, step: int) -> str | None:
  """The standard level `step` positions caudal (positive) or cranial (negative), skipping T13 and L6.

  None beyond C1 or S1. Phantoms use it to label the vertebrae above and below.
  """
  name = normalise_level(level)
  order = _STANDARD if name in _STANDARD else LEVELS
  k = order.index(name) + step
  return order[k] if 0 <= k < len(order) else None


# What a vertebra mask's other labels may be without implying another numbering: SPINEPS instance masks
# also hold discs (100 + X) and endplates (200 + X); TotalSegmentator's 'total' task holds organs, ribs
# and other bones under every other number (1..117).
_SPINEPS_NON_VERTEBRA = range(100, 300)
_SPINEPS_SEMANTIC = (41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 60, 61, 62)


def split_mask_labels(present, scheme: str, source: str = 'mask') -> tuple[list[int], list[int]]:
  """(vertebra labels of `scheme`, every other label) of the labels present in a mask.

  A mask whose labels imply the other numbering is refused with a LevelError naming `source` and the
  labels, rather than read as wrong levels: under 'spineps', labels 29..99 are no SPINEPS vertebra
  (TotalSegmentator numbers vertebrae 26..50; a SPINEPS semantic mask holds 41..62); under
  'totalsegmentator', a mask without one of its vertebra labels but with SPINEPS ones.
  """
  name = _scheme(scheme)
  table = _LABEL_TO_LEVEL[name]
  present = sorted({int(v) for v in present if int(v) != 0})
  vertebrae = [v for v in present if v in table]
  others = [v for v in present if v not in table]
  if name == 'spineps':
    foreign = [v for v in others if v not in _SPINEPS_NON_VERTEBRA]
    if foreign:
      if set(foreign) <= set(_SPINEPS_SEMANTIC) and not vertebrae:
        hint = ('it looks like a SPINEPS semantic mask (structures, not vertebrae): give the instance mask '
                '(*_seg-vert_msk.nii.gz)')
      elif any(v in _TOTALSEGMENTATOR for v in foreign):
        hint = ('TotalSegmentator numbers vertebrae 26 (S1) .. 50 (C1): pass --scheme=totalsegmentator if the mask '
                'is TotalSegmentator\'s')
      else:
        hint = 'SPINEPS numbers vertebrae 1..28, discs 101..128 and endplates 201..228'
      raise LevelError(f'{source}: labels {foreign} are not SPINEPS vertebra ids, so the mask is not in the '
                       f'spineps numbering; {hint}')
  elif not vertebrae and any(v in _SPINEPS for v in others):
    raise LevelError(f'{source}: no TotalSegmentator vertebra label (26..50) but labels '
                     f'{[v for v in others if v in _SPINEPS]} in SPINEPS\' vertebra range: pass --scheme=spineps '
                     f'if the mask is SPINEPS\'')
  return vertebrae, others

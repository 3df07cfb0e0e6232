"""The labelling network's output groups and what each one's classes mean (SPINEPS 2.1.3,
`architectures/read_labels.py` and `phase_labeling.py`).

A labelling checkpoint names its heads; each head classifies one vertebra patch on its own axis:
VERT (24: C1..L5, a T13 counted as T12 and an L6 as L5), VERTEX / VERTEXACT (26: T13 and L6 as classes
of their own), VERTGRP (12 groups of neighbouring levels), REGION (cervical, thoracic, lumbar), VERTREL
(the boundary vertebrae of the regions), VERTT13 (a T13 or not; SPINEPS' training code spells it VT13)
and FULLYVISIBLE (cut by the field's edge, or whole). The level path turns them into one cost per
(vertebra, VERT or VERTEXACT class), so every consumer (training targets, the path, the converter)
reads the axes from here.

Levels are SPINEPS ids (data/levels.py): C1..C7 = 1..7, T1..T12 = 8..19, L1..L6 = 20..25, T13 = 28.
"""
from __future__ import annotations

import dataclasses

from spine_jax.data import levels as levels_lib

T13_ID = levels_lib.level_to_label('T13', 'spineps')  # 28
L1_ID = levels_lib.level_to_label('L1', 'spineps')  # 20
_LAST_CERVICAL_ID = levels_lib.level_to_label('C7', 'spineps')
_FIRST_THORACIC_ID = levels_lib.level_to_label('T1', 'spineps')
_T12_ID = levels_lib.level_to_label('T12', 'spineps')

# The 24-class axis (VertExact): index = id - 1 up to L5; T13 folds into T12, L6 into L5.
VERT_CLASSES = tuple(f'C{i}' for i in range(1, 8)) + tuple(f'T{i}' for i in range(1, 13)) + tuple(
    f'L{i}' for i in range(1, 6))
# The 26-class axis (VertExactClass): T13 after T12, L6 after L5.
VERTEXACT_CLASSES = VERT_CLASSES[:19] + ('T13',) + VERT_CLASSES[19:] + ('L6',)
# Per axis: the (cervical, thoracic, lumbar) class slices (phase_labeling's CERV/THOR/LUMB and their _EXACT twins).
REGION_SLICES = {len(VERT_CLASSES): (slice(0, 7), slice(7, 19), slice(19, 24)),
                 len(VERTEXACT_CLASSES): (slice(0, 7), slice(7, 20), slice(20, 26))}
REGIONS = ('cervical', 'thoracic', 'lumbar')
# VertGroup: neighbouring levels that look alike share a class; each holds VERT classes.
VERTGRP_CLASSES = ('C12', 'C345', 'C67', 'T12', 'T34', 'T567', 'T89', 'T1011', 'T123', 'L12', 'L34', 'L56')
VERTGRP_MEMBERS = ((0, 1), (2, 3, 4), (5, 6), (7, 8), (9, 10), (11, 12, 13), (14, 15), (16, 17), (18,), (19, 20),
                   (21, 22), (23,))
# VertRel: the boundary vertebrae.
VERTREL_CLASSES = ('nothing', 'last_cervical', 'first_thoracic', 'last_thoracic', 'first_lumbar', 'last_lumbar')
VERTT13_CLASSES = ('normal', 'T13')
FULLYVISIBLE_CLASSES = ('cut', 'visible')  # SPINEPS' `vert_cut` column: True -> [1, 0]; the path reads index 1

# Head names as phase_labeling reads them; VT13 is read_labels' name for VERTT13.
VERT, VERTEX, VERTEXACT, VERTGRP, REGION, VERTREL, VERTT13, FULLYVISIBLE = (
    'VERT', 'VERTEX', 'VERTEXACT', 'VERTGRP', 'REGION', 'VERTREL', 'VERTT13', 'FULLYVISIBLE')
HEAD_ALIASES = {'VT13': VERTT13}
HEAD_CLASSES = {VERT: VERT_CLASSES, VERTEX: VERTEXACT_CLASSES, VERTEXACT: VERTEXACT_CLASSES,
                VERTGRP: VERTGRP_CLASSES, REGION: REGIONS, VERTREL: VERTREL_CLASSES, VERTT13: VERTT13_CLASSES,
                FULLYVISIBLE: FULLYVISIBLE_CLASSES}
EXACT_HEADS = (VERTEX, VERTEXACT)
# A checkpoint needs one of these for the path to have a level axis (phase_labeling's "vital" heads).
VITAL_HEADS = (VERT, VERTEX, VERTEXACT, VERTGRP)


class HeadError(ValueError):
  """A head name or size the labelling phase does not know."""


def canonical_head(name: str) -> str:
  """A head's name as phase_labeling reads it (VT13 -> VERTT13); HeadError for an unknown one."""
  key = HEAD_ALIASES.get(str(name), str(name))
  if key not in HEAD_CLASSES:
    raise HeadError(f'unknown labelling head {name!r}; known: {", ".join([*HEAD_CLASSES, *HEAD_ALIASES])}')
  return key


def check_heads(heads) -> tuple[tuple[str, int], ...]:
  """((canonical name, classes), ...) of a model's heads; HeadError when a size is not its axis's or no
  head gives a level axis."""
  out = []
  for name, size in heads:
    key = canonical_head(name)
    if int(size) != len(HEAD_CLASSES[key]):
      raise HeadError(f'labelling head {name}: {size} classes, expected {len(HEAD_CLASSES[key])}')
    out.append((key, int(size)))
  if not any(key in VITAL_HEADS for key, _ in out):
    raise HeadError(f'no labelling head gives levels (one of {", ".join(VITAL_HEADS)}); heads: '
                    f'{", ".join(k for k, _ in out) or "none"}')
  return tuple(out)


def vert_class(vertebra_id: int) -> int:
  """The 24-class index (read_labels.vert_label_to_class): T13 -> T12, L6 -> L5."""
  return VERT_CLASSES.index('T12') if vertebra_id == T13_ID else min(len(VERT_CLASSES), vertebra_id) - 1


def vertexact_class(vertebra_id: int) -> int:
  """The 26-class index (read_labels.vert_label_to_exactclass)."""
  if vertebra_id == T13_ID:
    return VERTEXACT_CLASSES.index('T13')
  return min(24, vertebra_id - 1) if vertebra_id <= _T12_ID else min(25, vertebra_id)


def vertexact_to_id(index: int) -> int:
  """SPINEPS id of a 26-class index (phase_labeling.fpath_post_processing's exact branch)."""
  t13 = VERTEXACT_CLASSES.index('T13')
  return T13_ID if index == t13 else index + 1 if index < t13 else index


def region_class(vertebra_id: int) -> int:
  """0 cervical, 1 thoracic, 2 lumbar (read_labels.vert_class_to_region of the 24-class index)."""
  index = vert_class(vertebra_id)
  return next(r for r, s in enumerate(REGION_SLICES[len(VERT_CLASSES)]) if s.start <= index < s.stop)


def vertgrp_class(vertebra_id: int) -> int:
  index = vert_class(vertebra_id)
  return next(g for g, members in enumerate(VERTGRP_MEMBERS) if index in members)


def vertrel_class(vertebra_id: int, last_thoracic_id: int | None, last_lumbar_id: int | None) -> int:
  """read_labels.vert_label_to_vertrel: the boundary a vertebra sits at, given the patient's last thoracic
  (T11, T12 or T13 = 28) and last lumbar (L4, L5 or L6) ids; None where unknown."""
  if vertebra_id == _LAST_CERVICAL_ID:
    return VERTREL_CLASSES.index('last_cervical')
  if vertebra_id == _FIRST_THORACIC_ID:
    return VERTREL_CLASSES.index('first_thoracic')
  if last_thoracic_id is not None and vertebra_id == last_thoracic_id:
    return VERTREL_CLASSES.index('last_thoracic')
  if vertebra_id == L1_ID:
    return VERTREL_CLASSES.index('first_lumbar')
  if last_lumbar_id is not None and vertebra_id == last_lumbar_id:
    return VERTREL_CLASSES.index('last_lumbar')
  return VERTREL_CLASSES.index('nothing')


@dataclasses.dataclass(frozen=True)
class Anatomy:
  """What the targets need to know of a patient beyond one vertebra: the last thoracic and last lumbar ids."""
  last_thoracic_id: int | None
  last_lumbar_id: int | None

  @classmethod
  def of(cls, vertebra_ids) -> 'Anatomy':
    """From every vertebra id of the patient's spine (not only those in the field)."""
    ids = set(int(v) for v in vertebra_ids)
    thoracic = [v for v in ids if _FIRST_THORACIC_ID <= v <= _T12_ID or v == T13_ID]
    lumbar = [v for v in ids if L1_ID <= v <= levels_lib.level_to_label('L6', 'spineps')]
    last_thoracic = (T13_ID if T13_ID in thoracic else max(thoracic)) if thoracic else None
    return cls(last_thoracic, max(lumbar) if lumbar else None)


def targets(vertebra_id: int, anatomy: Anatomy, fully_visible: bool, heads) -> dict[str, int]:
  """The class index of every head for one vertebra (read_labels.get_vert_entry's columns)."""
  values = {VERT: vert_class(vertebra_id), VERTEX: vertexact_class(vertebra_id), VERTGRP: vertgrp_class(vertebra_id),
            REGION: region_class(vertebra_id),
            VERTREL: vertrel_class(vertebra_id, anatomy.last_thoracic_id, anatomy.last_lumbar_id),
            VERTT13: int(vertebra_id == T13_ID), FULLYVISIBLE: int(bool(fully_visible))}
  values[VERTEXACT] = values[VERTEX]
  return {name: values[canonical_head(name)] for name, _ in heads}

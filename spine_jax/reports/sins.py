"""Partial SINS (Spinal Instability Neoplastic Score, Fisher et al. 2010) from predictions.

The classifier predicts two of the six SINS components (bone lesion quality and
posterolateral involvement) and the vertebra's level gives a third (location).
Pain, alignment and collapse need the clinic or other images, so the report
gives the partial total and the range the full score could lie in.

A vertebra predicted normal has no lesion, and SINS scores lesions: its
partial total, range and categories are None / empty, never 0, so that a
healthy vertebra cannot be read as a 'stable' lesion. Its location points are
still reported, being a property of the level alone.
"""
import re

from spine_jax.data.classes import POSTEROLATERAL_CLASSES, QUALITY_CLASSES


LOCATION_POINTS = {'junctional': 3, 'mobile': 2, 'semi-rigid': 1, 'rigid': 0}
LESION_POINTS = {'normal': 0, 'blastic': 0, 'mixed': 1, 'lytic': 2}
POSTEROLATERAL_POINTS = {'none': 0, 'unilateral': 1, 'bilateral': 3}
# Components the classifier does not assess, with their (min, max) points.
MISSING_COMPONENTS = {'pain': (0, 3), 'alignment': (0, 4), 'collapse': (0, 3)}
# Upper bound of each category's total, in order of severity.
CATEGORIES = (('stable', 6), ('potentially unstable', 12), ('unstable', 18))

# Region letter -> ordered (first, last, category) spans of the standard levels.
_SPANS = {
    'C': ((1, 2, 'junctional'), (3, 6, 'mobile'), (7, 7, 'junctional')),
    'T': ((1, 2, 'junctional'), (3, 10, 'semi-rigid'), (11, 13, 'junctional')),
    'L': ((1, 1, 'junctional'), (2, 4, 'mobile'), (5, 6, 'junctional')),
    'S': ((1, 1, 'junctional'), (2, 5, 'rigid')),
}
_LEVEL = re.compile(r'^\s*([CTLS])\s*(\d+)\s*$', re.IGNORECASE)


def _parse_level(level):
  """(region letter, number) of a level name, e.g. ' t12' -> ('T', 12)."""
  match = _LEVEL.match(str(level))
  if match is None:
    raise ValueError(f'not a C/T/L/S vertebral level: {level!r}')
  return match.group(1).upper(), int(match.group(2))


def normalise_level(level):
  """Canonical spelling of a level name: ' t 12' -> 'T12'."""
  region, number = _parse_level(level)
  return f'{region}{number}'


def location_category(level):
  """SINS location class of a level name such as 'C2', 'T12', 'L5', 'S1'.

  Junctional: occiput–C2 (C1, C2), C7–T2, T11–L1, L5–S1; mobile: C3–C6,
  L2–L4; semi-rigid: T3–T10; rigid: S2–S5. The transitional levels T13 (a
  thirteenth thoracic vertebra, between T12 and L1) and L6 (a sixth lumbar,
  between L5 and the sacrum) sit inside the thoracolumbar and lumbosacral
  junctions, so both are junctional. Coccygeal and unknown names raise.
  """
  region, number = _parse_level(level)
  for first, last, category in _SPANS[region]:
    if first <= number <= last:
      return category
  raise ValueError(f'no SINS location for level {level!r}')


def location_points(level):
  """SINS location points: junctional 3, mobile 2, semi-rigid 1, rigid 0."""
  return LOCATION_POINTS[location_category(level)]


def _name(value, names, what):
  """Class name from an int index or a name (case-insensitive)."""
  if isinstance(value, str):
    name = value.strip().lower()
    if name not in names:
      raise ValueError(f'unknown {what} {value!r}; expected one of {names}')
    return name
  index = int(value)
  if not 0 <= index < len(names):
    raise ValueError(f'{what} index {value!r} outside [0, {len(names)})')
  return names[index]


def quality_name(quality):
  """'normal' | 'blastic' | 'mixed' | 'lytic' from an index 0..3 or a name."""
  return _name(quality, QUALITY_CLASSES, 'bone quality')


def posterolateral_name(posterolateral):
  """'none' | 'unilateral' | 'bilateral' from an index 0..2 or a name."""
  return _name(posterolateral, POSTEROLATERAL_CLASSES, 'posterolateral class')


def lesion_points(quality):
  """SINS bone-lesion points: lytic 2, mixed 1, blastic 0; normal 0 (no lesion, see `has_lesion`)."""
  return LESION_POINTS[quality_name(quality)]


def has_lesion(quality):
  """Whether the predicted quality is a lesion at all; SINS applies only then."""
  return quality_name(quality) != 'normal'


def posterolateral_points(posterolateral):
  """SINS posterolateral points: bilateral 3, unilateral 1, none 0."""
  return POSTEROLATERAL_POINTS[posterolateral_name(posterolateral)]


def sins_category(total):
  """'stable' (0–6), 'potentially unstable' (7–12) or 'unstable' (13–18)."""
  if not 0 <= total <= CATEGORIES[-1][1]:
    raise ValueError(f'SINS total {total} outside [0, {CATEGORIES[-1][1]}]')
  return next(name for name, upper in CATEGORIES if total <= upper)


def category_span(low, high):
  """The categories a total in [low, high] could fall in, least severe first."""
  names = [name for name, _ in CATEGORIES]
  return names[names.index(sins_category(low)):names.index(sins_category(high)) + 1]


def partial_sins(level, quality, posterolateral):
  """Partial SINS of one vertebra from its level and predicted classes.

  Returns a JSON-ready dict: level, quality, posterolateral (names),
  location_category, has_lesion, components {location, bone_lesion,
  posterolateral} points, not_assessed {pain, alignment, collapse: [min, max]},
  partial_total, total_range [partial + min missing, partial + max missing] and
  category_range (the categories that range spans). For a vertebra predicted
  normal, bone_lesion, partial_total and total_range are None and
  category_range is empty (no lesion, no SINS).
  """
  quality = quality_name(quality)
  posterolateral = posterolateral_name(posterolateral)
  lesion = has_lesion(quality)
  components = {
      'location': location_points(level),
      'bone_lesion': lesion_points(quality) if lesion else None,
      'posterolateral': posterolateral_points(posterolateral),
  }
  report = {
      'level': normalise_level(level),
      'quality': quality,
      'posterolateral': posterolateral,
      'location_category': location_category(level),
      'has_lesion': lesion,
      'components': components,
      'not_assessed': {name: list(bounds) for name, bounds in MISSING_COMPONENTS.items()},
      'partial_total': None,
      'total_range': None,
      'category_range': [],
  }
  if lesion:
    partial = sum(components.values())
    low = partial + sum(lo for lo, _ in MISSING_COMPONENTS.values())
    high = partial + sum(hi for _, hi in MISSING_COMPONENTS.values())
    report.update(partial_total=partial, total_range=[low, high], category_range=category_span(low, high))
  return report

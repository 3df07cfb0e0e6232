"""The CT classifier's classes, in index order, and the rules that decide a vertebra's class from its
slices' classes; data (the phantoms), models, metrics and reports all use these."""
from __future__ import annotations

import numpy as np

QUALITY_CLASSES = ('normal', 'blastic', 'mixed', 'lytic')
POSTEROLATERAL_CLASSES = ('none', 'unilateral', 'bilateral')
NORMAL, BLASTIC, MIXED, LYTIC = range(len(QUALITY_CLASSES))


def quality_from_counts(counts, normal_fraction=0.7, dominant_share=0.7):
  """Bone quality of one vertebra from its slice counts (normal, blastic, mixed, lytic).

  Normal if MORE than `normal_fraction` of the slices are normal. Otherwise the
  lesion slices decide, a mixed slice counting as both blastic and lytic:
  blastic share = (B + M) / (B + L + 2M), lytic share = (L + M) / (B + L + 2M);
  blastic if its share > dominant_share, lytic if its share > dominant_share,
  else mixed (so an all-mixed vertebra, share 0.5 each, is mixed, and a share
  of exactly dominant_share is mixed). A vertebra with no lesion slice is normal.
  """
  n, b, m, l = (int(c) for c in counts)
  total = n + b + m + l
  if total == 0:
    raise ValueError('a vertebra without slices has no decision')
  lesion_weight = b + l + 2 * m
  if n / total > normal_fraction or lesion_weight == 0:
    return NORMAL
  if (b + m) / lesion_weight > dominant_share:
    return BLASTIC
  if (l + m) / lesion_weight > dominant_share:
    return LYTIC
  return MIXED


def posterolateral_from_counts(counts, min_fraction=0.2):
  """Posterolateral involvement of one vertebra from its slice counts (none, unilateral, bilateral).

  The most severe class c in (bilateral, unilateral) such that MORE than
  `min_fraction` of the slices are predicted c or worse; none otherwise.
  Involvement of the pedicles and posterior elements shows only on the
  slices that cut through them, a minority of the vertebra's slices, so a
  majority vote would miss it; counting 'c or worse' lets bilateral slices
  support unilateral involvement. The threshold keeps a few stray slices from
  flagging a vertebra.
  """
  counts = np.asarray(counts, np.int64)
  total = counts.sum()
  if total == 0:
    raise ValueError('a vertebra without slices has no decision')
  at_least = np.cumsum(counts[::-1])[::-1]  # at_least[c] = slices predicted c or worse.
  for c in range(len(counts) - 1, 0, -1):
    if at_least[c] / total > min_fraction:
      return c
  return 0

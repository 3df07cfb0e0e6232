"""`joint_postprocess.split_endplates` (the rounds run on the endplate voxels, with each instance's chessboard
distance) equals SPINEPS' round-by-round form: every instance dilated once per round inside its box, the whole
volume updated (tests/inference/test_joint_postprocess_vs_spineps.py checks it against SPINEPS itself)."""
import numpy as np
import pytest
from scipy import ndimage

from spine_jax.inference.phase2 import joint_postprocess as jp
from spine_jax.data.spine_labels import ENDPLATE, ENDPLATE_INFERIOR, ENDPLATE_OFFSET, ENDPLATE_SUPERIOR

CUBE = np.ones((3, 3, 3), bool)


def _by_rounds(instances, endplate):
  out = np.zeros(endplate.shape, np.int64)
  total = int(endplate.sum())
  if not total:
    return out
  growers = [int(v) for v in np.unique(instances) if 0 < v < jp.SPLIT_ID_LIMIT]
  windows = {v: jp._box(instances == v, jp.MAX_ENDPLATE_DILATION) for v in growers}
  grown = {v: instances[windows[v]] == v for v in growers}
  claimed = lambda a: (a == ENDPLATE_INFERIOR) | (a == ENDPLATE_SUPERIOR)  # noqa: E731
  previous, old = 1, -1
  for _ in range(1, jp.MAX_ENDPLATE_DILATION):
    new = int(np.count_nonzero(claimed(out)))
    if (new == old and old != 0) or new == total:
      break
    old = new
    for v in growers:
      window = windows[v]
      grown[v] = ndimage.binary_dilation(grown[v], CUBE)
      here = out[window]
      plates = np.where(endplate[window] & grown[v] & ~claimed(here), instances[window], 0)
      named = np.where(plates == ENDPLATE_OFFSET + v, ENDPLATE_INFERIOR, plates)
      named = np.where(plates == ENDPLATE_OFFSET + previous, ENDPLATE_SUPERIOR, named)
      out[window] = here + named
      previous = v
  out[endplate & ~claimed(out)] += ENDPLATE
  return np.where(claimed(out) | (out == ENDPLATE), out, 0)


def _stack(rng, shape=(20, 90, 12), n=4, gap=3):
  """Vertebrae 3..3+n-1 stacked along I, endplates above (200 + the id above) and below (200 + X), noise ids among the
  plates (a disc id, a foreign endplate), and stray plate voxels far from any vertebra."""
  instances = np.zeros(shape, np.int32)
  row = 2
  for k in range(n):
    v = 3 + k
    h = int(rng.integers(8, 14))
    instances[3:17, row:row + 2] = ENDPLATE_OFFSET + v - 1  # the upper plate: the vertebra above's id
    instances[3:17, row + 2:row + h] = v
    instances[3:17, row + h:row + h + 2] = ENDPLATE_OFFSET + v
    instances[3:17, row + h + 2:row + h + 2 + gap] = 100 + v
    row += h + 2 + gap
  instances[rng.random(shape) < 0.01] = ENDPLATE_OFFSET + 30
  endplate = (instances >= ENDPLATE_OFFSET) & (rng.random(shape) < 0.9)
  endplate[0, :, 0] = True  # far from everything: never claimed
  endplate |= rng.random(shape) < 0.01
  return instances, endplate


@pytest.mark.parametrize('seed', range(6))
def test_same_as_the_round_by_round_form(seed):
  instances, endplate = _stack(np.random.default_rng(seed))
  got = jp.split_endplates(instances, endplate)
  np.testing.assert_array_equal(got, _by_rounds(instances, endplate))
  assert {ENDPLATE_INFERIOR, ENDPLATE_SUPERIOR} <= set(np.unique(got).tolist())


def test_no_endplate_and_no_grower():
  instances, endplate = _stack(np.random.default_rng(0))
  assert not jp.split_endplates(instances, np.zeros_like(endplate)).any()
  only_plates = np.where(instances >= ENDPLATE_OFFSET, instances, 0)
  np.testing.assert_array_equal(jp.split_endplates(only_plates, endplate), _by_rounds(only_plates, endplate))

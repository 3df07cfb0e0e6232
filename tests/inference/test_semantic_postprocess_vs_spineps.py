"""The 'spineps' post-processing mode against SPINEPS 2.1.3 itself, voxel for voxel: the worker's
`semantic_postprocess` runs phase_semantic.predict_semantic_mask (small components, bounding-box chain, hole
filling) with a stand-in model on the same masks. Inputs: phantom masks with noise (strays far and near,
specks, holes in bodies, discs, canal and cord), the TPTBox test MRI's mask with and without noise, random
small masks and hand-built corner cases. One oracle call per module fixture (each imports spineps, ~7 s).
Skips when the SPINEPS reference environment is absent (scripts/spineps_env.sh).
"""
import numpy as np
import pytest
from scipy import ndimage

from spine_jax.data import spatial
from spine_jax.data.phantoms import mri
from spine_jax.data.spine_labels import ARCUS, CANAL, CORD, CORPUS, DISC, SEMANTIC_IDS
from spine_jax.inference import semantic_postprocess as sp
from tests import spineps_oracle

REFERENCE = spatial.REFERENCE_SPACING  # (0.75, 0.75, 1.65) mm: box margin 4 voxels, I tolerance 4, 30 voxels
COARSE_ANISOTROPIC = (0.9, 0.8, 3.3)  # 3 mm / 0.8 = 3.75: box margin 3 (truncated), I tolerance 4 (rounded)
# Room beside the phantom spine (which fills its field) for strays far from it: voxels before/after per axis.
PAD = ((0, 40), (0, 0), (0, 12))
LABELS = np.array(SEMANTIC_IDS[1:])


def _ball(rng, max_radius: float) -> np.ndarray:
  radii = rng.uniform(0.5, max_radius, 3)
  half = np.ceil(radii).astype(int)
  grid = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
  return sum((g / r) ** 2 for g, r in zip(grid, radii)) <= 1.0


def _stamp(seg, centre, ball, value, only=None):
  """Writes `value` where the ball centred at `centre` (clipped to the array) lies, or on its `only` voxels."""
  low = np.asarray(centre) - np.asarray(ball.shape) // 2
  src = tuple(slice(max(0, -l), min(b, n - l)) for l, b, n in zip(low, ball.shape, seg.shape))
  region = seg[tuple(slice(l + s.start, l + s.stop) for l, s in zip(low, src))]
  hit = ball[src] if only is None else ball[src] & (region == only)
  region[hit] = value


def noisy(semantic, rng) -> np.ndarray:
  """The mask padded (PAD), with holes punched in bodies, discs, canal and cord, specks of any label on and
  near the spine, and blobs anywhere (far in the padding, near, or overlapping the spine's box)."""
  seg = np.pad(semantic, PAD)
  for label in (CORPUS, DISC, CANAL, CORD):
    voxels = np.argwhere(seg == label)
    for voxel in voxels[rng.choice(len(voxels), 8)]:
      _stamp(seg, voxel, _ball(rng, 2.5), 0, only=label)
  spine = np.argwhere(seg > 0)
  for voxel in spine[rng.choice(len(spine), 30)]:
    _stamp(seg, voxel + rng.integers(-3, 4, 3), _ball(rng, 3.0), rng.choice(LABELS))
  for _ in range(25):
    _stamp(seg, [rng.integers(0, n) for n in seg.shape], _ball(rng, 5.0), rng.choice(LABELS))
  return seg


def random_mask(seed: int) -> np.ndarray:
  """A small crowded mask: specks and blobs of every label, larger blobs of the filled labels, some
  touching the border, then holes."""
  rng = np.random.default_rng(seed)
  seg = np.zeros((22, 26, 14), np.uint8)
  for _ in range(30):
    _stamp(seg, [rng.integers(0, n) for n in seg.shape], _ball(rng, 3.0), rng.choice(LABELS))
  for _ in range(8):
    _stamp(seg, [rng.integers(0, n) for n in seg.shape], _ball(rng, 7.0), rng.choice(sp.SPINEPS_FILL_HOLE_LABELS))
  for _ in range(40):
    _stamp(seg, [rng.integers(0, n) for n in seg.shape], _ball(rng, 1.2), 0)
  return seg


def phantom(seed: int):
  spine = mri.make_spine(np.random.default_rng(seed), mri.smoke_config())
  return noisy(spine['semantic'], np.random.default_rng(100 + seed)), np.asarray(spine['spacing'], np.float32)


def tie():
  """Two largest pieces of equal size: SPINEPS keeps the first in C order (block A), drops B."""
  seg = np.zeros((30, 30, 20), np.uint8)
  seg[0:4, 20:24, 0:4] = CORPUS  # A: first in C order
  seg[20:24, 0:4, 0:4] = CORPUS  # B: first in Fortran order
  return seg, REFERENCE


def chain():
  """Boxes (grown 3 voxels) chain to the largest: ends meeting on P or R, or on I 4 voxels further apart."""
  seg = np.zeros((40, 60, 30), np.uint8)
  seg[10:20, 20:30, 10:20] = CORPUS  # the largest
  seg[26:29, 22:25, 12:15] = DISC  # 6 voxels after it on P: joins
  seg[35:38, 22:25, 12:15] = DISC  # 6 after that one, 15 after the largest: joins through it
  seg[12:15, 22:25, 27:30] = DISC  # 7 voxels after it on R: dropped
  seg[12:15, 40:43, 12:15] = DISC  # 10 voxels after it on I: joins
  seg[12:15, 6:9, 12:15] = DISC  # 11 voxels before it on I: dropped
  return seg, COARSE_ANISOTROPIC


def cord_fragment():
  """A cord piece inside a closed canal, with a gap: SPINEPS fills the canal first, so the gap becomes canal."""
  seg = np.zeros((20, 30, 20), np.uint8)
  seg[4:16, 4:26, 4:16] = CANAL
  seg[7:13, 8:22, 7:13] = CORD
  seg[9:11, 14:16, 9:11] = 0  # 8 voxels
  return seg, REFERENCE


def edge_pocket():
  """A background voxel on the array's edge, walled in by the body: fill_voids (SPINEPS) fills it, though
  it touches the border."""
  seg = np.zeros((12, 12, 12), np.uint8)
  seg[0:6, 0:6, 2:8] = CORPUS
  seg[0, 0, 5] = 0
  return seg, REFERENCE


def no_background():
  """No zero anywhere: SPINEPS' small-component step skips the mask, so the specks stay."""
  seg = np.full((8, 8, 8), CORPUS, np.uint8)
  seg[2, 2, 2:4] = ARCUS
  seg[5, 5, 5] = DISC
  return seg, REFERENCE


def only_specks():
  """Nothing but small pieces: cleaning leaves an empty mask, on which SPINEPS' box step raises."""
  seg = np.zeros((12, 12, 12), np.uint8)
  seg[2, 2, 2:5] = ARCUS
  seg[8:10, 8, 8] = DISC
  return seg, REFERENCE


BUILT = {'tie': tie, 'chain': chain, 'cord_fragment': cord_fragment, 'edge_pocket': edge_pocket,
         'no_background': no_background, 'only_specks': only_specks,
         'empty': lambda: (np.zeros((6, 7, 8), np.uint8), REFERENCE),
         **{f'phantom_{s}': (lambda s=s: phantom(s)) for s in (0, 1)},
         **{f'random_{s}': (lambda s=s, spacing=spacing: (random_mask(s), spacing))
            for s, spacing in enumerate((REFERENCE, COARSE_ANISOTROPIC, (1.5, 1.5, 1.5)))}}
NAMES = [*BUILT, 'tptbox', 'tptbox_noisy']


@pytest.fixture(scope='module')
def cases():
  """name -> (PIR mask, spacing in mm) for every case."""
  reason = spineps_oracle.available()
  if reason:
    pytest.skip(reason)
  out = {name: build() for name, build in BUILT.items()}
  test_mri = spineps_oracle.call('worker.test_mri', {}, orientation=['P', 'I', 'R'])
  out['tptbox'] = (test_mri['semantic'], test_mri['zoom'])
  out['tptbox_noisy'] = (noisy(test_mri['semantic'], np.random.default_rng(7)), test_mri['zoom'])
  return out


def _spineps(cases, **flags):
  return spineps_oracle.call('worker.semantic_postprocess', {name: mask for name, (mask, _) in cases.items()},
                             zooms={name: np.asarray(z, np.float64) for name, (_, z) in cases.items()}, **flags)


@pytest.fixture(scope='module')
def spineps_full(cases):
  return _spineps(cases)


@pytest.fixture(scope='module')
def spineps_fill_only(cases):
  return _spineps(cases, proc_clean_small_cc_artifacts=False, proc_clean_beyond_largest_bounding_box=False)


def _differing(ours, reference) -> int:
  assert ours.shape == reference.shape
  return int(np.count_nonzero(ours != reference))


@pytest.mark.parametrize('name', [n for n in NAMES if n != 'only_specks'])
def test_clean_up_matches_spineps(name, cases, spineps_full):
  mask, spacing = cases[name]
  ours = sp.postprocess_semantic(mask, spacing, sp.default_postprocess_config(sp.SPINEPS_MODE))
  jax_mode = sp.postprocess_semantic(mask, spacing)
  differing = _differing(ours, spineps_full[name])
  print(f'{name}: {mask.shape}, {np.count_nonzero(mask != spineps_full[name])} voxels changed by SPINEPS, '
        f'{differing} differ from it; the spine_jax mode differs in {_differing(jax_mode, spineps_full[name])}')
  assert differing == 0


@pytest.mark.parametrize('name', NAMES)
def test_hole_filling_matches_spineps(name, cases, spineps_fill_only):
  mask, spacing = cases[name]
  ours = sp.postprocess_spineps(mask, spacing, remove_small=False, chain_boxes=False)
  correct = sp.fill_holes(mask, sp.SPINEPS_FILL_HOLE_LABELS)  # scipy's holes, in SPINEPS' order
  differing = _differing(ours, spineps_fill_only[name])
  print(f'{name}: {np.count_nonzero(mask != ours)} voxels filled, {differing} differ from SPINEPS; '
        f'fill_voids quirk: {_differing(correct, ours)} voxels')
  assert differing == 0


def test_spineps_raises_where_cleaning_empties_the_mask(cases, spineps_full):
  assert 'ValueError' in str(spineps_full['only_specks/error'])
  mask, spacing = cases['only_specks']
  assert not sp.postprocess_semantic(mask, spacing, sp.default_postprocess_config(sp.SPINEPS_MODE)).any()


def test_spineps_choices_and_defects_as_measured(cases, spineps_full):
  """What the hand-built cases show SPINEPS doing, and how the spine_jax mode differs."""
  seg, _ = cases['tie']
  assert np.array_equal(spineps_full['tie'][0:4, 20:24, 0:4], seg[0:4, 20:24, 0:4])
  assert not spineps_full['tie'][20:24].any()
  seg, _ = cases['chain']
  dropped = np.zeros(seg.shape, bool)
  dropped[12:15, 22:25, 27:30] = dropped[12:15, 6:9, 12:15] = True
  assert np.array_equal(spineps_full['chain'], np.where(dropped, 0, seg))
  # Defect: canal filled before cord, a gap in a cord piece becomes canal (8 voxels); spine_jax keeps it cord.
  gap = (slice(9, 11), slice(14, 16), slice(9, 11))
  assert np.all(spineps_full['cord_fragment'][gap] == CANAL)
  assert np.all(sp.postprocess_semantic(*cases['cord_fragment'])[gap] == CORD)
  # Defect: fill_voids fills a background voxel on the array's edge (1 voxel); spine_jax leaves it.
  assert spineps_full['edge_pocket'][0, 0, 5] == CORPUS
  assert sp.postprocess_semantic(*cases['edge_pocket'])[0, 0, 5] == 0
  # No background: nothing is cleaned.
  assert np.array_equal(spineps_full['no_background'], cases['no_background'][0])


def test_fill_voids_fill_is_fill_voids():
  """fill_voids_fill against fill_voids itself on random binary arrays of every small shape and density."""
  reason = spineps_oracle.available()
  if reason:
    pytest.skip(reason)
  rng = np.random.default_rng(0)
  masks = {f'm{i}': rng.random(tuple(rng.integers(1, 12, 3))) < rng.uniform(0.2, 0.8) for i in range(300)}
  reference = spineps_oracle.call('worker.fill_voids', masks)
  differing = sum(_differing(sp.fill_voids_fill(m), reference[k]) for k, m in masks.items())
  quirk = sum(_differing(sp.fill_voids_fill(m), ndimage.binary_fill_holes(m)) for m in masks.values())
  print(f'{len(masks)} arrays: {differing} voxels differ from fill_voids; it fills {quirk} that touch the border')
  assert differing == 0

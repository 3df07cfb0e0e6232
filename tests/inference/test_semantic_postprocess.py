"""Phase-1 post-processing on hand-built PIR masks with known answers."""
import numpy as np
import pytest
from scipy import ndimage

from spine_jax.inference import semantic_postprocess as sp

SPACING = (0.75, 0.75, 1.65)


def test_remove_small_components_by_size_and_label():
  seg = np.zeros((30, 30, 30), np.int16)
  seg[0:4, 0:4, 0:4] = 49  # 64 voxels: kept
  seg[10:13, 10:13, 10:13] = 49  # 27 < 30: removed
  seg[20:25, 20:23, 20:22] = 100  # exactly 30: kept
  seg[25:27, 0:2, 0:2] = 60  # 8 voxels, but the cord is not cleaned
  seg[0:3, 20:23, 0:3] = 26  # sacrum: not cleaned either
  out = sp.remove_small_components(seg)
  expected = seg.copy()
  expected[10:13, 10:13, 10:13] = 0
  assert np.array_equal(out, expected)
  assert np.count_nonzero(seg == 49) == 64 + 27  # input untouched


def test_small_component_connectivity():
  seg = np.zeros((12, 12, 12), np.int16)
  seg[0:3, 0:3, 0:3] = 41
  seg[3:6, 3:6, 3:6] = 41  # touches the first block only at a corner
  assert np.count_nonzero(sp.remove_small_components(seg, connectivity=6)) == 0  # two pieces of 27
  assert np.array_equal(sp.remove_small_components(seg, connectivity=26), seg)  # one piece of 54
  with pytest.raises(ValueError, match='connectivity'):
    sp.remove_small_components(seg, connectivity=8)


def test_margin_voxels():
  assert sp.margin_voxels(SPACING, 3.0).tolist() == [4, 4, 2]
  assert sp.margin_voxels((0.6, 1.0, 2.0), 3.0).tolist() == [5, 3, 2]  # 3 / 0.6 is 5.000000000000001


def test_keep_largest_component_bbox_with_margin():
  seg = np.zeros((40, 50, 20), np.int16)
  seg[10:20, 10:30, 5:10] = 49  # the largest piece; box grows by 4, 4, 2 voxels
  seg[0:2, 0:2, 0:2] = 41  # far away: removed
  seg[6, 15, 7] = 61  # 4 voxels before the box on axis 0: inside the margin
  seg[5, 20, 7] = 61  # 5 voxels before: outside
  seg[15, 20, 3] = 100  # 2 voxels before on axis 2 (1.65 mm voxels): inside
  seg[15, 25, 2] = 100  # 3 voxels before: outside
  seg[15, 33, 11] = 60  # 4 and 2 voxels after the box on axes 1 and 2: inside
  out = sp.keep_largest_component_bbox(seg, SPACING, margin_mm=3.0)
  expected = seg.copy()
  for index in [(0, 0, 0), (5, 20, 7), (15, 25, 2)]:
    expected[index] = 0
  expected[0:2, 0:2, 0:2] = 0
  assert np.array_equal(out, expected)
  assert sp.largest_component_bbox(seg, SPACING) == (slice(6, 24), slice(6, 34), slice(3, 12))


def test_keep_largest_component_bbox_edge_cases():
  empty = np.zeros((5, 5, 5), np.int16)
  assert np.array_equal(sp.keep_largest_component_bbox(empty, SPACING), empty)
  seg = np.zeros((10, 10, 10), np.int16)
  seg[0:6, 0:6, 0:6] = 49
  seg[7:9, 7:9, 7:9] = 100  # smaller, but within the margin
  assert np.array_equal(sp.keep_largest_component_bbox(seg, (1.0, 1.0, 1.0), margin_mm=3.0), seg)
  # Diagonal contact joins pieces under 26-connectivity (SPINEPS' choice): one piece, one box.
  seg = np.zeros((20, 20, 20), np.int16)
  seg[0:5, 0:5, 0:5] = 49
  seg[5:9, 5:9, 5:9] = 100
  assert np.array_equal(sp.keep_largest_component_bbox(seg, (1.0, 1.0, 1.0), margin_mm=0.0), seg)
  assert np.count_nonzero(sp.keep_largest_component_bbox(seg, (1.0, 1.0, 1.0), 0.0, connectivity=6) == 100) == 0


def test_fill_holes_fills_only_background():
  seg = np.zeros((20, 20, 20), np.int16)
  seg[2:9, 2:9, 2:9] = 49
  seg[4:7, 4:7, 4:7] = 0  # closed cavity of 27 voxels
  seg[5, 5, 5] = 60  # another label inside it stays
  seg[11:18, 2:9, 2:9] = 41  # closed cavity in a label that is not filled
  seg[13:16, 4:7, 4:7] = 0
  seg[2:9, 11:18, 2:9] = 100  # a cup: its cavity opens to the outside
  seg[4:7, 13:16, 4:9] = 0
  out = sp.fill_holes(seg)
  expected = seg.copy()
  expected[4:7, 4:7, 4:7] = 49
  expected[5, 5, 5] = 60
  assert np.array_equal(out, expected)


def test_fill_holes_3d_versus_per_sagittal_slice():
  seg = np.zeros((9, 9, 6), np.int16)
  seg[2:7, 2:7, :] = 61  # a tube along axis 2, open at both ends
  seg[3:6, 3:6, :] = 0
  assert np.array_equal(sp.fill_holes(seg), seg)  # in 3D its lumen reaches the border
  filled = sp.fill_holes(seg, slice_axis=sp.SAGITTAL_AXIS)  # in every sagittal slice it is a ring
  assert np.all(filled[2:7, 2:7, :] == 61) and np.count_nonzero(filled) == 25 * 6


def test_fill_holes_inner_label_first():
  """The cord (60) lies inside the canal (61): a gap in the cord stays cord because 60 comes first."""
  seg = np.zeros((11, 11, 11), np.int16)
  seg[1:10, 1:10, 1:10] = 61
  seg[3:8, 3:8, 3:8] = 60
  seg[5, 5, 5] = 0  # inside the cord (and so inside the canal too)
  seg[2, 5, 5] = 0  # between the cord and the canal wall
  out = sp.fill_holes(seg)
  assert out[5, 5, 5] == 60 and out[2, 5, 5] == 61
  assert sp.fill_holes(seg, labels=(61, 60))[5, 5, 5] == 61  # the other order: the canal claims both


def test_postprocess_semantic_runs_the_steps_in_order():
  cfg = sp.default_postprocess_config()
  assert cfg.min_component_voxels == 30 and cfg.bbox_margin_mm == 3.0
  assert tuple(cfg.small_component_labels) == (41, 42, 43, 44, 45, 46, 47, 48, 49, 61, 100)
  assert tuple(cfg.fill_hole_labels) == (49, 60, 61, 100)
  seg = np.zeros((40, 40, 20), np.int16)
  seg[5:25, 5:25, 5:15] = 49
  seg[10:15, 10:15, 8:11] = 0  # cavity: filled last
  seg[30:36, 30:36, 15:20] = 60  # big, but outside the largest piece's box: cropped
  seg[26, 26, 16] = 42  # a speck inside the margin: removed as small, not by the crop
  seg[0:2, 0:2, 0:2] = 26  # a sacrum speck outside the box: cropped
  out = sp.postprocess_semantic(seg, SPACING, cfg)
  expected = np.zeros_like(seg)
  expected[5:25, 5:25, 5:15] = 49
  assert np.array_equal(out, expected)
  cfg.crop_to_largest_component = False
  cfg.fill_holes = False
  out = sp.postprocess_semantic(seg, SPACING, cfg)
  kept = seg.copy()
  kept[26, 26, 16] = 0
  assert np.array_equal(out, kept)
  cfg.remove_small_components = False
  out = sp.postprocess_semantic(seg, SPACING, cfg)
  assert np.array_equal(out, seg) and out is not seg


def test_mode_is_spine_jax_unless_asked():
  assert sp.default_postprocess_config().mode == 'spine_jax'
  assert sp.default_postprocess_config('spineps').mode == 'spineps'
  with pytest.raises(ValueError, match='mode'):
    sp.default_postprocess_config('nnunet')
  seg = np.zeros((30, 30, 30), np.int16)
  seg[5:20, 5:20, 5:20] = 49
  seg[25:28, 5:10, 5:10] = 100  # 5 voxels after the body on axis 0: beyond spine_jax's box (4), SPINEPS' boxes meet
  old = sp.default_postprocess_config()
  del old['mode']  # a config written before the field existed
  assert np.array_equal(sp.postprocess_semantic(seg, SPACING, old), sp.postprocess_semantic(seg, SPACING))
  assert np.count_nonzero(sp.postprocess_semantic(seg, SPACING) == 100) == 0
  assert np.array_equal(sp.postprocess_semantic(seg, SPACING, sp.default_postprocess_config('spineps')), seg)


def test_spineps_thresholds_follow_its_rounding():
  assert sp.spineps_min_component_voxels(SPACING) == 30
  assert sp.spineps_min_component_voxels(np.float32(SPACING)) == 30  # float32 spacing as the volumes hold it
  assert sp.spineps_min_component_voxels((1.5, 1.5, 1.5)) == 8  # 27.84 mm3 / 3.375 mm3
  assert sp.spineps_box_margins(SPACING) == (4, 4)
  assert sp.spineps_box_margins((0.9, 0.8, 3.3)) == (3, 4)  # 3.75 voxels: truncated for the box, rounded for I
  assert sp.spineps_box_margins((0.7505, 0.7505, 1.65)) == (3, 4)  # a kept grid: 3.997 voxels


def test_chained_components_grow_through_neighbours_and_along_inferior():
  starts = np.array([[0, 0, 0], [10, 0, 0], [20, 0, 0], [0, 14, 0], [20, 15, 0]])
  stops = np.array([[10, 10, 10], [20, 10, 10], [30, 10, 10], [10, 20, 10], [30, 20, 10]])
  # 1 meets 0 (ends touch), 2 meets 1; on I, 0's box reaches 10 + 4: 3 starts there; 4 starts 1 after 2's reach.
  assert sp.chained_components(starts, stops, seed=0, tolerance=4).tolist() == [True, True, True, True, False]
  assert sp.chained_components(starts, stops, seed=4, tolerance=4).tolist() == [False, False, False, False, True]
  assert sp.chained_components(starts, stops, seed=4, tolerance=5).tolist() == [True] * 5


def test_spineps_box_clean_keeps_whole_components():
  seg = np.zeros((40, 40, 20), np.int16)
  seg[14:30, 10:30, 5:15] = 49
  seg[31:40, 12:14, 8:10] = 41  # meets the body's box but reaches far beyond it: kept whole
  seg[0:3, 35:40, 0:2] = 100  # 10 voxels before the body on axis 0: dropped
  out = sp.spineps_bounding_box_clean(seg, SPACING)
  expected = seg.copy()
  expected[0:3, 35:40, 0:2] = 0
  assert np.array_equal(out, expected)
  assert np.count_nonzero(sp.keep_largest_component_bbox(seg, SPACING) == 41) < np.count_nonzero(seg == 41)


def test_fill_voids_fill_misses_edge_pockets():
  """fill_voids seeds runs of each face scanned in Fortran order without breaking them at row ends: a
  background voxel on an edge, walled in, is filled though it touches the border."""
  mask = np.zeros((7, 7, 8), bool)
  mask[0:6, 0:6, 1:7] = True
  mask[0, 0, 4] = False  # on faces 0 and 1; the scans reach it right after background row ends
  mask[2, 0, 4] = False  # on face 1 only, after a foreground voxel: seeded
  mask[3, 3, 3] = False  # a true hole
  filled = sp.fill_voids_fill(mask)
  assert filled[0, 0, 4] and not filled[2, 0, 4] and filled[3, 3, 3]
  expected = ndimage.binary_fill_holes(mask)  # scipy: holes are what does not reach the border
  expected[0, 0, 4] = True
  assert np.array_equal(filled, expected)


def test_spineps_fill_order_puts_the_canal_first():
  seg = np.zeros((11, 11, 11), np.int16)
  seg[1:10, 1:10, 1:10] = 61
  seg[3:8, 3:8, 3:8] = 60
  seg[5, 5, 5] = 0
  assert sp.postprocess_spineps(seg, SPACING, remove_small=False, chain_boxes=False)[5, 5, 5] == 61
  assert sp.postprocess_semantic(seg, SPACING)[5, 5, 5] == 60

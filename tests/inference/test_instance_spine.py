"""SPINEPS phase 2 on hand-built PIR spines with known instances: centres, consolidation, labelling, the whole phase.

A toy spine is a stack of box vertebrae along axis 1 (inferior): body (49) between two endplate
rows (62), an arch (41) behind it with a spinous process (42) and four articular processes
(45..48), discs (100) between the vertebrae and a canal strip (61). Its reference instance map
follows the phantoms: vertebra X on 41..49, 200 + X on its endplates, 100 + X on the disc below.
An oracle network (`oracle_lib.oracle_predict_fn`) answers every cutout from that map, so phase 2
must give the reference back exactly.
"""
import logging

import numpy as np
import pytest

from spine_jax.inference.phase2 import common as phase2_common

from spine_jax.inference.phase2 import centres as body_centres

from spine_jax.inference.phase2 import cutouts as cutout_lib

from spine_jax.inference.phase2 import oracle as oracle_lib

from spine_jax.inference.phase2 import consolidation

from spine_jax.inference.phase2 import labelling

from spine_jax.inference.phase2 import pipeline as phase2
from spine_jax.metrics import instances as inst_metrics

BODY_ROWS, DISC_ROWS, MARGIN = 12, 4, 4
PITCH = BODY_ROWS + DISC_ROWS
SHAPE_P, SHAPE_R = 24, 12
CUTOUT = (32, 48, 16)  # sees both neighbours whole (+-24 rows > PITCH + BODY_ROWS / 2), past every edge
SMALL = dict(min_voxels=20)  # a toy body erodes to 6 x 4 x 4 = 96 voxels


def stacked_spine(n=3, first_id=20, *, sacrum=False, fuse=None, drop_body=None):
  """(semantic uint8, reference int16) of `n` toy vertebrae numbered from `first_id`, top to bottom.

  `fuse=k`: a 6 x 6 column of bone through the disc under vertebra k joins the two bodies.
  `drop_body=k`: vertebra k has no body or endplates (its arch stays). `sacrum`: a sacrum block under the last disc.
  """
  rows = 2 * MARGIN + n * BODY_ROWS + (n - 1) * DISC_ROWS + (BODY_ROWS + DISC_ROWS if sacrum else 0)
  sem = np.zeros((SHAPE_P, rows, SHAPE_R), np.uint8)
  ref = np.zeros(sem.shape, np.int16)
  sem[0:2, :, 4:8] = 61
  for k in range(n):
    vid, y = first_id + k, MARGIN + k * PITCH

    def put(label, p, r, dy, value=vid):
      sem[p[0]:p[1], y + dy[0]:y + dy[1], r[0]:r[1]] = label
      ref[p[0]:p[1], y + dy[0]:y + dy[1], r[0]:r[1]] = value

    put(41, (8, 12), (2, 10), (2, BODY_ROWS - 2))
    put(42, (2, 8), (5, 7), (3, 8))
    put(45, (8, 10), (0, 2), (1, 4))
    put(46, (8, 10), (10, 12), (1, 4))
    put(47, (8, 10), (0, 2), (BODY_ROWS - 3, BODY_ROWS))
    put(48, (8, 10), (10, 12), (BODY_ROWS - 3, BODY_ROWS))
    if k != drop_body:
      put(49, (12, 20), (2, 10), (1, BODY_ROWS - 1))
      put(62, (12, 20), (2, 10), (0, 1), 200 + vid)
      put(62, (12, 20), (2, 10), (BODY_ROWS - 1, BODY_ROWS), 200 + vid)
    if k < n - 1 or sacrum:
      put(100, (12, 20), (2, 10), (BODY_ROWS, PITCH), 100 + vid)
  if sacrum:
    y = MARGIN + n * PITCH
    sem[12:20, y:y + BODY_ROWS, 2:10] = 26
    sem[8:12, y:y + BODY_ROWS, 2:10] = 26
    ref[sem == 26] = 26
  if fuse is not None:
    y = MARGIN + fuse * PITCH
    sem[13:19, y + BODY_ROWS - 2:y + PITCH + 2, 3:9] = 49
    ref[13:19, y + BODY_ROWS - 2:y + BODY_ROWS, 3:9] = first_id + fuse
    ref[13:19, y + BODY_ROWS:y + PITCH + 2, 3:9] = first_id + fuse + 1
  return sem, ref


def run_phase(sem, ref, centres=None, **label_kwargs):
  """Phase 2 with the oracle network and toy thresholds: (instance mask, messages)."""
  cfg = phase2_common.default_instance_config()
  cfg.cutout_size, cfg.batch_size, cfg.min_body_voxels, cfg.min_instance_voxels = CUTOUT, 2, 20, 50
  for key, value in label_kwargs.items():
    setattr(cfg, key, value)
  if centres is None:
    centres, _ = body_centres.vertebral_body_centres(sem, min_voxels=20)
  return phase2.segment_instances(sem, oracle_lib.oracle_predict_fn(sem, ref, centres, CUTOUT), cfg)


def body_ids(ref, centres):
  return [int(ref[tuple(c)]) for c in centres]


# ---------------------------------------------------------------------------------------------
# Centres


def test_centres_bottom_to_top_inside_each_body():
  sem, ref = stacked_spine(4)
  centres, messages = body_centres.vertebral_body_centres(sem, **SMALL)
  assert messages == []
  assert centres.dtype == np.int64 and centres.shape == (4, 3)
  assert body_ids(ref, centres) == [23, 22, 21, 20]
  assert all(sem[tuple(c)] == 49 for c in centres)
  assert np.all(np.diff(centres[:, 1]) < 0)  # bottom (large I) first


def test_small_bodies_dropped_and_thresholds_scale_with_spacing():
  sem, _ = stacked_spine(2)
  assert len(body_centres.vertebral_body_centres(sem, min_voxels=96)[0]) == 2
  assert len(body_centres.vertebral_body_centres(sem, min_voxels=97)[0]) == 0
  # At twice the voxel volume 97 reference voxels are 48 of these: the bodies count again.
  assert len(body_centres.vertebral_body_centres(sem, (0.75, 1.5, 1.65), min_voxels=97)[0]) == 2
  assert phase2_common.scaled_voxel_count(250, (1.5, 1.5, 1.65)) == 62
  assert phase2_common.scaled_distance(10, (1.5, 1.5, 1.65)) == pytest.approx(5.0)


def test_merged_bodies_are_split():
  sem, ref = stacked_spine(5, fuse=1)  # bodies of vertebrae 21 and 22 joined through their disc
  no_split, _ = body_centres.vertebral_body_centres(sem, detect_merged=False, **SMALL)
  assert len(no_split) == 4
  centres, messages = body_centres.vertebral_body_centres(sem, **SMALL)
  assert body_ids(ref, centres) == [24, 23, 22, 21, 20]
  assert any('fused' in m and 'split in two' in m for m in messages)


def test_fused_bodies_that_never_separate_are_reported():
  sem, _ = stacked_spine(5, fuse=1)
  centres, messages = body_centres.vertebral_body_centres(sem, max_split_erosions=0, **SMALL)
  assert len(centres) == 4
  assert any('could not be separated' in m for m in messages)


def test_body_broken_in_two_pieces_at_one_height_is_one_centre():
  sem, ref = stacked_spine(3)
  y = MARGIN + PITCH
  sem[12:20, y + 1:y + BODY_ROWS - 1, 5:7] = 0  # a sagittal cleft splits the middle body left / right
  pieces, _ = body_centres._body_components(sem, (0.75, 0.75, 1.65), 0, 20)
  assert len(np.unique(pieces[:, y:y + BODY_ROWS])) == 3  # background and two halves
  centres, messages = body_centres.vertebral_body_centres(sem, erosion=0, **SMALL)
  assert body_ids(ref, centres) == [22, 21, 20]
  assert any('taken as one body' in m for m in messages)


def test_body_sliver_cut_by_the_field_edge_gets_a_centre_but_a_body_rim_does_not():
  sem, ref = stacked_spine(3)
  top = MARGIN + BODY_ROWS - 3  # the field starts 2 body rows above vertebra 20's lower endplate
  sem, ref = sem[:, top:], ref[:, top:]
  assert np.count_nonzero(sem[:, :2] == 49) == 128  # 2 rows of 8 x 8 at the top edge
  plain, _ = body_centres.vertebral_body_centres(sem, edge_bodies=False, **SMALL)
  assert body_ids(ref, plain) == [22, 21]  # the erosion removed the sliver
  centres, messages = body_centres.vertebral_body_centres(sem, **SMALL)
  assert body_ids(ref, centres) == [22, 21, 20]
  assert centres[-1][1] < 2 and messages == []
  # Too small to count: one row of 4 x 4.
  tiny = sem.copy()
  tiny[:, :2][tiny[:, :2] == 49] = 0
  tiny[14:18, 0, 4:8] = 49
  assert body_ids(ref, body_centres.vertebral_body_centres(tiny, **SMALL)[0]) == [22, 21]
  # A whole body that touches the edge: what the erosion takes off its rim is not a second body.
  whole, ref_whole = stacked_spine(3)
  whole, ref_whole = whole[:, MARGIN:], ref_whole[:, MARGIN:]
  assert body_ids(ref_whole, body_centres.vertebral_body_centres(whole, **SMALL)[0]) == [22, 21, 20]


def test_phase_two_finds_the_vertebra_cut_by_the_field_edge():
  sem, ref = stacked_spine(3)
  sem, ref = sem[:, MARGIN + BODY_ROWS - 3:], ref[:, MARGIN + BODY_ROWS - 3:]
  out, _ = run_phase(sem, ref)
  assert sorted(int(v) for v in np.unique(out) if 0 < v < 100) == [1, 2, 3]
  assert np.array_equal(out[ref == 20], np.full(np.count_nonzero(ref == 20), 1, out.dtype))


def test_split_fused_body_parts():
  mask = np.zeros((10, 30, 10), bool)
  mask[1:9, 2:12, 1:9] = True
  mask[1:9, 16:26, 1:9] = True
  mask[3:7, 12:16, 3:7] = True  # a narrow bridge
  parts = body_centres.split_fused_body(mask)
  assert set(np.unique(parts[mask]).tolist()) == {1, 2}
  assert np.array_equal(parts > 0, mask)
  upper, lower = np.unique(parts[:, 2:12]), np.unique(parts[:, 16:26])
  assert len(upper[upper > 0]) == 1 and len(lower[lower > 0]) == 1 and upper[-1] != lower[-1]
  assert body_centres.split_fused_body(np.ones((6, 6, 6), bool)) is None  # a cube never falls apart
  assert body_centres.split_fused_body(np.zeros((4, 4, 4), bool)) is None


def test_no_body_and_single_body_messages(caplog):
  sem, _ = stacked_spine(3, drop_body=None)
  sem[sem == 49] = 0
  with caplog.at_level(logging.WARNING, logger=phase2_common.logger.name):
    centres, messages = body_centres.vertebral_body_centres(sem, **SMALL)
  assert centres.shape == (0, 3)
  assert len(messages) == 1 and 'no vertebral body' in messages[0]
  assert 'no vertebral body' in caplog.text
  sem, _ = stacked_spine(1)
  centres, messages = body_centres.vertebral_body_centres(sem, **SMALL)
  assert len(centres) == 1 and any('single vertebral body' in m for m in messages)


# ---------------------------------------------------------------------------------------------
# Consolidation


def _cutout_mask(box, fill=True):
  mask = np.full(tuple(s.stop - s.start for s in box), fill)
  return cutout_lib.CutoutMask(box, mask)


def test_find_couple_keeps_two_best_partners_in_range():
  box = (slice(0, 4), slice(0, 4), slice(0, 4))
  shifted = (slice(0, 4), slice(1, 5), slice(0, 4))  # Dice 0.75 with box
  far = (slice(0, 4), slice(4, 8), slice(0, 4))  # Dice 0 with box, 0.25 with shifted: below 0.3
  masks = {(0, 1): _cutout_mask(box), (1, 0): _cutout_mask(box), (2, 0): _cutout_mask(shifted),
           (3, 0): _cutout_mask(box), (1, 2): _cutout_mask(far)}
  members, agreement = consolidation.find_couple((0, 1), masks, 4)
  assert members == ((0, 1), (1, 0), (2, 0)) and agreement == pytest.approx((1 + 0.75) / 2)
  # (3, 0) is identical but 3 centre indices away; with a range of 3 it wins over the shifted one.
  members, agreement = consolidation.find_couple((0, 1), masks, 4, neighbour_range=3)
  assert members == ((0, 1), (1, 0), (3, 0)) and agreement == 1.0
  members, agreement = consolidation.find_couple((1, 2), masks, 4)
  assert members == ((1, 2),) and agreement == 0.0


def test_couple_partners_that_do_not_overlap_each_other_keep_only_the_best():
  anchor = (slice(0, 4), slice(0, 8), slice(0, 4))
  top, bottom = (slice(0, 4), slice(0, 4), slice(0, 4)), (slice(0, 4), slice(4, 9), slice(0, 4))
  masks = {(0, 0): _cutout_mask(anchor), (1, 0): _cutout_mask(top), (2, 0): _cutout_mask(bottom)}
  members, agreement = consolidation.find_couple((0, 0), masks, 3)  # Dice 2/3 with top, 8/13 with bottom
  assert members == ((0, 0), (1, 0)) and agreement == pytest.approx(2 / 3)


def _dense_predictions(shape, per_cutout):
  """[(above, centre, below)] of CutoutMasks from dense boolean arrays (None stays None)."""
  out = []
  for masks in per_cutout:
    out.append(tuple(None if m is None else cutout_lib._trimmed(m, (0, 0, 0)) for m in masks))
  return out


def test_consolidate_votes_two_of_three_for_agreeing_couples():
  shape = (6, 12, 6)
  core = np.zeros(shape, bool)
  core[1:5, 2:8, 1:5] = True
  a, b, c = core.copy(), core.copy(), core.copy()
  a[1:5, 8, 1:5] = True  # a voxel row only one cutout marks
  b[1:5, 1, 1:5] = True
  predictions = _dense_predictions(shape, [(a, None, None), (None, b, None), (None, None, c)])
  out, messages = consolidation.consolidate(predictions, shape, min_instance_voxels=1)
  assert np.array_equal(out > 0, core) and out.max() == 1
  assert messages == ['1 vertebra instances from 3 vertebral bodies: some cutouts did not agree']
  # Agreement (mean Dice about 0.90) under a 0.95 bar: one vote is enough, the union is taken.
  out, _ = consolidation.consolidate(predictions, shape, min_instance_voxels=1, vote_agreement=0.95)
  assert np.array_equal(out > 0, a | b | c)


def test_consolidate_skips_taken_couples_fills_only_free_voxels_and_drops_small():
  shape = (4, 20, 4)
  big = np.zeros(shape, bool)
  big[:, 0:10] = True  # no partners (range 0): every mask is its own couple, merged in cutout order
  overlap = np.zeros(shape, bool)
  overlap[:, 4:12] = True  # 128 voxels, 96 already taken (75% > 60%): skipped
  lower = np.zeros(shape, bool)
  lower[:, 8:14] = True  # 96 voxels, 32 taken (33%): fills rows 10..13
  speck = np.zeros(shape, bool)
  speck[0, 18, 0] = True
  predictions = _dense_predictions(shape, [(big, None, None), (None, big, None), (None, None, overlap),
                                           (lower, None, speck)])
  out, _ = consolidation.consolidate(predictions, shape, neighbour_range=0, min_instance_voxels=2, fill_holes=False)
  assert np.all(out[:, 0:10] == 1) and np.all(out[:, 10:14] == 2) and np.all(out[:, 14:] == 0)
  kept, _ = consolidation.consolidate(predictions, shape, neighbour_range=0, min_instance_voxels=1, fill_holes=False)
  assert kept[0, 18, 0] == 3


def test_consolidate_fills_holes_and_reports_nothing_found():
  shape = (7, 7, 7)
  shell = np.zeros(shape, bool)
  shell[1:6, 1:6, 1:6] = True
  shell[3, 3, 3] = False
  out, _ = consolidation.consolidate(_dense_predictions(shape, [(None, shell, None)]), shape, min_instance_voxels=1)
  assert out[3, 3, 3] == 1
  out, messages = consolidation.consolidate(_dense_predictions(shape, [(None, None, None)]), shape)
  assert not out.any() and 'no vertebra' in messages[0]


def test_three_stacked_vertebrae_through_overlapping_cutouts_reproduce_the_reference():
  sem, ref = stacked_spine(3)
  centres, _ = body_centres.vertebral_body_centres(sem, **SMALL)
  predictions = cutout_lib.predict_cutouts(oracle_lib.oracle_predict_fn(sem, ref, centres, CUTOUT), sem, centres,
                                         CUTOUT, batch_size=2)
  assert [p[0] is None for p in predictions] == [False, False, True]  # the top cutout has nothing above
  assert [p[2] is None for p in predictions] == [True, False, False]
  out, messages = consolidation.consolidate(predictions, sem.shape, min_instance_voxels=50)
  assert messages == []
  vertebra = np.isin(sem, phase2_common.VERTEBRA_LABELS)
  expected = np.where(vertebra, ref, 0)
  for value in (1, 2, 3):  # each instance is exactly one reference vertebra
    assert len(np.unique(expected[out == value])) == 1
  assert np.array_equal(out > 0, vertebra)


# ---------------------------------------------------------------------------------------------
# Labelling


def test_label_spine_numbers_top_to_bottom_discs_and_endplates_after_the_vertebra_above():
  sem, ref = stacked_spine(3, sacrum=True)
  consolidated = np.zeros(sem.shape, np.int32)
  for old, new in ((20, 3), (21, 1), (22, 2)):  # arbitrary consolidation order
    consolidated[(ref == old) & np.isin(sem, phase2_common.VERTEBRA_LABELS)] = new
  out, messages = labelling.label_spine(consolidated, sem, first_vertebra='L1', endplate_owner='vertebra')
  assert messages == [] and out.dtype == np.int16
  assert np.array_equal(out, ref)  # 20..22, sacrum 26, discs 120..122, endplates 220..222
  above, _ = labelling.label_spine(consolidated, sem, first_vertebra=20)
  y = MARGIN + PITCH  # vertebra 21: its upper endplate goes with the disc above it (SPEC, SPINEPS)
  assert above[15, y, 5] == 220 and above[15, y + BODY_ROWS - 1, 5] == 221
  assert above[15, MARGIN, 5] == 220  # the topmost upper endplate has no vertebra above: its own
  assert np.array_equal(above[sem != 62], ref[sem != 62])
  shifted, _ = labelling.label_spine(consolidated, sem)  # default: the top vertebra is 1
  assert sorted(np.unique(shifted[(shifted > 0) & (shifted < 100)]).tolist()) == [1, 2, 3, 26]


def test_disc_above_the_top_vertebra_takes_the_number_before_it():
  sem, ref = stacked_spine(3)
  sem[12:20, 0:MARGIN, 2:10] = 100  # a disc cut by the top of the field
  consolidated = np.where(np.isin(sem, phase2_common.VERTEBRA_LABELS), ref, 0)
  out, _ = labelling.label_spine(consolidated, sem, first_vertebra=20)
  assert np.all(out[12:20, 0:MARGIN, 2:10] == 119)
  out, messages = labelling.label_spine(consolidated, sem, first_vertebra=1)
  assert np.all(out[12:20, 0:MARGIN, 2:10] == 0) and any('above the first vertebra' in m for m in messages)


def test_label_spine_masks_by_semantics_reassigns_articular_processes_and_uncovered_bone():
  sem, ref = stacked_spine(3)
  vertebra = np.isin(sem, phase2_common.VERTEBRA_LABELS)
  consolidated = np.where(vertebra, ref - 19, 0).astype(np.int32)
  consolidated[sem == 61] = 1  # an instance spilling into the canal is cut back
  y = MARGIN + PITCH
  consolidated[8:10, y + 1, 10] = 1  # 3 of the 12 voxels of vertebra 2's upper-right articular process
  consolidated[8, y + 1, 11] = 1
  consolidated[2:8, y + 3:y + 8, 5:7] = 0  # vertebra 2's spinous process uncovered
  sem[2:4, 0:2, 0:2] = 42  # a speck of bone touching no vertebra
  out, messages = labelling.label_spine(consolidated, sem, first_vertebra=20, endplate_owner='vertebra')
  assert np.array_equal(out[:, y + 1:y + 4, 10:12][sem[:, y + 1:y + 4, 10:12] == 46], np.full(12, 21))
  assert np.all(out[2:8, y + 3:y + 8, 5:7] == 21)
  assert not out[sem == 61].any() and not out[2:4, 0:2, 0:2].any()
  assert any('touch no vertebra instance' in m for m in messages)
  no_fix, _ = labelling.label_spine(consolidated, sem, first_vertebra=20, reassign_articular=False,
                                   assign_missing=False)
  assert not no_fix[2:8, y + 3:y + 8, 5:7].any() and no_fix[8, y + 1, 11] == 20


def test_numbering_ids_and_errors():
  assert labelling.vertebra_ids(24, 4) == [24, 25, 27, 28]  # 26 is the sacrum's
  assert labelling.first_vertebra_id('c1') == 1 and labelling.first_vertebra_id('L1') == 20
  with pytest.raises(ValueError, match='first_vertebra'):
    labelling.first_vertebra_id('T13')
  with pytest.raises(ValueError, match='first_vertebra'):
    labelling.first_vertebra_id(0)
  sem, ref = stacked_spine(2)
  with pytest.raises(ValueError, match='endplate_owner'):
    labelling.label_spine(ref, sem, endplate_owner='below')
  with pytest.raises(ValueError, match='shape'):
    labelling.label_spine(ref[:, :-1], sem)
  _, messages = labelling.label_spine(np.where(np.isin(sem, phase2_common.VERTEBRA_LABELS), ref, 0), sem,
                                      first_vertebra=25)
  assert any('past L6' in m for m in messages)


# ---------------------------------------------------------------------------------------------
# The whole phase


def test_phase_two_reproduces_three_stacked_vertebrae():
  sem, ref = stacked_spine(3, sacrum=True)
  out, messages = run_phase(sem, ref, first_vertebra=20, endplate_owner='vertebra')
  assert messages == []
  assert np.array_equal(out, ref)


def test_phase_two_splits_merged_bodies():
  sem, ref = stacked_spine(5, fuse=1)
  out, messages = run_phase(sem, ref, first_vertebra=20, endplate_owner='vertebra')
  assert any('split in two' in m for m in messages)
  assert np.array_equal(out, ref)


def test_phase_two_recovers_a_vertebra_without_body():
  sem, ref = stacked_spine(3, drop_body=1)
  centres, messages = body_centres.vertebral_body_centres(sem, **SMALL)
  assert len(centres) == 2 and any('do not alternate' in m for m in messages)
  out, messages = run_phase(sem, ref, first_vertebra=20, endplate_owner='vertebra')
  assert sorted(np.unique(out).tolist()) == [0, 20, 21, 22, 120, 121, 220, 222]
  assert np.array_equal(out, ref)


def test_phase_two_without_bodies_and_with_a_single_vertebra():
  sem, ref = stacked_spine(2, sacrum=True)
  sem[sem == 49] = 0
  out, messages = run_phase(sem, ref)
  assert 'no vertebral body' in messages[0]
  assert np.array_equal(np.unique(out), [0, 26])  # only the sacrum, which needs no instance network
  sem, ref = stacked_spine(1)
  out, messages = run_phase(sem, ref, first_vertebra=20, endplate_owner='vertebra')
  assert any('single vertebral body' in m for m in messages)
  assert np.array_equal(out, ref)


def test_phase_two_scores_perfectly_with_the_instance_metrics():
  sem, ref = stacked_spine(4, sacrum=True)
  out, _ = run_phase(sem, ref, first_vertebra=20, endplate_owner='vertebra')
  report = inst_metrics.instance_report(out, ref, (0.75, 0.75, 1.65))
  vertebrae = report['groups']['vertebrae']
  assert vertebrae['by_label']['mean_dice'] == 1.0 and vertebrae['panoptic']['pq'] == 1.0


def test_centroids_in_world_mm():
  sem, ref = stacked_spine(2)
  affine = np.diag([2.0, 3.0, 4.0, 1.0])
  affine[:3, 3] = (10.0, 0.0, -5.0)
  ctd = phase2.centroids(ref, sem, affine)
  assert sorted(ctd['vertebrae']) == ['20', '21'] and list(ctd['discs']) == ['120']
  assert sorted(ctd['endplates']) == ['220', '221']
  l1 = ctd['vertebrae']['20']
  assert l1['level'] == 'L1' and l1['voxels'] == int(np.count_nonzero(ref == 20))
  expected = np.argwhere(ref == 20).mean(axis=0) * (2, 3, 4) + (10, 0, -5)
  assert l1['centroid_mm'] == pytest.approx(expected.tolist(), abs=1e-3)
  body = np.argwhere((ref == 20) & (sem == 49)).mean(axis=0) * (2, 3, 4) + (10, 0, -5)
  assert l1['structures']['vertebra_corpus'] == pytest.approx(body.tolist(), abs=1e-3)
  assert set(l1['structures']) == {'arcus_vertebrae', 'spinous_process', 'superior_articular_left',
                                   'superior_articular_right', 'inferior_articular_left',
                                   'inferior_articular_right', 'vertebra_corpus'}
  assert ctd['discs']['120']['above_level'] == 'L1' and ctd['endplates']['221']['level'] == 'L2'

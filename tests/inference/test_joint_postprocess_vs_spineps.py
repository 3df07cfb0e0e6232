"""The 'spineps' post-processing mode (phase2/joint_postprocess.py) against SPINEPS 2.1.3 itself, voxel for voxel:
the worker's `postprocess_combined` runs phase_post.phase_postprocess_combined with the flags seg_run.py passes
it, on the same (semantic, instance) pairs. Inputs: phantoms (PIR, one in LPS) with their instance masks as
SPINEPS' instance phase hands them over (vertebra ids only), perturbed to exercise each step, a synthetic column
of 26 vertebrae, the TPTBox test MRI with and without perturbations, and an empty mask. One oracle call for
all cases (~7 s of `import spineps`). Skips when the SPINEPS reference environment is absent.

SPINEPS' defects, reproduced by the 'spineps' mode and absent from the default 'spine_jax' mode (sizes printed by
`test_spineps_defects_as_measured`): body-less instances and the sacrum own discs and endplates as if at height 0,
so the disc above the topmost body goes to the sacrum (126) or to an arch-only instance, and plates so owned
vanish from the semantic mask in the split; the first instance grows into uncovered bone from its voxels off
the vertebra labels; the merge of a split top vertebra looks along the input's axis 1, not I; numbering does
not skip 26, so a 25th vertebra takes the sacrum's id; an empty mask raises.
"""
import numpy as np
import pytest
from scipy import ndimage

from configs import instance as instance_config
from spine_jax.data import nifti
from spine_jax.data import spatial
from spine_jax.data.phantoms import mri
from spine_jax.data.phantoms import mri_anatomy
from spine_jax.data.spine_labels import (ARCUS, ARTICULAR, CORPUS, DISC, DISC_OFFSET, ENDPLATE, ENDPLATE_INFERIOR,
                                         ENDPLATE_OFFSET, ENDPLATE_SUPERIOR, SACRUM, SACRUM_INSTANCE, SPINOUS,
                                         VERTEBRA_PARTS)
from spine_jax.inference import spine
from spine_jax.inference.phase2 import common as phase2_common
from spine_jax.inference.phase2 import joint_postprocess as jp
from spine_jax.inference.phase2 import labelling
from spine_jax.inference.phase2 import oracle as oracle_lib
from spine_jax.metrics import instances as inst_metrics
from tests import spineps_oracle

LPS = ('L', 'P', 'S')
FIRST = 2  # seg_run.py: labeling_offset = vertebra_instance_labeling_offset (2 for MRI) - 1


def raw(instance) -> np.ndarray:
  """A phantom's instance mask as SPINEPS' instance phase gives it: vertebra ids only."""
  return np.where((instance > 0) & (instance < DISC_OFFSET) & (instance != SACRUM_INSTANCE), instance, 0)


def phantom(seed: int, top: str | None = None) -> dict:
  cfg = mri.smoke_config()
  cfg.top_level_choices = (top,) if top else cfg.top_level_choices
  spine = mri.make_spine(np.random.default_rng(seed), cfg)
  return dict(semantic=spine['semantic'], instance=raw(spine['instance']), affine=spine['affine'],
              reference=spine['instance'])


def _ids(instance) -> list[int]:
  return [int(v) for v in np.unique(instance) if v]


def _by_height(case) -> list[int]:
  """Vertebra ids from top to bottom by the centre of their voxels along I."""
  inst = case['instance']
  return sorted(_ids(inst), key=lambda v: np.argwhere(inst == v)[:, 1].mean())


def _ball(shape, centre, radius) -> np.ndarray:
  grid = np.ogrid[tuple(slice(0, n) for n in shape)]
  return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2


def shuffled(case, rng):
  """Ids renamed at random (1..99), so they are not top to bottom."""
  ids = _ids(case['instance'])
  new = rng.choice(np.arange(1, 100), len(ids), replace=False)
  lut = np.zeros(int(case['instance'].max()) + 1, np.int64)
  lut[ids] = new
  return dict(case, instance=lut[case['instance']])


def articular(case, rng):
  """Two articular processes of a middle vertebra: one wholly given the neighbour above's id, one 30 %."""
  inst, sem = case['instance'].copy(), case['semantic']
  order = _by_height(case)
  upper, vert = order[len(order) // 2 - 1], order[len(order) // 2]
  for label, share in zip(ARTICULAR[:2], (1.0, 0.3)):
    voxels = np.argwhere((sem == label) & (inst == vert))
    pick = voxels[rng.random(len(voxels)) < share]
    inst[tuple(pick.T)] = upper
  return dict(case, instance=inst)


def uncovered(case, rng):
  """Holes in the instances inside bone: small ones the growth fills, a large one in a body."""
  inst, sem = case['instance'].copy(), case['semantic']
  bone = np.argwhere(np.isin(sem, VERTEBRA_PARTS))
  for voxel in bone[rng.choice(len(bone), 12)]:
    inst[_ball(inst.shape, voxel, 1.5)] = 0
  body = np.argwhere(sem == CORPUS)
  inst[_ball(inst.shape, body[len(body) // 2], 6)] = 0
  return dict(case, instance=inst)


def stray(case, rng):
  """A bone blob far from the spine with no instance (deleted), instance noise on the background."""
  inst, sem = case['instance'].copy(), case['semantic'].copy()
  free = np.argwhere(ndimage.binary_erosion(sem == 0, iterations=6))
  sem[_ball(sem.shape, free[rng.integers(len(free))], 2.5)] = ARCUS
  noise = (sem == 0) & (rng.random(sem.shape) < 0.01)
  inst[noise] = rng.choice(_ids(inst), int(noise.sum()))
  return dict(case, semantic=sem, instance=inst)


def stray_instance(case, rng):
  """A body blob far from the spine with an instance of its own: SPINEPS numbers it as a vertebra."""
  inst, sem = case['instance'].copy(), case['semantic'].copy()
  free = np.argwhere(ndimage.binary_erosion(sem == 0, iterations=6))
  blob = _ball(sem.shape, free[rng.integers(len(free))], 3)
  sem[blob], inst[blob] = CORPUS, 77
  return dict(case, semantic=sem, instance=inst)


def posterior_piece(case, rng):
  """The back half of a vertebra's spinous process given the id of the vertebra above."""
  inst, sem = case['instance'].copy(), case['semantic']
  order = _by_height(case)
  upper, vert = order[len(order) // 2 - 1], order[len(order) // 2]
  spinous = (sem == SPINOUS) & (inst == vert)
  rows = np.argwhere(spinous)[:, 0]
  inst[spinous & (np.arange(inst.shape[0])[:, None, None] > np.median(rows))] = upper
  return dict(case, instance=inst)


def merged_bodies(case, rng):
  """Two neighbouring vertebrae under one id."""
  order = _by_height(case)
  a, b = order[len(order) // 2], order[len(order) // 2 + 1]
  return dict(case, instance=np.where(case['instance'] == b, a, case['instance']))


def split_top(case, rng):
  """The topmost vertebra's upper third under an id of its own."""
  inst = case['instance'].copy()
  top = _by_height(case)[0]
  voxels = np.argwhere(inst == top)
  cut = np.quantile(voxels[:, 1], 0.35)
  inst[(inst == top) & (np.arange(inst.shape[1])[None, :, None] < cut)] = 90
  return dict(case, instance=inst)


def spill(case, rng):
  """Instances grown 2 voxels onto discs, endplates, canal and cord."""
  inst, sem = case['instance'].copy(), case['semantic']
  for _ in range(2):
    grown = ndimage.grey_dilation(inst, size=(3, 3, 3))
    target = (inst == 0) & (sem != 0) & ~np.isin(sem, VERTEBRA_PARTS)
    inst[target] = grown[target]
  return dict(case, instance=inst)


def disc_spill(case, rng):
  """The vertebra above a disc renamed 1 (it grows first) and spilled over that disc and the endplates of the
  vertebra below, whose body's upper 3 rows are uncovered: SPINEPS grows id 1 into them from the endplate
  before it drops the id there."""
  inst, sem = case['instance'].copy(), case['semantic']
  order = _by_height(case)
  upper, lower = order[len(order) // 2 - 1], order[len(order) // 2]
  inst = np.where(inst == upper, 1, np.where(inst == 1, upper, inst))
  inst[np.isin(case['reference'], (DISC_OFFSET + upper, ENDPLATE_OFFSET + lower))] = 1
  body = (inst == lower) & (sem == CORPUS)
  inst[body & (np.arange(inst.shape[1])[None, :, None] < np.argwhere(body)[:, 1].min() + 3)] = 0
  return dict(case, instance=inst)


def top_disc(case, rng):
  """Everything above the second disc from the top removed, its vertebra above included (by the phantom's
  reference ids, anatomical: smaller is higher): that disc has no vertebra above it."""
  ref = case['reference']
  top = sorted(v - DISC_OFFSET for v in _ids(ref) if DISC_OFFSET < v < ENDPLATE_OFFSET)[1]
  above = [v for v in range(1, top + 1)] + [ENDPLATE_OFFSET + v for v in range(1, top + 1)]
  gone = np.isin(ref, above + [DISC_OFFSET + v for v in range(1, top)])
  return dict(case, semantic=np.where(gone, 0, case['semantic']), instance=np.where(gone, 0, case['instance']))


def in_lps(case, rng=None):
  out = dict(case)
  for key in ('semantic', 'instance', 'reference'):
    out[key], affine, _ = nifti.reorient(case[key], case['affine'], LPS)
  out['affine'] = affine
  return out


def column(count: int = 26) -> dict:
  """A synthetic column of `count` vertebral bodies with discs between and a sacrum below (ids 1..count)."""
  height, gap = 6, 2
  shape = (8, count * (height + gap) + 10, 8)
  sem, inst = np.zeros(shape, np.uint8), np.zeros(shape, np.int64)
  for k in range(count):
    top = k * (height + gap)
    sem[1:7, top:top + height, 1:7], inst[1:7, top:top + height, 1:7] = CORPUS, k + 1
    sem[2:6, top + height:top + height + gap, 2:6] = DISC
  sem[1:7, count * (height + gap):, 1:7] = SACRUM
  affine = np.array([[0, 0, 1.65, 0], [-0.75, 0, 0, 0], [0, -0.75, 0, 0], [0, 0, 0, 1]], np.float64)  # PIR
  return dict(semantic=sem, instance=inst, affine=affine)


def _apply(case, *steps, seed=0):
  rng = np.random.default_rng(seed)
  for step in steps:
    case = step(case, rng)
  return case


def build_cases() -> dict:
  out = {f'phantom_{s}': phantom(s) for s in (0, 1)}
  out.update(
      shuffled=_apply(phantom(2), shuffled), articular=_apply(phantom(0), articular),
      uncovered=_apply(phantom(1), uncovered), stray=_apply(phantom(0), stray),
      stray_instance=_apply(phantom(1), stray_instance), posterior_piece=_apply(phantom(0), posterior_piece),
      merged_bodies=_apply(phantom(1), merged_bodies), split_top=_apply(phantom(3), split_top),
      spill=_apply(phantom(2), spill), disc_spill=_apply(phantom(0), disc_spill), c1=phantom(29),
      sacrum=phantom(0, 'L3'), top_disc=_apply(phantom(1, 'L3'), top_disc),
      split_top_lps=_apply(phantom(3), split_top, in_lps),
      everything=_apply(phantom(7), shuffled, articular, uncovered, stray, posterior_piece, spill, split_top),
      everything_lps=_apply(phantom(4, 'L2'), articular, uncovered, spill, shuffled, in_lps),
      column=column(), empty=dict(semantic=np.zeros((6, 7, 8), np.uint8), instance=np.zeros((6, 7, 8), np.int64),
                                  affine=np.diag([0.75, 0.75, 1.65, 1.0])))
  return out


@pytest.fixture(scope='module')
def cases():
  reason = spineps_oracle.available()
  if reason:
    pytest.skip(reason)
  out = build_cases()
  mri_case = spineps_oracle.call('worker.test_mri', {})
  out['tptbox'] = dict(semantic=mri_case['semantic'], instance=raw(mri_case['instance']), affine=mri_case['affine'])
  out['tptbox_perturbed'] = _apply(out['tptbox'], shuffled, uncovered, spill, articular, seed=5)
  return out


@pytest.fixture(scope='module')
def spineps(cases):
  arrays = {f'{name}/{key}': case[key] for name, case in cases.items() for key in ('semantic', 'instance', 'affine')}
  return spineps_oracle.call('worker.postprocess_combined', arrays, labeling_offset=FIRST - 1)


def ours(case):
  return jp.postprocess_combined(case['semantic'], case['instance'], case['affine'], first_vertebra=FIRST)


def spine_jax_mode(case) -> np.ndarray:
  """The default mode as instances_in_input_space runs it (in PIR), back on the case's grid."""
  sem, _, undo = nifti.reorient(case['semantic'], case['affine'], spatial.PIR)
  inst, _, _ = nifti.reorient(case['instance'], case['affine'], spatial.PIR)
  return nifti.undo_reorientation(labelling.label_spine(inst, sem, first_vertebra=FIRST)[0], undo)


NAMES = ['phantom_0', 'phantom_1', 'shuffled', 'articular', 'uncovered', 'stray', 'stray_instance', 'posterior_piece',
         'merged_bodies', 'split_top', 'spill', 'disc_spill', 'c1', 'sacrum', 'top_disc', 'split_top_lps', 'everything',
         'everything_lps', 'column', 'tptbox', 'tptbox_perturbed']


@pytest.mark.parametrize('name', NAMES)
def test_joint_postprocess_matches_spineps(name, cases, spineps):
  case = cases[name]
  semantic, instance, _ = ours(case)
  ref_sem, ref_inst = spineps[f'{name}/semantic'], spineps[f'{name}/instance']
  sem_diff, inst_diff = int(np.sum(semantic != ref_sem)), int(np.sum(instance != ref_inst))
  print(f'{name}: {case["semantic"].shape}, SPINEPS changed {int(np.sum(ref_sem != case["semantic"]))} semantic '
        f'voxels; we differ in {sem_diff} semantic, {inst_diff} instance voxels; the spine_jax mode differs in '
        f'{int(np.sum(spine_jax_mode(case) != ref_inst))} instance voxels')
  assert semantic.dtype == np.uint8 and instance.dtype == np.int16
  assert sem_diff == 0 and inst_diff == 0


def test_spineps_raises_on_an_empty_mask_we_return_empty(cases, spineps):
  assert 'ValueError' in str(spineps['empty/error'])
  semantic, instance, messages = ours(cases['empty'])
  assert not semantic.any() and not instance.any() and messages


def _vertebrae(instance) -> list[int]:
  return [v for v in _ids(instance) if v < DISC_OFFSET and v != SACRUM_INSTANCE]


def test_cases_exercise_each_step(cases, spineps):
  """What SPINEPS does to the perturbations (and so what the equality above covers)."""
  def out(name):
    return spineps[f'{name}/semantic'], spineps[f'{name}/instance']
  clean_sem, clean_inst = out('phantom_0')
  base, case = cases['phantom_0'], cases['articular']
  order = _by_height(base)
  vert = order[len(order) // 2]
  whole, partial = ((case['semantic'] == label) & (base['instance'] == vert) for label in ARTICULAR[:2])
  got = out('articular')[1]
  assert np.array_equal(got[partial], clean_inst[partial])  # a 30 % intruder loses the vote
  assert np.all(got[whole] != clean_inst[whole])  # a whole process keeps the neighbour's id
  blob = cases['stray']['semantic'] != base['semantic']
  sem, inst = out('stray')  # bone without an instance goes from both masks; background noise is dropped
  assert blob.any() and np.array_equal(sem, clean_sem) and np.array_equal(inst, clean_inst)
  assert np.array_equal(out('posterior_piece')[1], clean_inst)  # the spinous piece goes back
  # the split top vertebra is merged again in PIR, not in LPS (axis 1 is P there)
  count = len(_vertebrae(cases['split_top']['instance']))
  assert len(_vertebrae(out('split_top')[1])) == count - 1 and len(_vertebrae(out('split_top_lps')[1])) == count
  sem, inst = out('uncovered')  # every vertebra voxel ends in an instance
  assert np.all(inst[np.isin(sem, VERTEBRA_PARTS)] > 0)
  assert np.sum(cases['uncovered']['instance'][np.isin(sem, VERTEBRA_PARTS)] == 0) > 500
  # ids shuffled, instances spilled onto discs, canal and cord: both come out as the phantom numbered top down
  assert np.array_equal(out('spill')[1], out('shuffled')[1])
  assert _vertebrae(out('shuffled')[1]) == list(range(FIRST, FIRST + len(_ids(cases['shuffled']['instance']))))
  case, got = cases['disc_spill'], out('disc_spill')[1]  # id 1 grew into the body from its endplate
  hole = (case['instance'] == 0) & (case['semantic'] == CORPUS)
  assert np.any(got[hole] == got[(case['instance'] == 1) & (case['semantic'] == CORPUS)][0])
  assert len(_vertebrae(out('merged_bodies')[1])) == len(_ids(cases['merged_bodies']['instance']))
  assert len(_vertebrae(out('stray_instance')[1])) == len(_ids(cases['stray_instance']['instance']))


def _plate_truth(case) -> tuple[np.ndarray, np.ndarray]:
  """(endplate voxels, 52/53 each should be) of a PIR phantom: its endplate 200 + X lies on vertebra X, superior
  above X's body centre; vertebrae whose body the field's edge cuts are left out (their centre is not)."""
  sem, ref = case['semantic'], case['reference']
  rows = np.indices(sem.shape)[1]
  centre = {}
  for v in _vertebrae(ref):
    body = np.argwhere((ref == v) & (sem == CORPUS))[:, 1]
    if body.size and body.min() > 0 and body.max() < sem.shape[1] - 1:
      centre[v] = body.mean()
  plate = (sem == ENDPLATE) & np.isin(ref - ENDPLATE_OFFSET, list(centre))
  lookup = np.vectorize(lambda v: centre.get(v, 0.0))(np.where(plate, ref - ENDPLATE_OFFSET, 0))
  return plate, np.where(rows < lookup, ENDPLATE_SUPERIOR, ENDPLATE_INFERIOR)[plate]


def test_spineps_defects_as_measured(cases, spineps):
  """SPINEPS' defects on these cases, reproduced by the 'spineps' mode; the 'spine_jax' mode has none of them."""
  report = {}
  # the endplate split itself is right where the plates have the right owners (PIR phantoms)
  for name in ('phantom_0', 'phantom_1', 'sacrum', 'c1', 'disc_spill'):
    plate, truth = _plate_truth(cases[name])
    report[f'{name}: plates split wrong'] = int(np.sum(spineps[f'{name}/semantic'][plate] != truth))
  # the first instance grows from its voxels off the vertebra labels (a spill over a disc and endplate) into the
  # body below before they are dropped; its endplates are then split by the wrong vertebra
  case, got = cases['disc_spill'], spineps['disc_spill/instance']
  body = case['semantic'] == CORPUS
  hole, upper = (case['instance'] == 0) & body, (case['instance'] == 1) & body
  report['disc_spill: body voxels to the vertebra above'] = int(np.sum(got[hole] == got[upper][0]))
  ours_jax = spine_jax_mode(case)
  assert not np.any(ours_jax[hole] == ours_jax[upper][0])
  # the merge of a split top vertebra looks along the input's axis 1: the same case in LPS comes out different
  lps, _, _ = nifti.reorient(spineps['split_top_lps/instance'], cases['split_top_lps']['affine'], spatial.PIR)
  report['split_top: LPS differs from PIR'] = int(np.sum(lps != spineps['split_top/instance']))
  # the sacrum stands at height 0: the disc above the topmost body and its endplates go to it (126, 226); the
  # split cannot name plates 226, so they vanish from the semantic mask
  inst, sem = spineps['top_disc/instance'], spineps['top_disc/semantic']
  report['top_disc: disc 126'] = int(np.sum(inst == DISC_OFFSET + SACRUM_INSTANCE))
  report['top_disc: endplate 226'] = int(np.sum(inst == ENDPLATE_OFFSET + SACRUM_INSTANCE))
  report['top_disc: endplates deleted'] = int(np.sum((cases['top_disc']['semantic'] == ENDPLATE) & (sem == 0)))
  # numbering does not skip 26: the 25th of 26 vertebrae takes the sacrum's id
  inst, sem = spineps['column/instance'], spineps['column/semantic']
  report['column: vertebra 26'] = int(np.sum((inst == SACRUM_INSTANCE) & (sem != SACRUM)))
  print(report)
  assert all(report[f'{name}: plates split wrong'] == 0 for name in ('phantom_0', 'phantom_1', 'sacrum', 'c1'))
  assert all(value > 0 for key, value in report.items() if 'split wrong' not in key or 'disc_spill' in key)
  for name in ('top_disc', 'column'):
    out = spine_jax_mode(cases[name])
    assert not np.isin(out, (DISC_OFFSET + SACRUM_INSTANCE, ENDPLATE_OFFSET + SACRUM_INSTANCE)).any()
    assert not np.any((out == SACRUM_INSTANCE) & (cases[name]['semantic'] != SACRUM))


def test_spineps_mode_in_the_pipeline_cleans_both_masks_on_the_input_grid():
  """instances_in_input_space in the 'spineps' mode (perfect network, LPS phantom): the raw model-grid instances
  back on the input grid, then `postprocess_combined` there; the semantic mask comes back with its endplates
  split and bone no instance reaches deleted (edge-cut arches; plates owned by an arch-only instance at height
  0 vanish), the vertebrae as the reference. The default mode returns the semantic mask untouched."""
  config = instance_config.get_config('smoke')
  volume = mri.make_volume(config.data.phantom, 'test', 0)
  semantic, affine, _ = nifti.reorient(volume['semantic'], volume['affine'], LPS)
  reference, _, _ = nifti.reorient(volume['instance'], volume['affine'], LPS)
  cfg = config.inference
  model = spine.Model(None, config, None, oracle_lib.oracle_for_scan(semantic, affine, reference, config), 'oracle')
  same, kept, _ = spine.instances_in_input_space(semantic, affine, model, return_semantic=True)
  assert kept is semantic and same.shape == semantic.shape
  cfg.postprocess_mode = phase2_common.SPINEPS_MODE
  out, cleaned, _ = spine.instances_in_input_space(semantic, affine, model, return_semantic=True)
  assert cleaned.dtype == np.uint8 and out.dtype == np.int16 and out.shape == semantic.shape
  split = np.isin(cleaned, (ENDPLATE_SUPERIOR, ENDPLATE_INFERIOR))
  changed = np.where(split, ENDPLATE, cleaned) != semantic
  assert split.any() and not cleaned[changed].any()  # besides the split, only deletions
  table = inst_metrics.overlap_table(out, reference, (1, 99))
  dice, pairs = table.dice(), dict((r, q) for q, r in inst_metrics.match_by_overlap(table) if q and r)
  pred_index = {int(v): i for i, v in enumerate(table.pred_ids)}
  ref_index = {int(v): i for i, v in enumerate(table.ref_ids)}
  whole = [mri_anatomy.vertebra_id(level) for level in volume['full_levels']]
  assert all(dice[pred_index[pairs[r]], ref_index[r]] > 0.95 for r in whole)
  cfg.postprocess_mode = 'other'
  with pytest.raises(ValueError, match='postprocess_mode'):
    spine.instances_in_input_space(semantic, affine, model)

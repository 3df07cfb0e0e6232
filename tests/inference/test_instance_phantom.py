"""Phase 2 end to end on MRI phantoms with a perfect (oracle) instance network: the phantom's instances come back.

The cutout keeps the real 248 voxels along P (long spinous processes stay inside it) but fewer
rows and slices, which is enough for a small phantom and keeps the test fast. Vertebrae cut by
the field's edge may lose pieces (SPINEPS deletes pieces under 250 voxels), so exactness is
asked of the vertebrae wholly inside the field.
"""
import numpy as np
import pytest

from spine_jax.data import levels
from spine_jax.data.phantoms import mri
from spine_jax.inference.phase2 import centres as body_centres
from spine_jax.inference.phase2 import common as phase2_common
from spine_jax.inference.phase2 import oracle as oracle_lib
from spine_jax.inference.phase2 import pipeline as phase2
from spine_jax.metrics import instances as inst_metrics


def _phase(volume, **overrides):
  cfg = phase2_common.default_instance_config()
  cfg.cutout_size, cfg.batch_size, cfg.endplate_owner = (248, 192, 32), 2, 'vertebra'
  for key, value in overrides.items():
    setattr(cfg, key, value)
  sem, ref = volume['semantic'], volume['instance']
  centres, _ = body_centres.vertebral_body_centres(sem, volume['spacing'])
  oracle = oracle_lib.oracle_predict_fn(sem, ref, centres, cfg.cutout_size)
  return phase2.segment_instances(sem, oracle, cfg, spacing=volume['spacing'])


def _whole(volume) -> set[int]:
  return {levels.level_to_label(level, 'spineps') for level in volume['full_levels']}


def test_phantom_instances_reproduced_up_to_the_numbering_start():
  cfg = mri.default_mri_phantom_config()
  volume = mri.make_spine(np.random.default_rng(0), cfg)
  out, _ = _phase(volume)
  table = inst_metrics.overlap_table(out, volume['instance'], (1, 299))
  dice = table.dice()
  pred_index = {int(v): i for i, v in enumerate(table.pred_ids)}
  ref_index = {int(v): i for i, v in enumerate(table.ref_ids)}
  pairs = {r: p for p, r in inst_metrics.match_by_overlap(table) if p is not None and r is not None}
  whole = _whole(volume)
  assert len(whole) >= 4
  offsets = set()
  for ref_id in table.ref_ids.tolist():
    vertebra = ref_id % 100
    if vertebra not in whole or (ref_id >= 100 and vertebra + 1 not in whole and ref_id < 200):
      continue  # cut by the field, or the disc under the last whole vertebra
    assert ref_id in pairs, f'reference instance {ref_id} not found'
    assert dice[pred_index[pairs[ref_id]], ref_index[ref_id]] > 0.99, ref_id
    offsets.add(pairs[ref_id] % 100 - vertebra)
  assert len(offsets) == 1  # one numbering for vertebrae, discs and endplates: only its start is unknown


def test_phantom_from_c1_numbered_by_default():
  """A field starting at C1 (the atlas has no body; C2's cutout brings it back) comes out numbered right."""
  cfg = mri.default_mri_phantom_config()
  cfg.top_level_choices, cfg.num_vertebrae_range = ('C2',), (4, 4)
  volume = mri.make_spine(np.random.default_rng(1), cfg)
  assert volume['levels'][0] == 'C1'
  out, messages = _phase(volume)
  assert not any('no vertebral body' in m for m in messages)
  report = inst_metrics.instance_report(out, volume['instance'], volume['spacing'], with_assd=False)
  rows = {row['ref_id']: row for row in report['groups']['vertebrae']['by_label']['instances']}
  for vertebra in sorted(_whole(volume) | {1}):
    assert rows[vertebra]['dice'] == pytest.approx(1.0, abs=0.01), vertebra
  assert report['groups']['vertebrae']['detection']['recall'] >= 0.85

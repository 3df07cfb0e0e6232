"""Phase 3 (inference/phase3/naming.py) with a stand-in network that answers each patch with its vertebra's true
targets: the pipeline around the network (patches in SPINEPS' order, batching, the level path, the dens rule,
relabelling of discs and endplates) must then give every vertebra its true level; and the labelling task's
scoring (training/labeling.py) on the same volumes."""
import dataclasses

import ml_collections
import numpy as np
import pytest

from spine_jax.data import labeling_patches
from spine_jax.data import level_classes as lc
from spine_jax.data import levels
from spine_jax.data import spine_labels
from spine_jax.data.phantoms import mri as mri_phantoms
from spine_jax.inference.phase3 import naming
from spine_jax.training import labeling as labeling_task

HEADS = ((lc.VERT, 24), (lc.VERTGRP, 12), (lc.REGION, 3), (lc.VERTREL, 6), (lc.VERTT13, 2), (lc.FULLYVISIBLE, 2))


def _spec(heads=HEADS, **path):
  cfg = ml_collections.ConfigDict(dict(
      model=dict(heads=heads), data=dict(patch_size=(24, 32, 8), zoom=(3.0, 3.0, 3.3), crop_margin_mm=128.0,
                                         corpus_masked=True, rotate=False),
      inference={**naming.default_inference_config().to_dict(), 'batch_size': 3, 'disable_c1': False, **path}))
  return naming.spec_of(cfg)


def _seen(instances, semantic, truth):
  """The true ids of the vertebrae phase 3 cuts a patch of (a corpus in the field), in its order."""
  ids = np.unique(labeling_patches.corpus_instances(instances, semantic))
  return [truth[i - 1] for i in ids if i]


def _oracle(truth, anatomy, heads=HEADS):
  """predict_fn answering the k-th patch (in call order) with truth[k]'s targets, one-hot."""
  answers = iter(truth)

  def predict(batch):
    out = {name: np.zeros((len(batch), n), np.float32) for name, n in heads}
    for row in range(len(batch)):
      level = next(answers, None)
      if level is None:  # padding
        continue
      for name, cls in lc.targets(level, anatomy, True, heads).items():
        out[name][row, cls] = 1.0
    return out
  return predict


def _volume(seed, **overrides):
  cfg = mri_phantoms.labeling_smoke_config()
  cfg.update(overrides)
  return mri_phantoms.make_spine(np.random.default_rng(seed), cfg)


@pytest.mark.parametrize("seed", [1, 3, 4])  # lumbar, cervical, whole spine
def test_true_answers_give_true_levels(seed):
  v = _volume(seed)
  instances, truth = labeling_task.positional(v['instance'])
  anatomy = lc.Anatomy.of([x['id'] for x in v['vertebrae']])
  seen = _seen(instances, v['semantic'], truth)
  result = naming.name_vertebrae(v['image'], v['affine'], instances, v['semantic'], _oracle(seen, anatomy), _spec())
  named = [result.mapping[k + 1] for k in range(len(truth))]
  assert [n for n, t in zip(named, truth) if t in seen] == seen, result.messages
  # No patch: deleted, as SPINEPS, but the atlas above a named C2, which becomes C1.
  assert all(n == (1 if t == 1 and 2 in seen else 0) for n, t in zip(named, truth) if t not in seen)
  assert labeling_task.score_volume(result.mapping, truth, [truth.index(t) + 1 for t in seen])['perfect']
  assert result.method == naming.NETWORK_METHOD and np.isfinite(result.cost)
  report = result.report()
  assert {int(k) for k in report['vertebrae']} == {truth.index(t) + 1 for t in seen}
  first = report['vertebrae'][str(truth.index(seen[0]) + 1)]
  assert first['id'] == seen[0] and set(first['probabilities']) == {h for h, _ in HEADS}


def test_t13_is_named_and_relabelling_moves_discs_and_endplates():
  v = _volume(19, t13_probability=1.0, t11_probability=0.0)  # a thoracic field ending T12, T13
  instances, truth = labeling_task.positional(v['instance'])
  assert lc.T13_ID in truth
  anatomy = lc.Anatomy.of([x['id'] for x in v['vertebrae']])
  seen = _seen(instances, v['semantic'], truth)
  assert lc.T13_ID in seen
  result = naming.name_vertebrae(v['image'], v['affine'], instances, v['semantic'], _oracle(seen, anatomy), _spec())
  truth = [t if t in seen else 0 for t in truth]
  assert [result.mapping[k + 1] for k in range(len(truth))] == truth
  # Discs and endplates of the positional mask follow their vertebra.
  positional = np.where(v['instance'] >= spine_labels.DISC_OFFSET, 0, instances)
  for true_id in truth:
    k = truth.index(true_id) + 1
    positional[v['instance'] == spine_labels.DISC_OFFSET + true_id] = spine_labels.DISC_OFFSET + k
    positional[v['instance'] == spine_labels.ENDPLATE_OFFSET + true_id] = spine_labels.ENDPLATE_OFFSET + k
  named = naming.relabel(positional, result.mapping)
  reference = np.where((v['instance'] == spine_labels.SACRUM_INSTANCE), 0, v['instance'])
  reference = np.where(np.isin(reference % 100, seen), reference, 0)
  np.testing.assert_array_equal(named, reference)


def test_the_vertebra_on_the_sacrum_is_the_last_lumbar_one():
  v = _volume(1)  # a lumbar field down to the sacrum
  instances, truth = labeling_task.positional(v['instance'])
  anatomy = lc.Anatomy.of([x['id'] for x in v['vertebrae']])
  seen = _seen(instances, v['semantic'], truth)
  assert seen[-1] == levels.level_to_label('L5', 'spineps')
  # A network that names every vertebra one level high (L1..L4 for L2..L5), as a short lumbar field can mislead it.
  wrong = [t - 1 for t in seen]
  misled = naming.name_vertebrae(v['image'], v['affine'], instances, v['semantic'], _oracle(wrong, anatomy), _spec())
  assert [misled.mapping[truth.index(t) + 1] for t in seen] == wrong
  anchored = naming.name_vertebrae(v['image'], v['affine'], instances, v['semantic'], _oracle(wrong, anatomy),
                                   _spec(sacrum_anchor=True))
  assert [anchored.mapping[truth.index(t) + 1] for t in seen] == seen
  lowest = truth.index(seen[-1]) + 1
  assert f'instance {lowest} rests on the sacrum: the last lumbar vertebra' in anchored.messages
  assert naming.rests_on_sacrum(instances, v['semantic'], v['affine'], lowest)
  assert not naming.rests_on_sacrum(instances, v['semantic'], v['affine'], lowest - 1)
  no_sacrum = np.where(v['semantic'] == spine_labels.SACRUM, 0, v['semantic'])
  assert not naming.rests_on_sacrum(instances, no_sacrum, v['affine'], lowest)
  assert naming.default_inference_config().sacrum_anchor is False  # SPINEPS' models: its own rules only


@pytest.mark.parametrize("seed", [3, 9])  # cervical (C7 without a patch), thoracic (both edges without one)
def test_edge_vertebrae_without_a_patch_are_counted_on_from_their_neighbours(seed):
  v = _volume(seed)
  instances, truth = labeling_task.positional(v['instance'])
  anatomy = lc.Anatomy.of([x['id'] for x in v['vertebrae']])
  seen = _seen(instances, v['semantic'], truth)
  edges = [k + 1 for k, t in enumerate(truth) if t not in seen and t != 1]  # the atlas has SPINEPS' own rule
  assert edges and all(t in seen for t in truth[truth.index(seen[0]):truth.index(seen[-1]) + 1])
  result = naming.name_vertebrae(v['image'], v['affine'], instances, v['semantic'], _oracle(seen, anatomy),
                                 _spec(name_edge_vertebrae=True))
  assert [result.mapping[k + 1] for k in range(len(truth))] == truth, result.messages
  for k in edges:
    level = levels.label_to_level(truth[k - 1], 'spineps')
    message = f'instance {k} (no patch) at the edge of the field: {level}, counted on from its neighbour'
    assert message in result.messages
    assert result.report()['vertebrae'][str(k)] == {'id': truth[k - 1], 'level': level, 'probabilities': None}
  # Off (SPINEPS' rule): deleted.
  spineps = naming.name_vertebrae(v['image'], v['affine'], instances, v['semantic'], _oracle(seen, anatomy), _spec())
  assert all(spineps.mapping[k] == 0 for k in edges)
  assert naming.default_inference_config().name_edge_vertebrae is False


def test_two_edge_vertebrae_without_a_patch_at_the_top_are_both_named():
  v = _volume(9)  # thoracic: the top vertebra has no patch; take the corpus of the second away too
  instances, truth = labeling_task.positional(v['instance'])
  semantic = np.where((instances == 2) & np.isin(v['semantic'], labeling_patches.CORPUS_IDS), 0, v['semantic'])
  anatomy = lc.Anatomy.of([x['id'] for x in v['vertebrae']])
  seen = _seen(instances, semantic, truth)
  assert truth[0] not in seen and truth[1] not in seen and truth[2] in seen
  result = naming.name_vertebrae(v['image'], v['affine'], instances, semantic, _oracle(seen, anatomy),
                                 _spec(name_edge_vertebrae=True))
  assert [result.mapping[k + 1] for k in range(len(truth))] == truth, result.messages


def test_edge_level_deletes_between_named_vertebrae_past_c1_and_at_the_sacrum():
  ids = {levels.level_to_label(n, 'spineps'): n for n in ('C1', 'C2', 'C7', 'T1', 'L4', 'L5')}
  by = {n: i for i, n in ids.items()}
  present = [1, 2, 3, 4]
  assert naming.edge_level(2, present, {1: by['C7'], 3: by['L4']}) == 0  # a hole between named vertebrae
  assert naming.edge_level(4, present, {1: by['C7'], 2: by['T1']}) == levels.level_to_label('T3', 'spineps')
  assert naming.edge_level(1, present, {2: by['C1']}) == 0  # nothing above C1
  assert naming.edge_level(3, present, {1: by['L4'], 2: by['L5']}) == 0  # the sacrum is not a vertebra instance
  assert naming.edge_level(1, present, {2: by['C2'], 3: by['C1']}) == 0  # C1 is taken
  assert naming.edge_level(1, present, {}) == 0


def test_no_vertebra_and_failures_are_messages_not_crashes():
  v = _volume(1)
  empty = naming.name_vertebrae(v['image'], v['affine'], np.zeros_like(v['instance']), v['semantic'],
                                _oracle([], None), _spec())
  assert empty.mapping == {} and empty.messages == ('no vertebra to name',)
  sacrum_only = np.where(v['instance'] == spine_labels.SACRUM_INSTANCE, v['instance'], 0)
  assert naming.name_vertebrae(v['image'], v['affine'], sacrum_only, v['semantic'], _oracle([], None),
                               _spec()).mapping == {}
  instances, truth = labeling_task.positional(v['instance'])
  one = np.where(instances == 2, 1, 0).astype(np.int16)
  anatomy = lc.Anatomy.of([x['id'] for x in v['vertebrae']])
  single = naming.name_vertebrae(v['image'], v['affine'], one, v['semantic'], _oracle(truth[1:2], anatomy), _spec())
  assert single.mapping == {1: truth[1]}
  no_corpus = naming.name_vertebrae(v['image'], v['affine'], instances, np.where(
      np.isin(v['semantic'], labeling_patches.CORPUS_IDS), 0, v['semantic']), _oracle(truth, anatomy), _spec())
  assert set(no_corpus.mapping.values()) == {0} and 'none could be named' in no_corpus.messages[0]


def test_spec_refuses_unknown_heads_and_sizes():
  with pytest.raises(lc.HeadError, match="unknown labelling head 'LEVELS'"):
    _spec(heads=(('LEVELS', 24),))
  with pytest.raises(ValueError, match='batch_size'):
    _spec(batch_size=0)
  assert dataclasses.asdict(_spec(enforce_12_thoracic=True).options)['enforce_12_thoracic']


def test_report_counts_anchored_and_transitional_volumes():
  rows = lambda ids, named: labeling_task.score_volume(dict(enumerate(named, start=1)), ids)
  volumes = [dict(name='a', kind='lumbar', anchor=True, **rows([23, 24], [23, 24])),
             dict(name='b', kind='lumbar', anchor=True, **rows([19, 28, 20], [19, 20, 21])),
             dict(name='c', kind='thoracic', anchor=False, **rows([12, 13], [11, 12])),
             dict(name='d', kind='lumbar', anchor=True, **rows([18, 20, 21], [19, 20, 21]))]
  report = labeling_task.labeling_report(volumes)
  assert report['num_volumes'] == 3 and report['fraction_perfect'] == pytest.approx(1 / 3)
  assert report['vertebra_accuracy'] == pytest.approx(5 / 8)
  assert report['without_anchor']['num_volumes'] == 1 and report['without_anchor']['fraction_perfect'] == 0.0
  assert report['transitional']['T13']['volumes'] == ['b'] and report['transitional']['L6']['num_volumes'] == 0
  assert report['transitional']['eleven_thoracic']['volumes'] == ['d']

"""SPINEPS phase 3 (the labelling network, VERIDAH) as a training task: one patch per vertebra, one
cross-entropy per output group.

Evaluation names the vertebrae of each held-out volume as inference does (`inference.phase3.naming`:
SPINEPS' patches, the network, the level path) from the reference instance mask renumbered by position,
so the ids carry no level, and scores each volume by whether every vertebra with a corpus in the field (the
ones phase 3 sees) got its true level. Volumes
whose field holds C2 or the sacrum (the anchors a reader counts from) are the target; fields without
either are reported apart.
"""
from __future__ import annotations

import pathlib

import numpy as np

from spine_jax.data import instance_cutouts as cutouts
from spine_jax.data import labeling_patches
from spine_jax.data import labeling_samples
from spine_jax.data import level_classes
from spine_jax.data import levels as levels_lib
from spine_jax.data import pipelines
from spine_jax.data import spine_labels
from spine_jax.data.phantoms import mri as mri_phantoms
from spine_jax.engine import networks
from spine_jax.engine import predict as predict_lib
from spine_jax.inference.phase3 import naming
from spine_jax.metrics.segmentation import finite_mean, format_score
from spine_jax.training import steps

C2_ID = levels_lib.level_to_label('C2', 'spineps')
_T11, _T12, _L1, _L6 = (levels_lib.level_to_label(n, 'spineps') for n in ('T11', 'T12', 'L1', 'L6'))
# Transitional anatomy in a field, from the true ids of its scored vertebrae: a T13, an L6, or eleven
# thoracic vertebrae (T11 followed by L1).
TRANSITIONAL = {'T13': lambda ids: level_classes.T13_ID in ids,
                'L6': lambda ids: _L6 in ids,
                'eleven_thoracic': lambda ids: _T11 in ids and _L1 in ids and _T12 not in ids}


def positional(instances: np.ndarray) -> tuple[np.ndarray, list[int]]:
  """The vertebrae of a reference instance mask (PIR) numbered 1..N top to bottom (as phase 2 numbers them),
  and the true id of each position; discs, endplates and the sacrum dropped."""
  truth = [int(v) for v in cutouts.vertebra_order(instances) if v != spine_labels.SACRUM_INSTANCE]
  lookup = np.zeros(int(max(truth, default=0)) + 1, np.int16)
  lookup[truth] = np.arange(1, len(truth) + 1, dtype=np.int16)
  kept = (instances > 0) & (instances <= max(truth, default=0))
  out = np.zeros(instances.shape, np.int16)
  out[kept] = lookup[instances[kept]]
  return out, truth


def score_volume(named: dict[int, int], truth: list[int], positions=None) -> dict:
  """Per position the named and the true id; whether all are right. Only `positions` (default all) count: a
  vertebra without a corpus in the field has no patch, and SPINEPS deletes it."""
  keep = set(range(1, len(truth) + 1)) if positions is None else {int(p) for p in positions}
  rows = [{'position': k + 1, 'true': t, 'named': int(named.get(k + 1, 0))} for k, t in enumerate(truth)
          if k + 1 in keep]
  return {'vertebrae': rows, 'correct': sum(r['true'] == r['named'] for r in rows), 'total': len(rows),
          'perfect': bool(rows) and all(r['true'] == r['named'] for r in rows)}


def has_anchor(volume: dict) -> bool:
  """The field holds C2 or the sacrum (`levels` of a phantom: the vertebrae with voxels in the field)."""
  return 'C2' in volume['levels'] or 'S1' in volume['levels']


def labeling_report(volumes: list[dict]) -> dict:
  """eval.json of the labelling task from per-volume scores (`score_volume` plus name, anchor, kind)."""
  def summary(group):
    vertebrae = [r for v in group for r in v['vertebrae']]
    return {'num_volumes': len(group), 'fraction_perfect': finite_mean([float(v['perfect']) for v in group]),
            'num_vertebrae': len(vertebrae),
            'vertebra_accuracy': finite_mean([float(r['true'] == r['named']) for r in vertebrae])}
  anchored = [v for v in volumes if v['anchor']]
  transitional = {name: [v for v in volumes if found({r['true'] for r in v['vertebrae']})]
                  for name, found in TRANSITIONAL.items()}
  kinds = sorted({v['kind'] for v in volumes})
  return {**summary(anchored), 'without_anchor': summary([v for v in volumes if not v['anchor']]),
          'by_field_kind': {k: summary([v for v in volumes if v['kind'] == k]) for k in kinds},
          'transitional': {name: {**summary(group), 'volumes': [v['name'] for v in group]}
                           for name, group in transitional.items()},
          'volumes': volumes}


class LabelingTask:
  """What the generic loop needs from the labelling network."""

  train_step = staticmethod(steps.labeling_train_step)

  def __init__(self, config):
    self.config = config
    self.model, self.init_shape = networks.build(config)
    self.heads = level_classes.check_heads(config.model.heads)
    self._test = None

  def initial_state(self, state):
    """New runs start from the initialisation (SPINEPS trains its DenseNet from scratch too)."""
    return state

  def train_iterator(self, process_index=None, process_count=None):
    cfg = self.config
    records = labeling_samples.phantom_records(cfg.data.phantom, 'train', cfg.data)
    return pipelines.labeling_train_iterator(records, cfg.data, self.heads, global_batch=cfg.batch_size,
                                             seed=cfg.seed, num_workers=cfg.data.num_workers,
                                             process_index=process_index, process_count=process_count)

  def _test_volumes(self) -> list[dict]:
    phantom = self.config.data.phantom
    out = []
    for i in range(mri_phantoms.split_size(phantom, 'test')):
      v = mri_phantoms.make_volume(phantom, 'test', i)
      out.append({key: v[key] for key in ('image', 'affine', 'instance', 'semantic', 'levels')}
                 | {'name': f'test{i:03d}', 'kind': v.get('field_kind', 'field')})
    return out

  def evaluate(self, state, mesh, workdir: pathlib.Path | None = None) -> dict:
    """Fraction of held-out volumes named perfectly, per-vertebra accuracy, the transitional cases."""
    del workdir
    if self._test is None:
      self._test = self._test_volumes()
    predict = predict_lib.classifier_predict_fn(state, mesh)
    spec = naming.spec_of(self.config)
    volumes = []
    for v in self._test:
      instances, truth = positional(v['instance'])
      result = naming.name_vertebrae(v['image'], v['affine'], instances, v['semantic'], predict, spec)
      with_corpus = np.unique(labeling_patches.corpus_instances(instances, v['semantic']))
      volumes.append({'name': v['name'], 'kind': v['kind'], 'anchor': has_anchor(v),
                      **score_volume(result.mapping, truth, with_corpus[with_corpus > 0]),
                      'messages': list(result.messages)})
    return labeling_report(volumes)

  @staticmethod
  def format_report(report: dict) -> str:
    free = report['without_anchor']
    lines = [f"held-out, fields with C2 or the sacrum: {report['num_volumes']} volumes, named perfectly "
             f"{format_score(report['fraction_perfect'])}, vertebra accuracy {format_score(report['vertebra_accuracy'])} "
             f"over {report['num_vertebrae']}",
             f"fields without an anchor: {free['num_volumes']} volumes, perfect {format_score(free['fraction_perfect'])}, "
             f"vertebra accuracy {format_score(free['vertebra_accuracy'])}"]
    for name, t in report['transitional'].items():
      lines.append(f"with {name}: {t['num_volumes']} volumes, perfect {format_score(t['fraction_perfect'])}")
    return "\n".join(lines)

  @staticmethod
  def headline(report: dict) -> dict:
    """What metrics.jsonl and TensorBoard track during training."""
    return {'fraction_perfect': report['fraction_perfect'], 'vertebra_accuracy': report['vertebra_accuracy'],
            'fraction_perfect_without_anchor': report['without_anchor']['fraction_perfect']}

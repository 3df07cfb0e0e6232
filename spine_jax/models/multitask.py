"""Bone-quality networks of arXiv 2402.08910: a DenseNet trunk and its task heads.

Kinds (``model_cfg.kind``):

* ``'hard'``, the paper's method: one trunk, heads ``blastic`` and ``lytic`` (one binary
  logit each), ``posterolateral`` (3 logits), and a small MLP that maps the two sub-task
  logits, stacked (B, 2), to the 4 bone-quality logits. Gradients of the quality loss
  flow through the MLP into the sub-task heads and the trunk.
* ``'soft'``: one trunk per sub-task (blastic, lytic, posterolateral), coupled after every
  dense block (with its transition) by a cross-stitch unit (Misra et al. 2016): each
  task's map becomes a learned linear combination of all tasks' maps. Same outputs.
* ``'single_quality'``: trunk -> Dense(4), the paper's DenseNet-121 baseline.
* ``'single_posterolateral'``: trunk -> Dense(3).

Every model is called as ``model.apply(variables, x, train=...)`` on channels-last
input and returns a dict of float32 logits: ``blastic`` (B,), ``lytic`` (B,),
``posterolateral`` (B, 3), ``quality`` (B, 4), or the single key of a single-task kind.

Class indices: quality 0 normal, 1 blastic, 2 mixed, 3 lytic (mixed = blastic and lytic
at once); posterolateral 0 none, 1 unilateral, 2 bilateral.

Parameter names: the trunk is ``features`` (torchvision's name, see ``densenet``) or
``features_<task>`` per task for ``'soft'``; heads are ``<task>_head``; the combiner is
``quality_mlp/{hidden,out}``; cross-stitch units are ``cross_stitch<b>/alpha`` with
``alpha[t, s]`` the weight of task s's map in task t's. For the baseline, torchvision's
``classifier`` / MONAI's ``class_layers.out`` is ``quality_head`` (kernel = weight.T).
Heads compute in float32 whatever the trunk's dtype.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from spine_jax.data.classes import POSTEROLATERAL_CLASSES, QUALITY_CLASSES
from spine_jax.models import densenet

SUBTASKS = ('blastic', 'lytic', 'posterolateral')
KINDS = ('hard', 'soft', 'single_quality', 'single_posterolateral')
OUTPUT_KEYS = {
    'hard': ('blastic', 'lytic', 'posterolateral', 'quality'),
    'soft': ('blastic', 'lytic', 'posterolateral', 'quality'),
    'single_quality': ('quality',),
    'single_posterolateral': ('posterolateral',),
}

_TRUNK_OVERRIDES = ('growth_rate', 'block_config', 'num_init_features', 'bn_size', 'stem')


def default_model_config() -> ml_collections.ConfigDict:
  """Every field ``build_model`` reads, with its default; trunk overrides start as None."""
  cfg = ml_collections.ConfigDict()
  cfg.kind = 'hard'
  cfg.trunk = 'densenet121'
  # Override the preset when not None (placeholders keep --config.x=... overrides typed).
  cfg.growth_rate = config_dict.placeholder(int)
  cfg.block_config = config_dict.placeholder(tuple)
  cfg.num_init_features = config_dict.placeholder(int)
  cfg.bn_size = config_dict.placeholder(int)
  cfg.stem = config_dict.placeholder(str)
  cfg.compression = 0.5
  cfg.dropout_rate = 0.0
  cfg.spatial_dims = 2
  cfg.in_channels = 1  # informative: the model takes whatever channels its input has
  cfg.mlp_hidden = 16
  cfg.head_dropout = 0.0
  cfg.cross_stitch_init = 0.9
  cfg.dtype = 'float32'
  cfg.remat = False  # recompute dense layers in the backward pass to save activation memory
  cfg.conv = 'auto'  # models/conv.py implementation; 'auto': densenet.make_conv's CPU forms on CPU, XLA's own elsewhere
  return cfg


def _field(cfg: Mapping[str, Any], name: str):
  value = cfg.get(name, None)
  return default_model_config()[name] if value is None else value


def trunk_fields(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """``DenseNet`` fields from a model config: the preset, then the non-None overrides."""
  fields = densenet.densenet_preset(_field(cfg, 'trunk'))
  for name in _TRUNK_OVERRIDES:
    if cfg.get(name, None) is not None:
      fields[name] = cfg.get(name)
  fields['block_config'] = tuple(int(n) for n in fields['block_config'])
  fields.update(compression=float(_field(cfg, 'compression')),
                dropout_rate=float(_field(cfg, 'dropout_rate')),
                spatial_dims=int(_field(cfg, 'spatial_dims')),
                remat=bool(_field(cfg, 'remat')),
                dtype=jnp.dtype(_field(cfg, 'dtype')))
  return fields


def build_model(cfg: Mapping[str, Any]) -> nn.Module:
  """The network a model config describes; missing fields take ``default_model_config``'s."""
  kind = _field(cfg, 'kind')
  trunk = functools.partial(densenet.DenseNet, **trunk_fields(cfg), conv=densenet.make_conv(str(_field(cfg, 'conv'))))
  head_dropout = float(_field(cfg, 'head_dropout'))
  if kind == 'hard':
    return HardSharingNet(trunk=trunk, mlp_hidden=int(_field(cfg, 'mlp_hidden')), head_dropout=head_dropout)
  if kind == 'soft':
    return SoftSharingNet(trunk=trunk, mlp_hidden=int(_field(cfg, 'mlp_hidden')), head_dropout=head_dropout,
                          cross_stitch_init=float(_field(cfg, 'cross_stitch_init')))
  if kind == 'single_quality':
    return SingleTaskNet(trunk=trunk, task='quality', head_dropout=head_dropout)
  if kind == 'single_posterolateral':
    return SingleTaskNet(trunk=trunk, task='posterolateral', head_dropout=head_dropout)
  raise ValueError(f'unknown model kind {kind!r}; known: {KINDS}')


class QualityMLP(nn.Module):
  """Maps the (blastic, lytic) logits, (B, 2), to the 4 bone-quality logits."""
  hidden: int = 16
  num_classes: int = len(QUALITY_CLASSES)

  @nn.compact
  def __call__(self, subtask_logits):
    x = nn.relu(nn.Dense(self.hidden, name='hidden')(subtask_logits))
    return nn.Dense(self.num_classes, name='out')(x)


class CrossStitch(nn.Module):
  """Cross-stitch unit: output t = sum_s alpha[t, s] * input s, one T x T matrix."""
  init_diagonal: float = 0.9

  @nn.compact
  def __call__(self, maps: Sequence[jnp.ndarray]) -> list[jnp.ndarray]:
    t = len(maps)
    off = (1.0 - self.init_diagonal) / (t - 1) if t > 1 else 0.0
    init = lambda key, shape: jnp.where(jnp.eye(t, dtype=bool), self.init_diagonal, off).astype(jnp.float32)
    alpha = self.param('alpha', init, (t, t))
    stacked = jnp.stack(maps)
    mixed = jnp.einsum('ts,s...->t...', alpha.astype(stacked.dtype), stacked)
    return list(mixed)


def _features_float32(x, dropout_rate: float, train: bool):
  return nn.Dropout(dropout_rate, deterministic=not train)(x.astype(jnp.float32))


def _subtask_outputs(feats: Mapping[str, jnp.ndarray], mlp_hidden: int, dropout_rate: float,
                     train: bool) -> dict[str, jnp.ndarray]:
  """Sub-task heads on each task's vector and the quality MLP on their logits.

  Called from a parent's compact method, so the heads are the parent's submodules.
  """
  logit = lambda task, n: nn.Dense(n, name=f'{task}_head')(_features_float32(feats[task], dropout_rate, train))
  out = {'blastic': logit('blastic', 1)[:, 0], 'lytic': logit('lytic', 1)[:, 0],
         'posterolateral': logit('posterolateral', len(POSTEROLATERAL_CLASSES))}
  out['quality'] = QualityMLP(mlp_hidden, name='quality_mlp')(jnp.stack([out['blastic'], out['lytic']], -1))
  return out


class HardSharingNet(nn.Module):
  """One trunk, all heads: the paper's multi-task network."""
  trunk: Callable[..., densenet.DenseNet]
  mlp_hidden: int = 16
  head_dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool):
    h = self.trunk(name='features')(x, train)
    return _subtask_outputs({task: h for task in SUBTASKS}, self.mlp_hidden, self.head_dropout, train)


class SoftSharingNet(nn.Module):
  """One trunk per sub-task, mixed by a cross-stitch unit after every dense stage."""
  trunk: Callable[..., densenet.DenseNet]
  mlp_hidden: int = 16
  head_dropout: float = 0.0
  cross_stitch_init: float = 0.9

  @nn.compact
  def __call__(self, x, train: bool):
    trunks = [self.trunk(name=f'features_{task}') for task in SUBTASKS]
    maps = [trunk.forward_stem(x, train) for trunk in trunks]
    for i in range(trunks[0].num_stages):
      maps = [trunk.forward_stage(i, m, train) for trunk, m in zip(trunks, maps)]
      maps = CrossStitch(self.cross_stitch_init, name=f'cross_stitch{i + 1}')(maps)
    feats = {task: trunk.forward_head(m, train) for task, trunk, m in zip(SUBTASKS, trunks, maps)}
    return _subtask_outputs(feats, self.mlp_hidden, self.head_dropout, train)


class SingleTaskNet(nn.Module):
  """Trunk and one linear classifier: the DenseNet baseline of one task."""
  trunk: Callable[..., densenet.DenseNet]
  task: str = 'quality'
  head_dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool):
    classes = {'quality': QUALITY_CLASSES, 'posterolateral': POSTEROLATERAL_CLASSES}[self.task]
    h = _features_float32(self.trunk(name='features')(x, train), self.head_dropout, train)
    return {self.task: nn.Dense(len(classes), name=f'{self.task}_head')(h)}

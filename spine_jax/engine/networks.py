"""The one network builder: a task's config -> (flax module, input shape to initialise it with).

Training tasks and checkpoint inference both build their network here, so the architecture a
checkpoint is restored into is the one it was trained as (nnU-Net's single builder, shared by
its trainer and its predictor).

An ensemble (nnU-Net's folds, converted together: `config.model.ensemble_size` > 1) is one network with
every variable stacked along a leading axis; its apply function runs the members one after the other
(`lax.map`: one member's activations in memory at a time) and averages their outputs, as nnU-Net's
predictor averages its folds' logits.
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import numpy as np

from spine_jax.engine import mesh as mesh_lib
from spine_jax.models import instance_unet
from spine_jax.models import labeling
from spine_jax.models import multitask
from spine_jax.models import unet


def _bone_quality(config) -> tuple[nn.Module, tuple[int, ...]]:
  size = config.data.slices.image_size
  return multitask.build_model(config.model), (1, size, size, config.data.in_channels)


def _semantic(config) -> tuple[nn.Module, tuple[int, ...]]:
  return unet.build_unet(config.model), (1, *config.data.patch.patch_size, config.model.in_channels)


def _instance(config) -> tuple[nn.Module, tuple[int, ...]]:
  return (instance_unet.build_instance_unet(config.model),
          (1, *config.data.cutout.cutout_size, config.model.in_channels))


def _labeling(config) -> tuple[nn.Module, tuple[int, ...]]:
  """One vertebra patch, (P, I, R) voxels in SPINEPS' order (models/labeling.py), one channel; a patch the trunk
  would pool to nothing is refused here, naming the field."""
  model = labeling.build_labeling_model(config.model)
  smallest = labeling.smallest_patch(model.backbone)
  if min(int(n) for n in config.data.patch_size) < smallest:
    raise ValueError(f"data.patch_size {tuple(config.data.patch_size)}: the {model.backbone} trunk needs at least "
                     f"{smallest} voxels per axis")
  return model, (1, *config.data.patch_size, 1)


BUILDERS: dict[str, Callable] = {"bone_quality": _bone_quality, "semantic": _semantic, "instance": _instance,
                                 "labeling": _labeling}


def build(config) -> tuple[nn.Module, tuple[int, ...]]:
  """(model, init shape (1, *spatial, channels)) of `config.task`'s network."""
  name = config.get("task")
  if name not in BUILDERS:
    raise ValueError(f"config.task: unknown task {name!r} ({', '.join(BUILDERS)})")
  return BUILDERS[name](config)


def ensemble_size(config) -> int:
  """How many weight sets the model holds (`config.model.ensemble_size`, 1 when absent)."""
  size = config.model.get("ensemble_size", 1) if "model" in config else 1
  if not isinstance(size, int) or size < 1:
    raise ValueError(f"config.model.ensemble_size must be a positive integer, got {size!r}")
  return size


def ensemble_apply(apply: Callable) -> Callable:
  """`apply(variables, *args)` over variables stacked along a leading member axis: the members' outputs
  averaged (computed one member at a time)."""
  def run(variables, *args, **kwargs):
    outputs = jax.lax.map(lambda member: apply(member, *args, **kwargs), variables)
    return jax.tree.map(lambda out: out.mean(0), outputs)
  return run


def apply_fn(config, model: nn.Module) -> Callable:
  """The apply function inference uses: the model's own, or `ensemble_apply` of it for an ensemble."""
  return ensemble_apply(model.apply) if ensemble_size(config) > 1 else model.apply


def abstract_variables(config, mesh) -> tuple[nn.Module, dict]:
  """(model, {'params', 'batch_stats'} as shapes and dtypes replicated over `mesh`): what a bundle or a
  checkpoint is restored into, computed without initialising anything; an ensemble's with its member axis."""
  model, init_shape = build(config)
  key = jax.random.key(0)
  shapes = jax.eval_shape(lambda: model.init({"params": key, "dropout": key}, np.zeros(init_shape, np.float32),
                                             train=False))
  replicated = mesh_lib.replicated(mesh)
  members = ensemble_size(config)
  lead = (members,) if members > 1 else ()
  variables = {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})}
  return model, jax.tree.map(lambda s: jax.ShapeDtypeStruct(lead + s.shape, s.dtype, sharding=replicated), variables)

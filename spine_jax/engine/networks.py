"""The one network builder: a task's config -> (flax module, input shape to initialise it with).

Training tasks and checkpoint inference both build their network here, so the architecture a
checkpoint is restored into is the one it was trained as (nnU-Net's single builder, shared by
its trainer and its predictor).
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import numpy as np

from spine_jax.engine import mesh as mesh_lib
from spine_jax.models import instance_unet
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


BUILDERS: dict[str, Callable] = {"bone_quality": _bone_quality, "semantic": _semantic, "instance": _instance}


def build(config) -> tuple[nn.Module, tuple[int, ...]]:
  """(model, init shape (1, *spatial, channels)) of `config.task`'s network."""
  name = config.get("task")
  if name not in BUILDERS:
    raise ValueError(f"config.task: unknown task {name!r} ({', '.join(BUILDERS)})")
  return BUILDERS[name](config)


def abstract_variables(config, mesh) -> tuple[nn.Module, dict]:
  """(model, {'params', 'batch_stats'} as shapes and dtypes replicated over `mesh`): what a bundle or a
  checkpoint is restored into, computed without initialising anything."""
  model, init_shape = build(config)
  key = jax.random.key(0)
  shapes = jax.eval_shape(lambda: model.init({"params": key, "dropout": key}, np.zeros(init_shape, np.float32),
                                             train=False))
  replicated = mesh_lib.replicated(mesh)
  variables = {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})}
  return model, jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), variables)

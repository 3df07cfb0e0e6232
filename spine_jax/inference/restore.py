"""A trained or converted model back for inference: a model bundle, or a training checkpoint.

A bundle (`engine/bundle.py`) holds the variables and the inference part of the config. A training
checkpoint holds the train state and the whole training config; restoring it rebuilds the
optimiser. A work directory may hold both (training writes its bundle at the end of a run): the
newer one is loaded, so a run continued after its bundle is read from its latest checkpoint.
"""
from __future__ import annotations

from spine_jax.engine import bundle
from spine_jax.engine import checkpoints
from spine_jax.engine import mesh as mesh_lib
from spine_jax.engine import networks
from spine_jax.engine import state as state_lib


def _check_task(config, task_name: str, where) -> None:
  if config.get("task") != task_name:
    raise checkpoints.CheckpointError(f"checkpoint {where} holds a {config.get('task')!r} model, not {task_name!r}")


def _newest_checkpoint_step(path) -> int | None:
  try:
    return checkpoints.find_checkpoint(path)[1]
  except checkpoints.CheckpointError:
    return None


def load_for_inference(checkpoint, task_name: str, mesh=None):
  """(state, config, mesh) of a bundle folder, a work directory, its checkpoints/ folder or one step
  folder: the model is rebuilt from the stored config, so architecture and preprocessing always
  match the weights."""
  mesh = mesh or mesh_lib.make_mesh()
  found = bundle.find_bundle(checkpoint)
  if found is not None:
    folder, step = found
    newer = _newest_checkpoint_step(checkpoint)
    if newer is None or newer <= step:
      config = bundle.read_config(folder)
      _check_task(config, task_name, folder)
      state, config = bundle.load_bundle(folder, mesh)
      return state, config, mesh
  config, root, step = checkpoints.load_config(checkpoint)
  _check_task(config, task_name, root / str(step))
  model, init_shape = networks.build(config)
  tx = state_lib.make_optimizer(config.optimizer, config.num_train_steps)
  abstract = state_lib.abstract_train_state(model, tx, init_shape, mesh)
  return checkpoints.restore_state_for_inference(root, step, abstract), config, mesh

"""A trained (or converted) checkpoint back as a train state, with the config it was trained with."""
from __future__ import annotations

from spine_jax.engine import checkpoints
from spine_jax.engine import mesh as mesh_lib
from spine_jax.engine import networks
from spine_jax.engine import state as state_lib


def load_for_inference(checkpoint, task_name: str, mesh=None):
  """(state, config, mesh): the model is rebuilt from the stored config, so architecture and
  preprocessing always match the weights."""
  config, root, step = checkpoints.load_config(checkpoint)
  if config.get("task") != task_name:
    raise checkpoints.CheckpointError(f"checkpoint {root / str(step)} holds a {config.get('task')!r} model, not "
                                      f"{task_name!r}")
  mesh = mesh or mesh_lib.make_mesh()
  model, init_shape = networks.build(config)
  tx = state_lib.make_optimizer(config.optimizer, config.num_train_steps)
  abstract = state_lib.abstract_train_state(model, tx, init_shape, mesh)
  return checkpoints.restore_state_for_inference(root, step, abstract), config, mesh

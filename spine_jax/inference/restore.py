"""A trained or converted model back for inference: from a model bundle, or from a training checkpoint.

A bundle (`engine/bundle.py`) holds the variables and the inference part of the config; a training
checkpoint holds the train state and the whole training config, of which only the model's variables
are read (a partial restore: no optimiser is built). A work directory may hold both (training
writes its bundle at the end of a run): the newer is loaded, so a run continued after its bundle
is read from its latest checkpoint. Either way the network is rebuilt from the stored config by the
one network builder, so architecture and preprocessing always match the weights.
"""
from __future__ import annotations

import pathlib

from spine_jax.engine import bundle
from spine_jax.engine import checkpoints
from spine_jax.engine import mesh as mesh_lib
from spine_jax.engine import networks
from spine_jax.engine import state as state_lib


def find_model(path) -> tuple[str, pathlib.Path]:
  """('bundle', its folder) or ('checkpoint', its step folder) that `path` (a bundle folder, a work
  directory, its checkpoints/ folder or one step folder) stands for: the newer of the two."""
  found = bundle.find_bundle(path)
  try:
    root, step = checkpoints.find_checkpoint(path)
  except checkpoints.CheckpointError:
    if found is None:
      raise
    return "bundle", found[0]
  if found is not None and found[1] >= step:
    return "bundle", found[0]
  return "checkpoint", root / str(step)


def _check_task(config, task_name: str, where) -> None:
  if config.get("task") != task_name:
    raise checkpoints.CheckpointError(f"checkpoint {where} holds a {config.get('task')!r} model, not {task_name!r}")


def load_for_inference(checkpoint, task_name: str, mesh=None):
  """(inference state replicated over the mesh, config, mesh) of a bundle or a training checkpoint."""
  mesh = mesh or mesh_lib.make_mesh()
  kind, where = find_model(checkpoint)
  if kind == "bundle":
    state, config = bundle.load_bundle(where, mesh)
    _check_task(config, task_name, where)
    return state, config, mesh
  config, root, step = checkpoints.load_config(where)
  _check_task(config, task_name, where)
  model, abstract = networks.abstract_variables(config, mesh)
  variables = checkpoints.restore_variables(root, step, abstract)
  state = state_lib.InferenceState(apply_fn=networks.apply_fn(config, model), params=variables["params"],
                                   batch_stats=variables["batch_stats"])
  return state, config, mesh

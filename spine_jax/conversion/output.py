"""Writing converted models: a step-0 checkpoint in the trainer's layout, published all at once."""
from __future__ import annotations

import pathlib
import shutil
import tempfile
from typing import Any, Mapping


def write_step0_checkpoint(directory, model, config, variables: Mapping[str, Any], *,
                           extra_files: Mapping[str, str] | None = None) -> pathlib.Path:
  """An orbax checkpoint (step 0: state with the config's optimizer at zero, and config) in the layout
  the trainer writes, so inference loads it as its own, into ``directory`` (not yet existing)."""
  import jax
  import jax.numpy as jnp
  import orbax.checkpoint as ocp

  from spine_jax.data import nifti
  from spine_jax.engine import mesh as mesh_lib
  from spine_jax.engine import state as state_lib

  directory = pathlib.Path(directory).absolute()
  replicated = mesh_lib.replicated(mesh_lib.make_mesh())
  tx = state_lib.make_optimizer(config.optimizer, config.num_train_steps)
  state = state_lib.TrainState.create(apply_fn=model.apply, params=jax.device_put(variables["params"], replicated),
                                      tx=tx, batch_stats=jax.device_put(variables.get("batch_stats", {}), replicated))
  state = state.replace(step=jax.device_put(jnp.asarray(0, jnp.int32), replicated))
  options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
  with ocp.CheckpointManager(directory / "checkpoints", options=options, item_names=("state", "config")) as mngr:
    mngr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                         config=ocp.args.JsonSave(config.to_dict())))
    mngr.wait_until_finished()
  for name, text in (extra_files or {}).items():
    nifti.atomic_write_text(directory / name, text)
  return directory


def replace_directory(tmp: pathlib.Path, output: pathlib.Path) -> None:
  """Put the finished ``tmp`` at ``output`` by renames, moving an old ``output`` aside first and
  deleting it only after, so ``output`` is never half written."""
  if output.exists():
    old = pathlib.Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".old", dir=output.parent))
    output.rename(old / output.name)
    tmp.rename(output)
    shutil.rmtree(old, ignore_errors=True)
  else:
    tmp.rename(output)

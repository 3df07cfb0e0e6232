"""Orbax checkpoints of the train state, every process's data-iterator state and the config."""
from __future__ import annotations

import json
import pathlib

import grain
import ml_collections
import orbax.checkpoint as ocp


def manager(workdir, *, max_to_keep: int = 2, read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(pathlib.Path(workdir).absolute() / "checkpoints", options=options,
                               item_names=("state", "data_iter", "config"))


def save(mngr: ocp.CheckpointManager, step: int, state, data_iter, config: ml_collections.ConfigDict) -> None:
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data_iter=grain.checkpoint.CheckpointSave(data_iter),
      config=ocp.args.JsonSave(config.to_dict())), force=True)
  mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, abstract_state, data_iter=None, step: int | None = None):
  """Restores into `abstract_state` (ShapeDtypeStructs with shardings); the iterator in place if given."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {mngr.directory}")
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iter is not None:
    items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
  restored = mngr.restore(step, args=ocp.args.Composite(**items))
  return restored["state"], step


def find_checkpoint(path) -> tuple[pathlib.Path, int]:
  """Accepts a work directory, its checkpoints/ folder, or one step folder; returns (checkpoints dir, step)."""
  path = pathlib.Path(path).absolute()
  if not path.exists():
    raise FileNotFoundError(f"checkpoint path {path} does not exist")
  for root in (path / "checkpoints", path):
    if root.is_dir():
      steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "state").exists())
      if steps:
        return root, steps[-1]
  if path.name.isdigit() and (path / "state").exists():
    return path.parent, int(path.name)
  raise FileNotFoundError(f"no spine_jax checkpoint (a step folder with 'state') under {path}")


def load_config(path) -> tuple[ml_collections.ConfigDict, pathlib.Path, int]:
  """The config stored beside a checkpoint, so inference rebuilds exactly the trained model."""
  root, step = find_checkpoint(path)
  cfg_file = root / str(step) / "config" / "metadata"
  if not cfg_file.exists():
    candidates = list((root / str(step) / "config").glob("*"))
    if not candidates:
      raise FileNotFoundError(f"checkpoint {root / str(step)} holds no config")
    cfg_file = candidates[0]
  return ml_collections.ConfigDict(json.loads(cfg_file.read_text())), root, step


def restore_state_for_inference(root: pathlib.Path, step: int, abstract_state):
  mngr = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(read_only=True),
                               item_names=("state", "data_iter", "config"))
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  return restored["state"]

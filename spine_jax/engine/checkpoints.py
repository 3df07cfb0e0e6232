"""Orbax checkpoints of the train state, every process's data-iterator state and the config.

Every process of a multi-host run calls save/restore: orbax writes the (replicated) state once and
each process its own `data_iter/process_<i>-of-<n>.json`. A step folder appears only when complete, so
a run killed mid-save resumes from the step before.
"""
from __future__ import annotations

import json
import pathlib
import re

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging


class CheckpointError(ValueError):
  """A path that is no usable checkpoint: absent, not a checkpoint, incomplete or unreadable, or of another task."""


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def manager(workdir, *, max_to_keep: int = 2, read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
                                         enable_async_checkpointing=False, cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(pathlib.Path(workdir).absolute() / "checkpoints", options=options,
                               item_names=("state", "data_iter", "config"))


def latest_step(workdir) -> int | None:
  """The newest saved step of a work directory (None for a new run), creating nothing."""
  if not (pathlib.Path(workdir).absolute() / "checkpoints").is_dir():
    return None
  return manager(workdir, read_only=True).latest_step()


def save(mngr: ocp.CheckpointManager, step: int, state, data_iter, config: ml_collections.ConfigDict) -> None:
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data_iter=grain.checkpoint.CheckpointSave(data_iter),
      config=ocp.args.JsonSave(config.to_dict())), force=True)
  mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, abstract_state, data_iter=None, step: int | None = None):
  """Restores into `abstract_state` (ShapeDtypeStructs with shardings); the iterator in place if given.

  The targets' shardings decide the placement, so a checkpoint restores onto any device count.
  """
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {mngr.directory}")
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  except Exception as e:  # noqa: BLE001 - orbax/TensorStore raise many kinds; the user needs the folder
    raise CheckpointError(f"checkpoint {pathlib.Path(mngr.directory) / str(step)} cannot be restored into this "
                          f"config's model (damaged, or written for another model): {_first_line(e)}") from e
  if data_iter is not None:
    data_iter.set_state(iterator_state(pathlib.Path(mngr.directory) / str(step) / "data_iter",
                                       jax.process_index(), jax.process_count()))
    if hasattr(data_iter, "start_prefetch"):  # as grain's own CheckpointRestore does
      data_iter.start_prefetch()
  return restored["state"], step


_ITER_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


def iterator_state(directory, process_index: int, process_count: int) -> dict:
  """This process's data-iterator state, also from a checkpoint written by a different number of processes.

  Every process of a run holds the same `{'next_index': k}` (k global batches consumed; see
  data/pipelines.py), so such a state restores on any process count. Any other state (grain worker
  processes keep per-worker positions) restores only on the process count that wrote it.
  """
  directory = pathlib.Path(directory)
  own = directory / f"process_{process_index}-of-{process_count}.json"
  if own.exists():
    return json.loads(own.read_text())
  found = {}
  for f in directory.glob("process_*-of-*.json") if directory.is_dir() else ():
    m = _ITER_FILE.fullmatch(f.name)
    if m:
      found.setdefault(int(m.group(2)), {})[int(m.group(1))] = json.loads(f.read_text())
  if not found:
    raise FileNotFoundError(f"checkpoint {directory.parent} holds no data-iterator state in {directory}")
  if len(found) > 1:
    raise ValueError(f"checkpoint {directory.parent} mixes data-iterator states of {sorted(found)} processes")
  (written_by, states), = found.items()
  missing = sorted(set(range(written_by)) - set(states))
  if missing:
    raise ValueError(f"checkpoint {directory.parent} lacks the data-iterator state of process(es) {missing} of "
                     f"{written_by}: it is incomplete")
  first = states[0]
  if set(first) != {"next_index"} or any(s != first for s in states.values()):
    raise ValueError(
        f"checkpoint {directory.parent} was written by {written_by} processes and its data-iterator states are "
        f"per-process ({sorted(first)}), so it cannot restore on {process_count} processes; resume with "
        f"{written_by} processes, or with config.data.num_workers=0 in both runs")
  logging.warning("data-iterator state written by %d processes restored on %d: next global batch %d",
                  written_by, process_count, first["next_index"])
  return dict(first)


def find_checkpoint(path) -> tuple[pathlib.Path, int]:
  """Accepts a work directory, its checkpoints/ folder, or one step folder; returns (checkpoints dir, step)."""
  path = pathlib.Path(path).absolute()
  if not path.exists():
    raise CheckpointError(f"checkpoint path {path} does not exist")
  for root in (path / "checkpoints", path):
    if root.is_dir():
      steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "state").exists())
      if steps:
        return root, steps[-1]
  if path.name.isdigit() and (path / "state").exists():
    return path.parent, int(path.name)
  raise CheckpointError(f"no spine_jax checkpoint (a step folder with 'state') under {path}")


# Task names that checkpoints and bundles written by earlier versions carry, and their name now.
FORMER_TASK_NAMES = {"mtl": "bone_quality"}


def stored_config(fields: dict) -> ml_collections.ConfigDict:
  """A config read back from a checkpoint or a bundle, under today's task name."""
  config = ml_collections.ConfigDict(fields)
  if config.get("task") in FORMER_TASK_NAMES:
    config.task = FORMER_TASK_NAMES[config.task]
  return config


def load_config(path) -> tuple[ml_collections.ConfigDict, pathlib.Path, int]:
  """The config stored beside a checkpoint, so inference rebuilds exactly the trained model."""
  root, step = find_checkpoint(path)
  cfg_file = root / str(step) / "config" / "metadata"
  if not cfg_file.exists():
    candidates = list((root / str(step) / "config").glob("*"))
    if not candidates:
      raise CheckpointError(f"checkpoint {root / str(step)} holds no config")
    cfg_file = candidates[0]
  try:
    return stored_config(json.loads(cfg_file.read_text())), root, step
  except (OSError, ValueError) as e:
    raise CheckpointError(f"checkpoint {root / str(step)}: its config {cfg_file} is not readable JSON ({e})") from None


def restore_variables(root: pathlib.Path, step: int, abstract_variables: dict) -> dict:
  """The model's variables ({'params', 'batch_stats'}) of a checkpoint, without its optimiser state:
  a partial restore into `abstract_variables` (shapes, dtypes and shardings)."""
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # orbax warns that a read-only manager neither saves nor creates
  try:
    mngr = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(read_only=True),
                                 item_names=("state", "data_iter", "config"))
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_variables)
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=abstract_variables, restore_args=restore_args, partial_restore=True)))
  except Exception as e:  # noqa: BLE001 - orbax/TensorStore raise many kinds; the user needs the folder
    raise CheckpointError(f"checkpoint {root / str(step)} cannot be read (damaged, incomplete, or not this "
                          f"config's model): {_first_line(e)}") from e
  finally:
    logging.set_verbosity(verbosity)
  return {"params": restored["state"]["params"], "batch_stats": restored["state"].get("batch_stats", {})}

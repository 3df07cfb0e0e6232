"""A training checkpoint of any step -> a model bundle: its variables and inference config, no optimiser.

Training writes a bundle at the end of a run; this takes one from any saved step (the best
held-out step of a long run, or one to share before the run ends) by the same partial restore that
inference uses, so the bundle predicts exactly as the checkpoint does.
"""
from __future__ import annotations

import pathlib

from spine_jax.conversion.errors import ConversionError, refuse_existing
from spine_jax.engine import bundle
from spine_jax.engine import checkpoints
from spine_jax.engine import mesh as mesh_lib
from spine_jax.engine import networks


def checkpoint_to_bundle(path, output, *, overwrite: bool = False) -> dict:
  """Writes the bundle of `path` (a work directory: its latest step; its checkpoints/ folder; or one
  step folder) at `output`; returns a summary."""
  output = pathlib.Path(output).absolute()
  try:
    config, root, step = checkpoints.load_config(path)
    refuse_existing(output, overwrite)
    _, abstract = networks.abstract_variables(config, mesh_lib.make_mesh())
    variables = checkpoints.restore_variables(root, step, abstract)
  except checkpoints.CheckpointError as e:
    raise ConversionError(str(e)) from None
  except ValueError as e:  # networks.build: a config of no known task
    raise ConversionError(f"checkpoint {path}: {e}") from None
  bundle.write_bundle(output, config, variables, step=step)
  return {"source": str(root / str(step)), "task": config.task, "step": step, "output": str(output)}

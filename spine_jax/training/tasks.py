"""What the training loop drives: the `Task` protocol, and the registry of tasks by `config.task`."""
from __future__ import annotations

import pathlib
from typing import Any, Callable, Iterator, Protocol

import flax.linen as nn

from spine_jax.training.bone_quality import BoneQualityTask
from spine_jax.training.instance import InstanceTask
from spine_jax.training.labeling import LabelingTask
from spine_jax.training.segmentation import SemanticTask


class Task(Protocol):
  """A trainable model: its network (from `engine.networks`), step, data and evaluation."""

  config: Any
  model: nn.Module
  init_shape: tuple[int, ...]
  train_step: Callable  # (state, batch, *, config) -> (state, metrics), jit-compiled by the loop

  def initial_state(self, state):
    """A new run's state before step 0 (e.g. a pretrained trunk); resumed runs never come here."""

  def train_iterator(self, process_index: int | None = None, process_count: int | None = None) -> Iterator:
    """This process's shard of the training batches (a checkpointable grain iterator)."""

  def evaluate(self, state, mesh, workdir: pathlib.Path | None = None) -> dict:
    """The held-out report (eval.json), through the predict functions inference uses."""


TASKS: dict[str, Callable[[Any], Task]] = {"bone_quality": BoneQualityTask, "semantic": SemanticTask, "instance": InstanceTask,
                                          "labeling": LabelingTask}


def get_task(config) -> Task:
  name = config.task
  if name not in TASKS:
    raise ValueError(f"config.task: unknown task {name!r} ({', '.join(TASKS)})")
  return TASKS[name](config)

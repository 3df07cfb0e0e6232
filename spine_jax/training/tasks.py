"""config.task -> the task object the training loop drives."""
from __future__ import annotations


def get_task(config):
  name = config.task
  if name == "mtl":
    from spine_jax.training.classifier import ClassifierTask
    return ClassifierTask(config)
  if name == "semantic":
    from spine_jax.training.segmentation import SemanticTask
    return SemanticTask(config)
  if name == "instance":
    from spine_jax.training.instance import InstanceTask
    return InstanceTask(config)
  raise ValueError(f"config.task: unknown task {name!r} (mtl, semantic, instance)")

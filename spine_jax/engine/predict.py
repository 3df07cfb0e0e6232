"""Predict functions: a model's inference forward pass, jit-compiled once with the batch split over the mesh.

One wrapper (`sharded`) serves every model: the state replicated, the batch sharded along its first
axis, a batch the devices cannot split evenly padded with zeros and the padding dropped, the result
fetched to the host as numpy. Training's evaluations and inference pipelines both take these
functions, so they run the very same compiled forward pass.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from spine_jax.data import instance_cutouts as cutouts
from spine_jax.engine import mesh as mesh_lib


def _variables(state) -> dict:
  variables = {"params": state.params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  return variables


def classifier_probabilities(state, images):
  """Class probabilities of every head of the multi-task classifier (softmax, or sigmoid for a binary head)."""
  outputs = state.apply_fn(_variables(state), images, train=False)
  return {name: jax.nn.sigmoid(logits) if logits.ndim == 1 else jax.nn.softmax(logits, axis=-1)
          for name, logits in outputs.items()}


def segmentation_logits(state, images):
  """Full-resolution logits of a U-Net (its deep-supervision heads are training-time only)."""
  out = state.apply_fn(_variables(state), images, train=False)
  return out[0] if isinstance(out, (list, tuple)) else out


def instance_classes(state, cutout_classes):
  """Instance-network classes 0..3 (uint8) of cutouts given as input classes (N, X, Y, Z) uint8."""
  x = jax.nn.one_hot(cutout_classes, cutouts.INPUT_CLASSES, dtype=jnp.float32)
  return segmentation_logits(state, x).argmax(-1).astype(jnp.uint8)


def sharded(forward: Callable, state, mesh, fetch: bool = True) -> Callable[[np.ndarray], object]:
  """`batch (numpy) -> forward(state, batch)` on the host, the batch split over `mesh` and padded to a
  multiple of its devices (the padding dropped from every output). With `fetch` false, a batch the devices
  split evenly comes back as device arrays at once, still being computed (`np.asarray` waits for them): the
  caller's host work on the previous answer overlaps the device's on this one."""
  fn = jax.jit(forward, in_shardings=(mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)))
  n_dev = mesh.devices.size

  def predict(x):
    x = np.asarray(x)
    b = len(x)
    if b % n_dev:
      x = np.concatenate([x, np.zeros((n_dev - b % n_dev, *x.shape[1:]), x.dtype)])
    out = fn(state, mesh_lib.global_batch(x, mesh))
    if not fetch and len(x) == b and jax.process_count() == 1:
      return out
    return jax.tree.map(lambda v: np.asarray(v)[:b], jax.device_get(out))
  return predict


def classifier_predict_fn(state, mesh):
  """Slices (B, H, W, C) -> {head: probabilities (B, ...)} as numpy."""
  return sharded(classifier_probabilities, state, mesh)


def semantic_logits_fn(state, mesh):
  """Patches (B, X, Y, Z, C) -> full-resolution logits (device arrays, still being computed, when the batch
  needs no padding; `np.asarray` them)."""
  return sharded(segmentation_logits, state, mesh, fetch=False)


def instance_predict_fn(state, mesh):
  """Cutouts -> classes 0..3 (uint8 numpy): (N, X, Y, Z) input classes, or (N, X, Y, Z, 10) one-hot as
  phase 2 sends them (taken back to classes on the host: a tenth of the transfer; all-zero padding
  cutouts become background)."""
  predict = sharded(instance_classes, state, mesh)

  def classes(x):
    x = np.asarray(x)
    if x.ndim == 5:
      x = x.argmax(-1)
    return predict(x.astype(np.uint8))
  return classes

"""Devices, the data-parallel mesh, and global batches.

Training is plain `jax.jit` over a one-axis mesh named 'data' that spans every device of every
process: parameters are replicated, batches are split along their leading axis, and XLA inserts the
gradient all-reduce. BatchNorm statistics are global under this scheme, so modules use no axis_name.
"""
from __future__ import annotations

import socket

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from spine_jax.config_variants import ConfigError

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A 1-D data-parallel mesh over all (or the first `num_devices`) global devices."""
  devices = jax.devices()
  n = len(devices) if num_devices is None else num_devices
  if n > len(devices):
    raise ValueError(f"asked for {n} devices, only {len(devices)} exist")
  return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices[:n])


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def local_batch_size(global_batch_size: int, mesh) -> int:
  """The share of the global batch that this process loads."""
  n_dev = mesh.devices.size
  if global_batch_size < 1:
    raise ConfigError(f"config.batch_size {global_batch_size}: must be a positive multiple of the {n_dev} "
                      f"device(s) of the mesh")
  if global_batch_size % n_dev:
    raise ConfigError(f"config.batch_size {global_batch_size} is not divisible by the {n_dev} devices of the mesh")
  return global_batch_size // jax.process_count()


def global_batch(local_batch, mesh):
  """Per-process numpy batches -> global jax.Arrays sharded along the batch axis."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def local_mesh() -> jax.sharding.Mesh:
  """The same one-axis mesh over this process's devices only, for work each process does on its own."""
  devices = jax.local_devices()
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def local_copy(tree, mesh):
  """Replicated global arrays -> the same values replicated over `mesh` (this process's devices); no transfer
  between processes, since every process already holds a full copy."""
  sharding = replicated(mesh)
  return jax.tree.map(lambda x: jax.device_put(x.addressable_data(0), sharding), tree)


def describe(mesh) -> str:
  return (f"process {jax.process_index()}/{jax.process_count()} on {socket.gethostname()}: local devices "
          f"{[d.id for d in jax.local_devices()]}, mesh {dict(mesh.shape)} over {mesh.devices.size} devices "
          f"({jax.devices()[0].platform})")

"""Train state and its creation with shardings: shapes first, then a jitted init placed on the mesh;
and the inference state, a train state without its optimiser."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct
from flax.training import train_state

from spine_jax.engine import mesh as mesh_lib


class TrainState(train_state.TrainState):
  """Flax's TrainState plus the model's non-trainable collections (BatchNorm statistics)."""
  batch_stats: Any = struct.field(default_factory=dict)


class InferenceState(struct.PyTreeNode):
  """What the predict functions use of a model: its apply function and variables, no optimiser."""
  apply_fn: Callable = struct.field(pytree_node=False)
  params: Any
  batch_stats: Any


def learning_rate_schedule(opt: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """Linear warm-up then cosine (or constant, or polynomial 0.9 as in nnU-Net) decay."""
  peak = opt.learning_rate
  warmup = min(opt.get("warmup_steps", 0), max(num_steps - 1, 0))
  kind = opt.get("schedule", "cosine")
  rest = max(num_steps - warmup, 1)
  if kind == "cosine":
    decay = optax.cosine_decay_schedule(peak, rest, alpha=opt.get("end_learning_rate_factor", 0.0))
  elif kind == "poly":
    decay = optax.polynomial_schedule(peak, peak * opt.get("end_learning_rate_factor", 0.0), 0.9, rest)
  elif kind == "constant":
    decay = optax.constant_schedule(peak)
  else:
    raise ValueError(f"config.optimizer.schedule: unknown schedule {kind!r} (cosine, poly, constant)")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def make_optimizer(opt: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
  lr = learning_rate_schedule(opt, num_steps)
  name = opt.name
  if name == "adamw":
    tx = optax.adamw(lr, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay)
  elif name == "adam":  # PyTorch-style coupled L2 weight decay, as the authors' Adam(weight_decay=...)
    tx = optax.chain(optax.add_decayed_weights(opt.weight_decay), optax.adam(lr, b1=opt.b1, b2=opt.b2))
  elif name == "sgd":
    tx = optax.chain(optax.add_decayed_weights(opt.weight_decay),
                     optax.sgd(lr, momentum=opt.get("momentum", 0.99), nesterov=opt.get("nesterov", True)))
  else:
    raise ValueError(f"config.optimizer.name: unknown optimizer {name!r} (adamw, adam, sgd)")
  clip = opt.get("grad_clip_norm", 0.0)
  return optax.chain(optax.clip_by_global_norm(clip), tx) if clip else tx


def _init_fn(model, tx, input_shape, dtype):
  def init(rng):
    variables = model.init({"params": rng, "dropout": rng}, jnp.zeros(input_shape, dtype), train=False)
    params = variables["params"]
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                             batch_stats=variables.get("batch_stats", {}))
  return init


def abstract_train_state(model, tx, input_shape, mesh, dtype=jnp.float32):
  """Shapes and shardings of the state, without computing anything (restore targets)."""
  shapes = jax.eval_shape(_init_fn(model, tx, input_shape, dtype), jax.random.key(0))
  sharding = mesh_lib.replicated(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def create_train_state(model, tx, input_shape, rng, mesh, dtype=jnp.float32) -> TrainState:
  """Initialise parameters directly into their (replicated) shardings on the mesh."""
  shardings = jax.tree.map(lambda s: s.sharding, abstract_train_state(model, tx, input_shape, mesh, dtype))
  return jax.jit(_init_fn(model, tx, input_shape, dtype), out_shardings=shardings)(rng)


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))

"""train_step / eval_step of the bone-quality classifier. Pure functions of (state, batch)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from spine_jax.training import losses
from spine_jax.training import self_paced


def classifier_train_step(state, batch, *, config):
  """One optimiser step on a global batch; self-paced weights over the whole global batch."""
  dropout_rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
  spl = config.self_paced

  def loss_fn(params):
    outputs, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
        mutable=["batch_stats"], rngs={"dropout": dropout_rng})
    per_sample, per_task = losses.multitask_losses(
        outputs, batch, config.loss.smoothing, dict(config.loss.task_weights))
    weights = self_paced.self_paced_weights(per_sample, state.step, spl)
    loss = self_paced.weighted_mean(per_sample, weights, spl.eps)
    return loss, (updates, per_sample, per_task, weights, outputs)

  (loss, (updates, per_sample, per_task, weights, outputs)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats))
  metrics = {"loss": loss, "plain_loss": per_sample.mean(), "spl_kept": weights.mean(),
             "grad_norm": _global_norm(grads)}
  metrics.update({f"loss_{k}": v.mean() for k, v in per_task.items()})
  if "quality" in outputs:
    metrics["acc_quality"] = (outputs["quality"].argmax(-1) == batch["quality"]).mean()
  if "posterolateral" in outputs:
    metrics["acc_posterolateral"] = (outputs["posterolateral"].argmax(-1) == batch["posterolateral"]).mean()
  return state, metrics


def classifier_eval_step(state, images):
  """Class probabilities of every head the model has (softmax / sigmoid of its logits)."""
  outputs = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, images, train=False)
  probs = {}
  for name, logits in outputs.items():
    probs[name] = jax.nn.sigmoid(logits) if logits.ndim == 1 else jax.nn.softmax(logits, axis=-1)
  return probs


def _global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def jit_train_step(step_fn, config, state_sharding, batch_sharding):
  """jit with the state donated, the state replicated and the batch split over the mesh."""
  return jax.jit(functools.partial(step_fn, config=config), donate_argnums=0,
                 in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, None))

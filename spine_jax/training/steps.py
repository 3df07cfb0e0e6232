"""train_step / eval_step per task (classifier, segmentation). Pure functions of (state, batch)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from spine_jax.training import losses
from spine_jax.training import self_paced


def bone_quality_train_step(state, batch, *, config):
  """One optimiser step on a global batch; self-paced weights over the whole global batch."""
  dropout_rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
  spl = config.self_paced

  def loss_fn(params):
    outputs, updates = _apply_train(state, params, batch["image"], dropout_rng)
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


def _global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def jit_train_step(step_fn, config, state_sharding, batch_sharding):
  """jit with the state donated, the state replicated and the batch split over the mesh."""
  return jax.jit(functools.partial(step_fn, config=config), donate_argnums=0,
                 in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, None))


def _apply_train(state, params, x, rng):
  """Train-mode forward pass; BatchNorm statistics are updated only when the model has them."""
  variables = {"params": params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
    return state.apply_fn(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": rng})
  return state.apply_fn(variables, x, train=True, rngs={"dropout": rng}), {}


def segmentation_train_step(state, batch, *, config):
  """Dice + CE over the deep-supervision outputs; metrics include nnU-Net's online pseudo-Dice."""
  rng = jax.random.fold_in(jax.random.key(config.seed), state.step)

  def loss_fn(params):
    outputs, updates = _apply_train(state, params, batch["image"], rng)
    total, per_level = losses.deep_supervision_loss(
        outputs, batch["labels"], batch_dice=config.loss.batch_dice,
        present_only=bool(config.loss.get("present_only", False)),
        dice_weight=float(config.loss.get("dice_weight", 1.0)), ce_weight=float(config.loss.get("ce_weight", 1.0)))
    return total, (updates, outputs, per_level)

  (loss, (updates, outputs, per_level)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats))
  full = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
  return state, {"loss": loss, "loss_full_res": per_level[0], "grad_norm": _global_norm(grads),
                 "dice": pseudo_dice(full.argmax(-1), batch["labels"], full.shape[-1])}


def pseudo_dice(pred, labels, num_classes):
  """Mean Dice over the foreground classes present in prediction or truth (the batch pooled)."""
  classes = jnp.arange(1, num_classes)
  p = pred[..., None] == classes
  t = labels[..., None] == classes
  axes = tuple(range(pred.ndim))
  tp = jnp.sum(p & t, axis=axes)
  denom = jnp.sum(p, axis=axes) + jnp.sum(t, axis=axes)
  present = denom > 0
  return jnp.sum(jnp.where(present, 2.0 * tp / jnp.maximum(denom, 1), 0.0)) / jnp.maximum(present.sum(), 1)


def labeling_train_step(state, batch, *, config):
  """One step of the labelling network: the weighted sum of its groups' cross-entropies, averaged over
  the global batch; metrics are the loss per group and each group's accuracy."""
  rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
  targets = batch["targets"]
  patches = batch["patch"][..., None]  # (B, P, I, R) -> one channel

  def loss_fn(params):
    outputs, updates = _apply_train(state, params, patches, rng)
    per_sample, per_group = losses.grouped_cross_entropy(outputs, targets, config.loss.group_weights,
                                                         config.loss.smoothing)
    return per_sample.mean(), (updates, outputs, per_group)

  (loss, (updates, outputs, per_group)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats))
  metrics = {"loss": loss, "grad_norm": _global_norm(grads)}
  metrics.update({f"loss_{g}": v.mean() for g, v in per_group.items()})
  metrics.update({f"acc_{g}": (outputs[g].argmax(-1) == targets[g]).mean() for g in outputs})
  return state, metrics

"""Per-sample classification losses for the bone-quality multi-task model.

Every function returns one loss per sample (no reduction) so that self-paced
learning can weight samples before averaging. Losses are computed in float32
whatever the logits' dtype, since bf16 log-probabilities lose the small
differences label smoothing relies on.
"""
import jax
import jax.numpy as jnp
import optax

QUALITY_NORMAL, QUALITY_BLASTIC, QUALITY_MIXED, QUALITY_LYTIC = 0, 1, 2, 3
TASKS = ('blastic', 'lytic', 'quality', 'posterolateral')


def smoothed_cross_entropy(logits, labels, smoothing):
  """Cross-entropy against (1-ε)·onehot + ε/C targets, as torch's label_smoothing=ε.

  Args:
    logits: (B, C) unnormalised scores.
    labels: (B,) int class indices.
    smoothing: ε in [0, 1).

  Returns:
    (B,) float32 losses.
  """
  logits = jnp.asarray(logits, jnp.float32)
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32), smoothing)
  return -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def smoothed_binary_cross_entropy(logits, labels, smoothing):
  """Binary cross-entropy against y(1-ε) + ε/2 targets, stable for large |logits|.

  Args:
    logits: (B,) unnormalised scores of the positive class.
    labels: (B,) {0, 1}.
    smoothing: ε in [0, 1).

  Returns:
    (B,) float32 losses.
  """
  logits = jnp.asarray(logits, jnp.float32)
  targets = jnp.asarray(labels, jnp.float32) * (1.0 - smoothing) + 0.5 * smoothing
  return optax.sigmoid_binary_cross_entropy(logits, targets)


def subtask_targets(quality):
  """Binary 'is blastic' and 'is lytic' targets: a mixed lesion is both at once."""
  quality = jnp.asarray(quality)
  is_blastic = (quality == QUALITY_BLASTIC) | (quality == QUALITY_MIXED)
  is_lytic = (quality == QUALITY_LYTIC) | (quality == QUALITY_MIXED)
  return is_blastic.astype(jnp.int32), is_lytic.astype(jnp.int32)


def multitask_losses(outputs, batch, smoothing, task_weights):
  """Weighted sum of the per-sample losses of whichever heads the model has.

  Args:
    outputs: any of 'blastic' (B,), 'lytic' (B,), 'quality' (B, 4) and
      'posterolateral' (B, 3) logits; absent heads are skipped, so one function
      serves single-task baselines and the multi-task model alike. Other keys
      (e.g. features) are ignored.
    batch: 'quality' (B,) and, when the model has that head, 'posterolateral'
      (B,) int labels.
    smoothing: label-smoothing ε shared by all heads.
    task_weights: dict or ConfigDict head name -> weight; a head without an
      entry weighs 1.

  Returns:
    (per_sample_total (B,), per_task) where per_task maps each present head to
    its unweighted (B,) losses, for logging.
  """
  present = [name for name in TASKS if name in outputs]
  if not present:
    raise ValueError(f'outputs has none of the heads {TASKS}; got {sorted(outputs)}')
  is_blastic, is_lytic = subtask_targets(batch['quality'])
  per_task = {}
  if 'blastic' in outputs:
    per_task['blastic'] = smoothed_binary_cross_entropy(outputs['blastic'], is_blastic, smoothing)
  if 'lytic' in outputs:
    per_task['lytic'] = smoothed_binary_cross_entropy(outputs['lytic'], is_lytic, smoothing)
  if 'quality' in outputs:
    per_task['quality'] = smoothed_cross_entropy(outputs['quality'], batch['quality'], smoothing)
  if 'posterolateral' in outputs:
    per_task['posterolateral'] = smoothed_cross_entropy(
        outputs['posterolateral'], batch['posterolateral'], smoothing)
  total = sum(task_weights.get(name, 1.0) * per_task[name] for name in present)
  return total, per_task

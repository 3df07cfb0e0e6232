"""Losses: per-sample classification losses of the bone-quality model; Dice + CE for segmentation.

The classification functions return one loss per sample (no reduction) so that self-paced
learning can weight samples before averaging. Losses are computed in float32 whatever the logits'
dtype, since bf16 log-probabilities lose the small differences label smoothing relies on.
"""
import jax
import jax.numpy as jnp
import numpy as np
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


def soft_dice_loss(logits, labels, *, batch_dice=True, include_background=False, smooth=1e-5,
                   present_only=False):
  """nnU-Net's soft Dice loss: −mean over classes of (2·Σpy + s) / (Σp + Σy + s).

  Args:
    logits: (B, X, Y, Z, K) scores. labels: (B, X, Y, Z) int class indices.
    batch_dice: sums over the batch as well as space (nnU-Net's batch_dice), so a class absent
      from one patch does not get a Dice of 0 for that patch.
    present_only: average over the classes the labels hold (per sample without batch_dice). With
      nnU-Net's plain mean, a class absent from a patch scores 1 only when its probability sums to
      about `smooth` over the whole patch, which rewards suppressing everywhere a class that few
      patches hold. Cross-entropy still penalises false positives of absent classes.
  """
  logits = jnp.asarray(logits, jnp.float32)
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
  return _soft_dice(jax.nn.softmax(logits, axis=-1), onehot, batch_dice, include_background, smooth, present_only)


def _soft_dice(probs, onehot, batch_dice, include_background, smooth, present_only=False):
  if not include_background:
    probs, onehot = probs[..., 1:], onehot[..., 1:]
  axes = tuple(range(probs.ndim - 1)) if batch_dice else tuple(range(1, probs.ndim - 1))
  intersect = jnp.sum(probs * onehot, axis=axes)
  volume = jnp.sum(onehot, axis=axes)
  dice = (2.0 * intersect + smooth) / jnp.maximum(jnp.sum(probs, axis=axes) + volume + smooth, 1e-8)
  if not present_only:
    return -jnp.mean(dice)
  present = (volume > 0).astype(dice.dtype)
  return -jnp.sum(dice * present) / jnp.maximum(jnp.sum(present), 1.0)


def dice_ce_loss(logits, labels, *, dice_weight=1.0, ce_weight=1.0, batch_dice=True, smooth=1e-5,
                 present_only=False):
  """nnU-Net's DC_and_CE_loss: voxel-mean cross-entropy plus soft Dice (background excluded;
  `present_only` as in `soft_dice_loss`).

  Cross-entropy is taken against the one-hot targets the Dice needs anyway, which avoids the
  gather (and its scatter-add gradient) of integer-label cross-entropy.
  """
  logits = jnp.asarray(logits, jnp.float32)
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  ce = -jnp.mean(jnp.sum(onehot * log_probs, axis=-1))
  dice = _soft_dice(jnp.exp(log_probs), onehot, batch_dice, False, smooth, present_only)
  return ce_weight * ce + dice_weight * dice


def deep_supervision_weights(n: int) -> np.ndarray:
  """1, 1/2, 1/4, ... for outputs from full to lowest resolution; the lowest gets 0 (as nnU-Net v2);
  normalised to sum to 1."""
  w = np.array([0.5 ** i for i in range(n)], np.float32)
  if n > 1:
    w[-1] = 0.0
  return w / w.sum()


def deep_supervision_loss(outputs, labels, **kwargs):
  """Dice + CE summed over deep-supervision outputs against nearest-downsampled labels.

  outputs: list of (B, X/f, Y/f, Z/f, K) logits, full resolution first (or one array);
  each level's labels are the full-resolution labels taken every f voxels along each axis, f read
  off the shapes. Returns (total, per-level losses).
  """
  if not isinstance(outputs, (list, tuple)):
    outputs = [outputs]
  weights = deep_supervision_weights(len(outputs))
  full = labels.shape[1:4]
  per_level = []
  for out in outputs:
    f = [a // b for a, b in zip(full, out.shape[1:4])]
    per_level.append(dice_ce_loss(out, labels[:, ::f[0], ::f[1], ::f[2]], **kwargs))
  total = sum(float(w) * l for w, l in zip(weights, per_level) if w > 0)
  return total, per_level


def grouped_cross_entropy(outputs, targets, group_weights, smoothing=0.0):
  """The labelling network's loss: a weighted sum over output groups of each group's cross-entropy
  (PLClassifier's per-head CE, summed).

  Args:
    outputs: {group: (B, C_g) logits}.
    targets: {group: (B,) int class indices}; every group of `outputs` needs one.
    group_weights: dict or ConfigDict group -> weight; a group without an entry weighs 1.
    smoothing: label-smoothing ε shared by all groups.

  Returns:
    (per_sample_total (B,), per_group {group: (B,) unweighted losses}).
  """
  missing = [g for g in outputs if g not in targets]
  if missing:
    raise ValueError(f'no targets for the groups {missing}; targets hold {sorted(targets)}')
  per_group = {g: smoothed_cross_entropy(logits, targets[g], smoothing) for g, logits in outputs.items()}
  weights = dict(group_weights)
  total = sum(float(weights.get(g, 1.0)) * loss for g, loss in per_group.items())
  return total, per_group

"""Per-sample losses: smoothing matches the closed forms, stability, multi-task wiring."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spine_jax.training import losses


def _reference_ce(logits, labels, eps):
  """torch's CrossEntropyLoss(label_smoothing=eps, reduction='none'), in numpy."""
  logits = np.asarray(logits, np.float64)
  log_p = logits - logits.max(-1, keepdims=True)
  log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
  nll = -log_p[np.arange(len(labels)), labels]
  return (1 - eps) * nll - eps * log_p.mean(-1)


def test_smoothed_cross_entropy_matches_torch_formula():
  logits = np.array([[2.0, -1.0, 0.5, 0.0], [0.1, 0.2, 0.3, 4.0], [-3.0, 1.0, 1.0, 1.0]], np.float32)
  labels = np.array([0, 3, 1])
  got = losses.smoothed_cross_entropy(logits, labels, 0.1)
  assert got.shape == (3,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, _reference_ce(logits, labels, 0.1), rtol=1e-5)
  plain = losses.smoothed_cross_entropy(logits, labels, 0.0)
  np.testing.assert_allclose(plain, _reference_ce(logits, labels, 0.0), rtol=1e-5)


def test_smoothed_cross_entropy_bf16_logits_computed_in_float32():
  logits = jnp.array([[30.0, -30.0, 0.0]], jnp.bfloat16)
  got = losses.smoothed_cross_entropy(logits, jnp.array([0]), 0.1)
  assert got.dtype == jnp.float32 and np.isfinite(got).all()
  np.testing.assert_allclose(got, _reference_ce(np.asarray(logits, np.float32), [0], 0.1), rtol=1e-3)


def test_smoothed_binary_cross_entropy_closed_form_and_stability():
  logits = np.array([0.0, 2.0, -1.5, 100.0, -100.0], np.float32)
  labels = np.array([1, 0, 1, 1, 0])
  eps = 0.1
  t = labels * (1 - eps) + eps / 2
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  with np.errstate(divide='ignore'):
    expected = -(t * np.log(p) + (1 - t) * np.log1p(-p))
  # Closed forms where p saturates to 0 or 1 in float64.
  expected[3] = (1 - t[3]) * 100.0 + np.log1p(np.exp(-100.0))
  expected[4] = t[4] * 100.0 + np.log1p(np.exp(-100.0))
  got = losses.smoothed_binary_cross_entropy(logits, labels, eps)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  grads = jax.grad(lambda z: losses.smoothed_binary_cross_entropy(z, labels, eps).sum())(jnp.asarray(logits))
  assert np.isfinite(grads).all()


def test_subtask_targets_mixed_is_both():
  blastic, lytic = losses.subtask_targets(jnp.array([0, 1, 2, 3]))
  np.testing.assert_array_equal(blastic, [0, 1, 1, 0])
  np.testing.assert_array_equal(lytic, [0, 0, 1, 1])


def _outputs(b=4):
  rng = np.random.default_rng(0)
  return {
      'blastic': rng.normal(size=b).astype(np.float32),
      'lytic': rng.normal(size=b).astype(np.float32),
      'quality': rng.normal(size=(b, 4)).astype(np.float32),
      'posterolateral': rng.normal(size=(b, 3)).astype(np.float32),
      'features': np.zeros((b, 8), np.float32),
  }


def test_multitask_losses_weighted_sum_of_present_heads():
  outputs = _outputs()
  batch = {'quality': np.array([0, 1, 2, 3]), 'posterolateral': np.array([0, 1, 2, 0])}
  weights = {'blastic': 1.0, 'lytic': 2.0, 'quality': 0.5, 'posterolateral': 0.25}
  total, per_task = losses.multitask_losses(outputs, batch, 0.1, weights)
  assert set(per_task) == {'blastic', 'lytic', 'quality', 'posterolateral'}
  np.testing.assert_allclose(
      per_task['lytic'], losses.smoothed_binary_cross_entropy(outputs['lytic'], [0, 0, 1, 1], 0.1), rtol=1e-6)
  np.testing.assert_allclose(
      per_task['blastic'], losses.smoothed_binary_cross_entropy(outputs['blastic'], [0, 1, 1, 0], 0.1), rtol=1e-6)
  expected = sum(weights[k] * per_task[k] for k in per_task)
  assert total.shape == (4,)
  np.testing.assert_allclose(total, expected, rtol=1e-6)


def test_multitask_losses_single_task_and_default_weight():
  outputs = {'quality': _outputs()['quality']}
  batch = {'quality': np.array([0, 1, 2, 3])}
  total, per_task = losses.multitask_losses(outputs, batch, 0.1, {})
  assert list(per_task) == ['quality']
  np.testing.assert_allclose(total, losses.smoothed_cross_entropy(outputs['quality'], batch['quality'], 0.1))
  with pytest.raises(ValueError):
    losses.multitask_losses({'features': np.zeros((2, 3))}, batch, 0.1, {})


# --- segmentation losses -------------------------------------------------------------------------

def test_soft_dice_of_a_perfect_prediction_is_minus_one():
  labels = jnp.array(np.random.default_rng(0).integers(0, 3, (2, 4, 4, 2)))
  logits = 50.0 * jax.nn.one_hot(labels, 3)
  np.testing.assert_allclose(float(losses.soft_dice_loss(logits, labels)), -1.0, atol=1e-5)
  np.testing.assert_allclose(float(losses.dice_ce_loss(logits, labels)), -1.0, atol=1e-4)


def test_soft_dice_by_hand():
  # One sample, 4 voxels, 2 classes; class 1 predicted with p = (1, 1, 0, 0), truth (1, 0, 1, 0).
  labels = jnp.array([1, 0, 1, 0]).reshape(1, 4, 1, 1)
  p1 = np.array([1.0, 1.0, 0.0, 0.0])
  logits = jnp.asarray(np.stack([np.log(1 - p1 + 1e-12), np.log(p1 + 1e-12)], -1).reshape(1, 4, 1, 1, 2))
  # Dice of class 1 = 2·1 / (2 + 2) = 0.5 (background excluded).
  np.testing.assert_allclose(float(losses.soft_dice_loss(logits, labels)), -0.5, atol=1e-5)


def test_dice_ce_loss_weights_its_two_terms():
  labels = jnp.array(np.random.default_rng(1).integers(0, 3, (1, 4, 4, 2)))
  logits = jnp.asarray(np.random.default_rng(2).normal(size=(1, 4, 4, 2, 3)), jnp.float32)
  dice = float(losses.soft_dice_loss(logits, labels))
  ce = float(losses.dice_ce_loss(logits, labels, dice_weight=0.0))
  np.testing.assert_allclose(float(losses.dice_ce_loss(logits, labels, ce_weight=2.0, dice_weight=0.5)),
                             2.0 * ce + 0.5 * dice, rtol=1e-5)


def test_soft_dice_present_only_leaves_absent_classes_out():
  # 3 classes; class 1 predicted perfectly, class 2 absent from the labels with p = 0.25 on 2 voxels.
  labels = jnp.array([1, 0, 1, 0]).reshape(1, 4, 1, 1)
  probs = np.array([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
  logits = jnp.asarray(np.log(probs + 1e-12).reshape(1, 4, 1, 1, 3))
  # nnU-Net's mean: class 2 scores (0 + s) / (1 + s) ~ 0, so the loss is -(1 + 0) / 2.
  np.testing.assert_allclose(float(losses.soft_dice_loss(logits, labels)), -0.5, atol=1e-4)
  np.testing.assert_allclose(float(losses.soft_dice_loss(logits, labels, present_only=True)), -1.0, atol=1e-4)
  # Per sample (no batch Dice): only (sample, class) pairs present count; an empty sample adds nothing.
  two = jnp.concatenate([labels, jnp.zeros_like(labels)])
  both = jnp.concatenate([logits, logits])
  np.testing.assert_allclose(
      float(losses.soft_dice_loss(both, two, batch_dice=False, present_only=True)), -1.0, atol=1e-4)
  assert float(losses.dice_ce_loss(logits, labels, present_only=True)) < float(losses.dice_ce_loss(logits, labels))


def test_deep_supervision_weights_follow_nnunet():
  np.testing.assert_allclose(losses.deep_supervision_weights(4), np.array([1, 0.5, 0.25, 0]) / 1.75)
  np.testing.assert_allclose(losses.deep_supervision_weights(1), [1.0])


def test_deep_supervision_loss_downsamples_labels_by_shape():
  rng = np.random.default_rng(1)
  labels = jnp.array(rng.integers(0, 3, (1, 8, 8, 4)))
  outs = [50.0 * jax.nn.one_hot(labels, 3), 50.0 * jax.nn.one_hot(labels[:, ::2, ::2, ::1], 3),
          jnp.zeros((1, 2, 2, 2, 3))]
  total, per_level = losses.deep_supervision_loss(outs, labels)
  assert len(per_level) == 3
  np.testing.assert_allclose(float(total), -1.0, atol=1e-4)  # the lowest level has weight 0

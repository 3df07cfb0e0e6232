"""Self-paced weights: each regime by hand, the start gate, the age ramps, jit and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spine_jax.training import self_paced as sp

LOSSES = jnp.array([0.1, 0.2, 0.4, 0.8, 1.6], jnp.float32)


def _cfg(**overrides):
  cfg = sp.default_self_paced_config()
  cfg.start_step = 10
  cfg.ramp_steps = 100
  cfg.update(overrides)
  return cfg


def test_default_config_fields():
  cfg = sp.default_self_paced_config()
  assert cfg.to_dict() == {
      'regime': 'percentile', 'start_step': 500, 'percentile': 0.9, 'age': 'quantile', 'q_start': 0.5,
      'q_end': 1.0, 'ramp_steps': 2000, 'lambda_start': 0.5, 'lambda_end': 5.0, 'mixture_ratio': 0.5,
      'eps': 1e-8}


def test_all_ones_before_start_step_and_for_none():
  for regime in sp.REGIMES:
    np.testing.assert_array_equal(sp.self_paced_weights(LOSSES, 9, _cfg(regime=regime)), np.ones(5))
  np.testing.assert_array_equal(sp.self_paced_weights(LOSSES, 10_000, _cfg(regime='none')), np.ones(5))


def test_percentile_drops_above_quantile_inclusive():
  # 10 losses 1..10: the 0.9 quantile (linear) is 9.1, so only 10 is dropped.
  losses = jnp.arange(1.0, 11.0)
  w = sp.self_paced_weights(losses, 10, _cfg(regime='percentile', percentile=0.9))
  np.testing.assert_array_equal(w, [1] * 9 + [0])
  # A quantile that lands on a sample keeps it (≤): median of 5 losses is 0.4.
  w = sp.self_paced_weights(LOSSES, 10, _cfg(regime='percentile', percentile=0.5))
  np.testing.assert_array_equal(w, [1, 1, 1, 0, 0])
  w = sp.self_paced_weights(LOSSES, 10, _cfg(regime='percentile', percentile=1.0))
  np.testing.assert_array_equal(w, np.ones(5))


def test_hard_quantile_is_strict_and_ramps_to_keep_all():
  cfg = _cfg(regime='hard', q_start=0.5, q_end=1.0)
  # step 10: q = 0.5, λ = 0.4, strictly below keeps 0.1 and 0.2.
  np.testing.assert_array_equal(sp.self_paced_weights(LOSSES, 10, cfg), [1, 1, 0, 0, 0])
  # step 60: q = 0.75, λ = 0.8 exactly, still strict.
  np.testing.assert_array_equal(sp.self_paced_weights(LOSSES, 60, cfg), [1, 1, 1, 0, 0])
  # q = 1 at and after the ramp's end: everything, the max loss included.
  np.testing.assert_array_equal(sp.self_paced_weights(LOSSES, 110, cfg), np.ones(5))
  np.testing.assert_array_equal(sp.self_paced_weights(LOSSES, 10_000, cfg), np.ones(5))


def test_linear_with_schedule():
  cfg = _cfg(regime='linear', age='schedule', lambda_start=0.8, lambda_end=3.2)
  np.testing.assert_allclose(sp.self_paced_weights(LOSSES, 10, cfg), [0.875, 0.75, 0.5, 0.0, 0.0], rtol=1e-6)
  # Geometric: halfway, λ = sqrt(0.8 · 3.2) = 1.6.
  expected = [1 - 0.1 / 1.6, 0.875, 0.75, 0.5, 0.0]
  np.testing.assert_allclose(sp.self_paced_weights(LOSSES, 60, cfg), expected, rtol=1e-6)
  np.testing.assert_allclose(sp.scheduled_age(10_000, cfg), 3.2, rtol=1e-6)


def test_mixture_by_hand():
  # λ = 1.0, λ' = 0.25, ζ = 1·0.25/0.75 = 1/3.
  cfg = _cfg(regime='mixture', age='schedule', lambda_start=1.0, lambda_end=1.0, mixture_ratio=0.25)
  w = sp.self_paced_weights(jnp.array([0.1, 0.25, 0.5, 1.0, 2.0]), 50, cfg)
  np.testing.assert_allclose(w, [1.0, 1.0, (1 / 3) * (2 - 1), 0.0, 0.0], rtol=1e-6)
  # Continuous at λ': the middle formula gives 1 there.
  w = sp.self_paced_weights(jnp.array([0.2500001]), 50, cfg)
  np.testing.assert_allclose(w, [1.0], rtol=1e-5)


def test_quantile_q_one_keeps_all_for_every_regime():
  for regime in ('hard', 'linear', 'mixture'):
    cfg = _cfg(regime=regime, q_start=1.0, q_end=1.0)
    np.testing.assert_array_equal(sp.self_paced_weights(LOSSES, 50, cfg), np.ones(5), err_msg=regime)


def test_jit_with_traced_step_and_no_gradient_through_weights():
  cfg = _cfg(regime='hard', q_start=0.5, q_end=1.0)

  @jax.jit
  def loss_fn(losses, step):
    weights = sp.self_paced_weights(losses, step, cfg)
    return sp.weighted_mean(losses, weights, cfg.eps), weights

  for step, expected in ((0, np.ones(5)), (10, [1, 1, 0, 0, 0]), (500, np.ones(5))):
    _, w = loss_fn(LOSSES, jnp.int32(step))
    np.testing.assert_array_equal(w, expected)
  grads = jax.grad(lambda l: loss_fn(l, jnp.int32(10))[0])(LOSSES)
  # d/dℓ Σvℓ/Σv with v constant: v/Σv.
  np.testing.assert_allclose(grads, [0.5, 0.5, 0, 0, 0])


def test_weighted_mean_and_all_zero_weights():
  np.testing.assert_allclose(sp.weighted_mean(LOSSES, jnp.array([1.0, 1.0, 0, 0, 0])), 0.15, rtol=1e-6)
  np.testing.assert_allclose(sp.weighted_mean(LOSSES, jnp.zeros(5)), 0.0)


def test_bad_config_raises():
  with pytest.raises(ValueError):
    sp.self_paced_weights(LOSSES, 50, _cfg(regime='soft'))
  with pytest.raises(ValueError):
    sp.self_paced_weights(LOSSES, 50, _cfg(regime='hard', age='cosine'))
  with pytest.raises(ValueError):
    sp.self_paced_weights(LOSSES, 50, _cfg(regime='mixture', mixture_ratio=1.0))

"""Self-paced learning: per-sample weights that bring hard samples in gradually.

Pure and jit-friendly: `step` may be traced, `cfg` holds static Python values.
The weights go through `stop_gradient`, so the model is trained on
Σ vᵢℓᵢ / max(Σ vᵢ, ε) with v treated as a constant (Kumar et al. 2010;
Jiang et al. 2014).

Regimes, with per-sample loss ℓ and age λ:
  'none'        v = 1.
  'hard'        v = 1 if ℓ < λ else 0 (strict, as Kumar et al.: a sample whose
                loss equals λ is dropped).
  'linear'      v = max(0, 1 − ℓ/λ).
  'mixture'     λ' = mixture_ratio·λ; v = 1 if ℓ ≤ λ'; 0 if ℓ ≥ λ;
                else ζ(1/ℓ − 1/λ) with ζ = λλ'/(λ − λ').
  'percentile'  the authors' lab code: v = 1 if ℓ ≤ quantile(ℓ, percentile)
                else 0 (inclusive, so the sample at the quantile is kept and
                percentile = 1 keeps everything); ignores `age`.

Age, for every regime but 'percentile':
  'quantile'  λ = quantile(ℓ, q) over the batch (linear interpolation, as
              numpy), q rising linearly from q_start to q_end over ramp_steps
              after start_step. When q ≥ 1, λ = +inf: every regime keeps every
              sample. (Without that rule 'hard' would drop the hardest sample,
              since λ = max ℓ and the inequality is strict.)
  'schedule'  λ rises geometrically from lambda_start to lambda_end over
              ramp_steps after start_step (Kumar's λ ← μλ growth), then stays.

Before start_step every weight is 1: the model first learns from plain losses.
"""
import jax
import jax.numpy as jnp
import ml_collections

REGIMES = ('none', 'hard', 'linear', 'mixture', 'percentile')
AGES = ('quantile', 'schedule')


def default_self_paced_config():
  """The authors' lab setting: plain loss for 500 steps, then drop the top 10% per batch."""
  cfg = ml_collections.ConfigDict()
  cfg.regime = 'percentile'
  cfg.start_step = 500
  cfg.percentile = 0.9
  cfg.age = 'quantile'
  cfg.q_start = 0.5
  cfg.q_end = 1.0
  cfg.ramp_steps = 2000
  cfg.lambda_start = 0.5
  cfg.lambda_end = 5.0
  cfg.mixture_ratio = 0.5
  cfg.eps = 1e-8
  return cfg


def ramp_fraction(step, start_step, ramp_steps):
  """Progress in [0, 1] through the ramp that begins at start_step; 1 at once if ramp_steps ≤ 0."""
  if ramp_steps <= 0:
    return jnp.float32(1.0)
  elapsed = jnp.asarray(step, jnp.float32) - float(start_step)
  return jnp.clip(elapsed / float(ramp_steps), 0.0, 1.0)


def quantile_level(step, cfg):
  """The batch quantile q(step) that sets λ when cfg.age == 'quantile'."""
  if cfg.regime == 'percentile':
    return jnp.float32(cfg.percentile)
  t = ramp_fraction(step, cfg.start_step, cfg.ramp_steps)
  return cfg.q_start + (cfg.q_end - cfg.q_start) * t


def scheduled_age(step, cfg):
  """λ(step) for cfg.age == 'schedule': geometric from lambda_start to lambda_end."""
  if cfg.lambda_start <= 0 or cfg.lambda_end <= 0:
    raise ValueError('a geometric λ schedule needs lambda_start > 0 and lambda_end > 0')
  t = ramp_fraction(step, cfg.start_step, cfg.ramp_steps)
  return cfg.lambda_start * (cfg.lambda_end / cfg.lambda_start) ** t


def age(losses, step, cfg):
  """λ for this batch and step; +inf when a quantile age has reached q ≥ 1 (keep all)."""
  if cfg.regime == 'percentile' or cfg.age == 'quantile':
    q = quantile_level(step, cfg)
    lam = jnp.quantile(losses, jnp.clip(q, 0.0, 1.0))
    return jnp.where(q >= 1.0, jnp.inf, lam)
  if cfg.age == 'schedule':
    return jnp.asarray(scheduled_age(step, cfg), jnp.float32)
  raise ValueError(f'unknown self-paced age {cfg.age!r}; expected one of {AGES}')


def hard_weights(losses, lam):
  """v = 1 if ℓ < λ else 0."""
  return (losses < lam).astype(jnp.float32)


def linear_weights(losses, lam, eps):
  """v = max(0, 1 − ℓ/λ); λ = +inf gives 1, λ ≤ 0 gives 0."""
  ratio = jnp.where(jnp.isinf(lam), 0.0, losses / jnp.maximum(lam, eps))
  return jnp.clip(1.0 - ratio, 0.0, 1.0)


def mixture_weights(losses, lam, ratio, eps):
  """Jiang et al.'s mixture weighting: 1 below λ', 0 above λ, ζ(1/ℓ − 1/λ) between."""
  if not 0.0 < ratio < 1.0:
    raise ValueError(f'mixture_ratio must lie in (0, 1), got {ratio}')
  lam_low = ratio * lam
  finite_lam = jnp.where(jnp.isinf(lam), 1.0, lam)
  # ζ = λλ'/(λ − λ') = λ·ratio/(1 − ratio); finite λ only, the where below covers λ = inf.
  zeta = finite_lam * ratio / (1.0 - ratio)
  middle = zeta * (1.0 / jnp.maximum(losses, eps) - 1.0 / jnp.maximum(finite_lam, eps))
  weights = jnp.where(losses <= lam_low, 1.0, jnp.where(losses >= lam, 0.0, middle))
  return jnp.clip(weights, 0.0, 1.0)


def regime_weights(losses, lam, cfg):
  """Weights for a given λ under cfg.regime, before the start_step gate."""
  if cfg.regime == 'hard':
    return hard_weights(losses, lam)
  if cfg.regime == 'linear':
    return linear_weights(losses, lam, cfg.eps)
  if cfg.regime == 'mixture':
    return mixture_weights(losses, lam, cfg.mixture_ratio, cfg.eps)
  if cfg.regime == 'percentile':
    return (losses <= lam).astype(jnp.float32)
  raise ValueError(f'unknown self-paced regime {cfg.regime!r}; expected one of {REGIMES}')


def self_paced_weights(losses, step, cfg):
  """Per-sample weights (B,) in [0, 1], constant to autodiff.

  Args:
    losses: (B,) per-sample losses (any float dtype; weights are float32).
    step: the training step, a Python int or a traced int.
    cfg: a ConfigDict as from `default_self_paced_config()`.
  """
  losses = jax.lax.stop_gradient(jnp.asarray(losses, jnp.float32))
  ones = jnp.ones_like(losses)
  if cfg.regime == 'none':
    return ones
  weights = regime_weights(losses, age(losses, step, cfg), cfg)
  weights = jnp.where(jnp.asarray(step) < cfg.start_step, ones, weights)
  return jax.lax.stop_gradient(weights)


def weighted_mean(losses, weights, eps=1e-8):
  """Σ vℓ / max(Σ v, eps): the self-paced batch loss; 0 when every weight is 0."""
  weights = jnp.asarray(weights, jnp.float32)
  total = jnp.sum(weights * jnp.asarray(losses, jnp.float32))
  return total / jnp.maximum(jnp.sum(weights), eps)

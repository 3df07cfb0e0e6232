"""Every named config variant builds, and its model initialises (shapes only, nothing compiled)."""
import jax
import pytest

from configs import bone_quality
from configs import instance
from configs import labeling
from configs import semantic
from spine_jax.engine import state as state_lib
from spine_jax.training import tasks

VARIANTS = [(bone_quality, v) for v in ("", "baseline", "soft", "posterolateral", "paper", "smoke", "baseline,smoke")] + \
    [(semantic, v) for v in ("", "nnunet", "bf16", "smoke")] + \
    [(labeling, v) for v in ("", "vertexact", "spineps", "bf16", "smoke", "vertexact,smoke")]


@pytest.mark.parametrize("module, variant", VARIANTS, ids=[f"{m.__name__}:{v}" for m, v in VARIANTS])
def test_variant_builds_and_initialises(module, variant):
  config = module.get_config(variant)
  task = tasks.get_task(config)
  tx = state_lib.make_optimizer(config.optimizer, config.num_train_steps)
  shapes = jax.eval_shape(lambda: task.model.init(jax.random.key(0), jax.numpy.zeros(task.init_shape), train=False))
  assert state_lib.count_params(shapes["params"]) > 0
  assert config.batch_size > 0 and config.num_train_steps > 0
  tx.init(shapes["params"])  # the optimiser accepts the parameter tree


@pytest.mark.parametrize("module", [bone_quality, semantic, instance, labeling], ids=lambda m: m.__name__)
def test_gpu_variant_builds_in_bf16_at_accelerator_scale(module):
  """':gpu' (bench/accelerator.py's configs): bf16 compute, a larger batch than the CPU default, and its model
  initialises."""
  config = module.get_config("gpu")
  assert config.model.dtype == "bfloat16"
  assert config.batch_size > module.get_config("").batch_size
  task = tasks.get_task(config)
  shapes = jax.eval_shape(lambda: task.model.init(jax.random.key(0), jax.numpy.zeros(task.init_shape), train=False))
  assert state_lib.count_params(shapes["params"]) > 0


def test_unknown_variant_is_refused():
  with pytest.raises(ValueError, match="unknown variant"):
    bone_quality.get_config("papr")

"""Data parallelism over a mesh of simulated CPU devices, and checkpoint round trips."""
import jax
import numpy as np
import pytest

from configs import bone_quality
from spine_jax.data import pipelines
from spine_jax.engine import checkpoints
from spine_jax.engine import mesh as mesh_lib
from spine_jax.engine import state as state_lib
from spine_jax.training import steps
from spine_jax.training import tasks


def _synthetic_arrays(n=64, size=32, seed=0):
  rng = np.random.default_rng(seed)
  quality = rng.integers(0, 4, n).astype(np.int32)
  image = rng.normal(0, 1, (n, size, size)).astype(np.float32) + quality[:, None, None] * 0.5
  return {"image": image, "quality": quality, "posterolateral": rng.integers(0, 3, n).astype(np.int32)}


def _config():
  c = bone_quality.get_config("smoke")
  c.self_paced.start_step = 1  # self-paced weights on from the second step: they must be global too
  return c


def _setup(config, num_devices):
  """(mesh, task, optimizer, fresh state, jitted step) on a mesh of `num_devices`."""
  mesh = mesh_lib.make_mesh(num_devices)
  task = tasks.get_task(config)
  tx = state_lib.make_optimizer(config.optimizer, config.num_train_steps)
  state = state_lib.create_train_state(task.model, tx, task.init_shape, jax.random.key(0), mesh)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  step_fn = steps.jit_train_step(task.train_step, config, shardings, mesh_lib.batch_sharding(mesh))
  return mesh, task, tx, state, step_fn


def _train(config, arrays, num_devices, num_steps):
  mesh, _, _, state, step_fn = _setup(config, num_devices)
  it = pipelines.bone_quality_train_iterator(arrays, config)
  metrics = []
  for _ in range(num_steps):
    state, m = step_fn(state, mesh_lib.global_batch(next(it), mesh))
    metrics.append(jax.device_get(m))
  return jax.device_get(state), metrics


def test_four_devices_match_one_device():
  assert len(jax.devices()) >= 4, "conftest asks for 4 simulated CPU devices"
  config, arrays = _config(), _synthetic_arrays()
  one, m1 = _train(config, arrays, 1, 4)
  four, m4 = _train(config, arrays, 4, 4)
  np.testing.assert_allclose([m["loss"] for m in m1], [m["loss"] for m in m4], rtol=1e-5)
  assert m1[-1]["spl_kept"] < 1.0, "self-paced learning should have dropped samples by step 4"
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), one.params, four.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
               one.batch_stats, four.batch_stats)


def test_process_shards_make_the_same_global_batches():
  config, arrays = _config(), _synthetic_arrays()
  whole = next(pipelines.bone_quality_train_iterator(arrays, config, 0, 1))
  parts = [next(pipelines.bone_quality_train_iterator(arrays, config, p, 2)) for p in range(2)]
  for k in whole:
    np.testing.assert_array_equal(whole[k], np.concatenate([p[k] for p in parts]))


def test_pipeline_is_deterministic_and_reshuffles_each_epoch():
  config, arrays = _config(), _synthetic_arrays(n=16)
  a = pipelines.bone_quality_train_iterator(arrays, config, 0, 1)
  b = pipelines.bone_quality_train_iterator(arrays, config, 0, 1)
  first = [next(a) for _ in range(4)]
  for batch in first:
    np.testing.assert_array_equal(batch["image"], next(b)["image"])
  assert not np.array_equal(first[0]["quality"], first[2]["quality"]) or \
      not np.array_equal(first[0]["image"], first[2]["image"])


def test_checkpoint_round_trip_continues_with_identical_next_batch(tmp_path):
  config, arrays = _config(), _synthetic_arrays()
  mesh, task, tx, state, step_fn = _setup(config, 2)
  it = pipelines.bone_quality_train_iterator(arrays, config)
  for _ in range(2):
    state, _ = step_fn(state, mesh_lib.global_batch(next(it), mesh))
  mngr = checkpoints.manager(tmp_path)
  checkpoints.save(mngr, 2, state, it, config)
  saved = jax.device_get(state)
  expected_batch = next(it)
  expected_state, _ = step_fn(state, mesh_lib.global_batch(expected_batch, mesh))
  expected_state = jax.device_get(expected_state)

  fresh_it = pipelines.bone_quality_train_iterator(arrays, config)
  abstract = state_lib.abstract_train_state(task.model, tx, task.init_shape, mesh)
  restored, step = checkpoints.restore(checkpoints.manager(tmp_path), abstract, fresh_it)
  assert step == 2 and int(restored.step) == 2
  jax.tree.map(np.testing.assert_array_equal, saved.params, jax.device_get(restored.params))
  jax.tree.map(np.testing.assert_array_equal, saved.opt_state, jax.device_get(restored.opt_state))
  batch = next(fresh_it)
  for k in expected_batch:
    np.testing.assert_array_equal(expected_batch[k], batch[k])
  again, _ = step_fn(restored, mesh_lib.global_batch(batch, mesh))
  jax.tree.map(np.testing.assert_array_equal, expected_state.params, jax.device_get(again.params))


def test_batch_not_divisible_by_devices_is_a_clear_error():
  with pytest.raises(ValueError, match="not divisible"):
    mesh_lib.local_batch_size(6, mesh_lib.make_mesh(4))

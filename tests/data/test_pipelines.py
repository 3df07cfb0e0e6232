"""Training-stream helpers of data/pipelines.py."""
import numpy as np
import pytest

from spine_jax.data import pipelines


def test_oversampling_reaches_the_target_share_and_keeps_every_element():
  labels = np.array([0] * 77 + [1] * 8 + [2] * 7 + [3] * 8)
  idx = pipelines.oversample_minority(labels, 0.5, seed=0)
  counts = np.bincount(labels[idx], minlength=4)
  assert counts[0] == 77 and counts[1:].sum() == 77
  assert set(idx) == set(range(len(labels)))
  # Each minority element appears 3 or 4 times (77 = 3 * 23 + 8): repetition is even.
  assert set(np.bincount(idx)[labels != 0]) <= {3, 4}
  np.testing.assert_array_equal(idx, pipelines.oversample_minority(labels, 0.5, seed=0))


@pytest.mark.parametrize("fraction", [0.0, 0.9])
def test_oversampling_off_or_already_balanced_is_identity(fraction):
  labels = np.array([0] * 8 + [1] * 2)
  np.testing.assert_array_equal(pipelines.oversample_minority(labels, fraction, seed=0), np.arange(10))


def test_eval_batches_cover_every_element_once():
  arrays = {"x": np.arange(10)}
  seen = []
  for batch, n in pipelines.eval_batches(arrays, ("x",), 4):
    assert len(batch["x"]) == 4
    seen.extend(batch["x"][:n])
  assert seen == list(range(10))


def test_empty_source_is_an_error():
  with pytest.raises(ValueError, match="empty"):
    pipelines.ArraySource({"x": np.zeros(0)}, ("x",))


def test_training_iterators_build_only_a_few_batches_ahead():
  """grain's default read-ahead (500 batches, 16 threads) held about 13 GB for the nnU-Net plan; ours is small."""
  import threading
  import time
  calls, lock = [0], threading.Lock()

  def transform(element, rng):
    with lock:
      calls[0] += 1
    return {"x": np.float32(element)}
  it = pipelines.train_iterator(list(range(1000)), global_batch=2, seed=0, transform=transform)
  first = next(it)
  assert first["x"].shape == (2,)
  time.sleep(1.0)  # the background threads fill their buffer
  threads = pipelines.read_options().num_threads
  assert calls[0] <= 2 * (1 + pipelines.PREFETCH_BATCHES + threads), calls[0]

"""Sliding-window prediction: nnU-Net's Gaussian and steps, exact stitching, mirroring."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from spine_jax.inference import sliding_window as sw


def test_gaussian_matches_nnunet_construction():
  patch = (64, 48, 16)
  g = sw.gaussian_importance_map(patch)
  assert g.shape == patch and g.dtype == np.float32
  assert g.max() == pytest.approx(10.0) and np.unravel_index(np.argmax(g), patch) == (32, 24, 8)
  # nnU-Net: an n-D Gaussian filter of an impulse at patch // 2, sigma = patch / 8.
  impulse = np.zeros(patch)
  impulse[32, 24, 8] = 1.0
  reference = ndimage.gaussian_filter(impulse, [p / 8 for p in patch], 0, mode='constant', cval=0)
  assert np.allclose(g, reference / reference.max() * 10, rtol=1e-5)
  # sigma along axis 0 is 64 / 8 = 8 voxels; symmetric about the centre voxel.
  k = np.arange(1, 32)
  assert np.allclose(g[32 + k, 24, 8] / g[32, 24, 8], np.exp(-k**2 / (2 * 8.0**2)), rtol=1e-5)
  assert np.array_equal(g[32 + k, 24, 8], g[32 - k, 24, 8])
  odd = sw.gaussian_importance_map((9, 9, 9), value_scaling_factor=1)
  assert odd.max() == pytest.approx(1.0) and np.array_equal(odd, odd[::-1, ::-1, ::-1])


def test_gaussian_has_no_zero_weight():
  g = sw.gaussian_importance_map((16, 16, 16), sigma_scale=1 / 64)  # 4-sigma truncation leaves zeros
  filtered = ndimage.gaussian_filter1d(np.eye(16)[8], 0.25, mode='constant')
  assert np.count_nonzero(filtered) < 16  # the premise: scipy's filter does truncate here
  assert g.min() > 0
  assert g.min() == np.unique(g)[0]


@pytest.mark.parametrize('image, patch, step, expected', [
    (100, 64, 0.5, [0, 18, 36]),  # ceil(36 / 32) + 1 = 3 starts
    (64, 64, 0.5, [0]),
    (160, 64, 0.5, [0, 32, 64, 96]),
    (40, 64, 0.5, [0]),  # padded to the patch first
    (101, 64, 0.5, [0, 18, 37]),  # 18.5 rounds half to even, as numpy in nnU-Net
    (100, 64, 0.25, [0, 12, 24, 36]),
    (128, 64, 1.0, [0, 64]),
])
def test_steps_hand_cases(image, patch, step, expected):
  assert sw.sliding_window_steps((image,), (patch,), step) == [expected]


def test_steps_per_axis_and_bad_step():
  assert sw.sliding_window_steps((100, 64, 160), (64, 64, 64)) == [[0, 18, 36], [0], [0, 32, 64, 96]]
  with pytest.raises(ValueError, match='step_size'):
    sw.sliding_window_steps((100,), (64,), 0.0)


def _one_hot_threshold(batch):
  """A fixed per-voxel function: one-hot of (channel 0 > 0) with 2 classes."""
  positive = batch[..., 0] > 0
  return np.stack([~positive, positive], -1).astype(np.float32)


def _image(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape + (1,)).astype(np.float32)


@pytest.mark.parametrize('shape', [(70, 50, 20), (20, 40, 10)])
def test_stitching_reproduces_a_voxelwise_function_exactly(shape):
  image = _image(shape)
  calls, seen = [], []
  out = sw.sliding_window_predict(
      lambda b: calls.append(b.shape) or _one_hot_threshold(b), image, (32, 32, 16), 2, batch_size=3,
      progress=lambda done, total: seen.append((done, total)))
  assert out.shape == shape + (2,) and out.dtype == np.float32
  assert np.array_equal(out, _one_hot_threshold(image))
  assert set(calls) == {(3, 32, 32, 16, 1)}  # fixed batch shape, the last batch padded
  assert seen[-1][0] == seen[-1][1] and [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_stitching_of_a_continuous_function_without_gaussian():
  image = _image((45, 33, 18), seed=1)
  fn = lambda b: np.concatenate([b, -2 * b, b**2], -1)  # noqa: E731
  for use_gaussian in (True, False):
    out = sw.sliding_window_predict(fn, image, (16, 16, 8), 3, use_gaussian=use_gaussian)
    assert np.allclose(out, fn(image), rtol=1e-5, atol=1e-6)


def test_gaussian_weighting_of_overlapping_windows():
  """A prediction that depends on the window (its mean) is blended with the Gaussian weights."""
  image = np.zeros((96, 1, 1, 1), np.float32)
  image[:48] = 1.0
  out = sw.sliding_window_predict(lambda b: np.broadcast_to(b.mean(axis=(1, 2, 3, 4), keepdims=True), b.shape),
                                  image, (64, 1, 1), 1, batch_size=1)
  g = sw.gaussian_importance_map((64, 1, 1))[:, 0, 0].astype(np.float64)
  means = [image[0:64].mean(), image[32:96].mean()]  # windows at 0 and 32
  num, den = np.zeros(96), np.zeros(96)
  for start, m in zip((0, 32), means):
    num[start:start + 64] += g * m
    den[start:start + 64] += g
  assert np.allclose(out[:, 0, 0, 0], num / den, rtol=1e-6)


def test_mirroring_averages_all_flip_combinations():
  image = _image((40, 36, 12), seed=2)
  calls = []

  def fn(batch):
    calls.append(batch.copy())
    return _one_hot_threshold(batch)
  out = sw.sliding_window_predict(fn, image, (32, 32, 8), 2, batch_size=2, mirror_axes=(0, 1, 2))
  assert np.array_equal(out, _one_hot_threshold(image))
  assert len(calls) % 8 == 0  # the plain batch and 7 flips of it
  assert np.array_equal(calls[1], calls[0][:, ::-1])  # axis 0 of the patch is axis 1 of the batch
  assert sw.mirror_combinations((2, 0)) == [(), (0,), (2,), (0, 2)]
  with pytest.raises(ValueError, match='mirror axes'):
    sw.mirror_combinations((3,))


def test_mirroring_flips_back_a_position_dependent_prediction():
  """f = position along patch axis 0: mirroring averages i and (p - 1 - i) to (p - 1) / 2."""
  image = _image((16, 8, 8))
  ramp = np.arange(16, dtype=np.float32).reshape(1, 16, 1, 1, 1)
  out = sw.sliding_window_predict(lambda b: np.broadcast_to(ramp, b.shape[:4] + (1,)), image, (16, 8, 8), 1,
                                  mirror_axes=(0,))
  assert np.allclose(out, 7.5)


def test_mirroring_swaps_left_and_right_channels_back():
  """A network that tells left from right by position: class 1 in the patch's first half along
  axis 2, class 2 in the second. Flipped, it calls the left half 2; the swap turns that back into 1,
  so mirroring agrees with the plain prediction instead of averaging to one half each."""
  image = _image((16, 8, 8))
  half = (np.arange(8) < 4).reshape(1, 1, 1, 8)

  def fn(batch):
    out = np.zeros(batch.shape[:4] + (3,), np.float32)
    out[..., 1] = half
    out[..., 2] = ~half
    return out
  plain = sw.sliding_window_predict(fn, image, (16, 8, 8), 3)
  swapped = sw.sliding_window_predict(fn, image, (16, 8, 8), 3, mirror_axes=(2,), mirror_channel_swaps={2: [0, 2, 1]})
  unswapped = sw.sliding_window_predict(fn, image, (16, 8, 8), 3, mirror_axes=(2,))
  assert np.allclose(swapped, plain)
  assert np.allclose(unswapped[..., 1:], 0.5)
  with pytest.raises(ValueError, match='permutation'):
    sw.sliding_window_predict(fn, image, (16, 8, 8), 3, mirror_axes=(2,), mirror_channel_swaps={2: [0, 1, 1]})


def test_jitted_jax_predict_fn():
  fn = jax.jit(lambda x: jax.nn.one_hot((x[..., 0] > 0).astype(jnp.int32), 2))
  image = _image((30, 20, 10), seed=3)
  out = sw.sliding_window_predict(fn, image, (16, 16, 8), 2, batch_size=2, mirror_axes=(1,))
  assert np.array_equal(out, _one_hot_threshold(image))


def test_wrong_prediction_shape_is_reported():
  with pytest.raises(ValueError, match='predict_fn returned shape'):
    sw.sliding_window_predict(lambda b: b, _image((8, 8, 8)), (8, 8, 8), 2)

"""SlicedConv (3D convolution as a sum of 2D ones, through FFTs, or as fused tap sums) computes what nn.Conv
computes, gradients included."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spine_jax.models import conv as conv_lib

CASES = [  # kernel, strides, padding, input spatial shape
    ((3, 3, 3), (1, 1, 1), ((1, 1),) * 3, (6, 7, 5)),
    ((3, 3, 3), (2, 2, 1), ((1, 1),) * 3, (8, 7, 5)),  # odd side with stride 2, anisotropic
    ((1, 3, 3), (1, 2, 2), ((0, 0), (1, 1), (1, 1)), (5, 8, 8)),  # nnU-Net's in-plane-only kernels
    ((4, 4, 4), (2, 2, 2), ((1, 1),) * 3, (8, 8, 8)),  # the instance U-Net's down-convolution
    ((7, 7, 7), (1, 1, 1), ((3, 3),) * 3, (8, 9, 7)),  # and its initial convolution
    ((1, 1, 1), (1, 1, 1), 'VALID', (4, 5, 6)),  # segmentation heads
]


FFT_CASES = [c for c in CASES if c[1] == (1, 1, 1)] + [
    ((5, 3, 7), (1, 1, 1), ((2, 1), (0, 2), (3, 3)), (7, 6, 9)),  # uneven kernel and padding
]


TAP_SUM_CASES = [c for c in CASES if c[1] == (1, 1, 1)] + [
    ((3, 1, 3), (1, 1, 1), ((1, 0), (0, 0), (2, 1)), (5, 4, 6)),  # uneven kernel and padding
]


@pytest.mark.parametrize("kernel,strides,padding,spatial,form,channels",
                         [(*c, 'sliced', (3, 4)) for c in CASES] + [(*c, 'fft', (3, 4)) for c in FFT_CASES]
                         + [(*c, 'tapsum', (3, 4)) for c in TAP_SUM_CASES]
                         # overlap-save: every axis in several blocks, the last block's outputs cropped
                         + [(*c, 'fft_blocks', (3, 4)) for c in FFT_CASES if c[0] != (1, 1, 1)]
                         # several input groups (one short), several output groups: the scan and the map
                         + [(*TAP_SUM_CASES[0], 'tapsum', (19, 8)), (*TAP_SUM_CASES[0], 'tapsum', (8, 12))])
def test_sliced_conv_matches_nn_conv(kernel, strides, padding, spatial, form, channels, monkeypatch):
  cin, cout = channels
  if form == 'fft_blocks':
    monkeypatch.setattr(conv_lib, 'FFT_BLOCK_SIDE', max(kernel) + 3)
    form = 'fft'
  if cin > conv_lib.TAP_SUM_MAX_IN or cout > conv_lib.TAP_SUM_MAX_OUT:
    monkeypatch.setattr(conv_lib, 'TAP_SUM_MAX_IN', cin)
    monkeypatch.setattr(conv_lib, 'TAP_SUM_MAX_OUT', cout)
  x = jax.random.normal(jax.random.key(0), (2, *spatial, cin))
  ref_mod = nn.Conv(cout, kernel, strides=strides, padding=padding)
  variables = ref_mod.init(jax.random.key(1), x)
  variables = jax.tree.map(lambda v: v + 0.1, variables)  # a non-zero bias too
  ours = conv_lib.SlicedConv(cout, kernel, strides=strides, padding=padding, fft_min_taps=1 if form == 'fft' else 0,
                             tap_sum=form == 'tapsum')
  assert jax.tree.structure(ours.init(jax.random.key(1), x)) == jax.tree.structure(variables)
  ref, got = ref_mod.apply(variables, x), ours.apply(variables, x)
  assert got.shape == ref.shape
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)

  def loss(module):
    return lambda v, x: jnp.sum(jnp.sin(module.apply(v, x)))
  g_ref = jax.grad(loss(ref_mod), argnums=(0, 1))(variables, x)
  g_got = jax.grad(loss(ours), argnums=(0, 1))(variables, x)
  for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_fft_blocks_share_the_outputs_evenly():
  assert conv_lib.fft_blocks(64, 7, 72) == (1, 64)  # out + taps - 1 = 70 fits: one block, the whole axis
  assert conv_lib.fft_blocks(248, 7, 72) == (4, 62)  # 66 outputs per block at most: 4 blocks of 62 (68 voxels)
  assert conv_lib.fft_blocks(304, 7, 72) == (5, 61)  # 305 outputs computed, the last cropped
  assert conv_lib.fft_blocks(5, 7, 3) == (5, 1)  # a block shorter than the kernel still yields one output


def test_sliced_conv_two_spatial_dims_falls_back_to_lax():
  x = jax.random.normal(jax.random.key(0), (1, 6, 5, 2))
  ref_mod = nn.Conv(3, (3, 3), padding=((1, 1), (1, 1)))
  variables = ref_mod.init(jax.random.key(1), x)
  got = conv_lib.SlicedConv(3, (3, 3), padding=((1, 1), (1, 1))).apply(variables, x)
  np.testing.assert_allclose(got, ref_mod.apply(variables, x), rtol=1e-5, atol=1e-5)


def test_make_conv_and_bad_names():
  assert conv_lib.make_conv("xla") is nn.Conv
  assert conv_lib.make_conv("sliced") is conv_lib.SlicedConv
  assert conv_lib.make_conv("fft").keywords == {"fft_min_taps": conv_lib.FFT_MIN_TAPS, "tap_sum": False}
  assert conv_lib.make_conv("tapsum").keywords == {"fft_min_taps": conv_lib.FFT_MIN_TAPS, "tap_sum": True}
  assert conv_lib.resolve_conv_impl("auto") == ("tapsum" if jax.default_backend() == "cpu" else "xla")
  assert conv_lib.resolve_conv_impl("auto", tap_sum=False) == ("fft" if jax.default_backend() == "cpu" else "xla")
  assert conv_lib.resolve_conv_impl("tapsum", tap_sum=False) == "tapsum"  # only 'auto' is a choice
  assert all(conv_lib.is_sliced(impl) for impl in ("sliced", "fft", "tapsum")) and not conv_lib.is_sliced("xla")
  with pytest.raises(ValueError, match="unknown conv implementation 'cudnn'"):
    conv_lib.make_conv("cudnn")


def test_fft_takes_only_large_stride_1_kernels():
  """'fft' sends a 7^3 stride-1 kernel through FFTs (float32 rounding, not bit-equal to the 2D sum), and
  a 3^3 or a strided kernel through the 2D sum (bit-equal)."""
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 8, 2))
  for kernel, strides, pad, exact in (((7, 7, 7), (1, 1, 1), 3, False), ((3, 3, 3), (1, 1, 1), 1, True),
                                      ((7, 7, 7), (2, 2, 2), 3, True)):
    padding = ((pad, pad),) * 3
    fft = conv_lib.make_conv("fft")(2, kernel, strides=strides, padding=padding)
    sliced = conv_lib.SlicedConv(2, kernel, strides=strides, padding=padding)
    variables = sliced.init(jax.random.key(1), x)
    a, b = np.asarray(fft.apply(variables, x)), np.asarray(sliced.apply(variables, x))
    assert np.array_equal(a, b) == exact
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_input_too_small_for_kernel_is_a_clear_error():
  x = jnp.zeros((1, 2, 8, 8, 1))
  with pytest.raises(ValueError, match="too small for kernel 7"):
    conv_lib.SlicedConv(2, (7, 3, 3), padding=((0, 0), (1, 1), (1, 1))).init(jax.random.key(0), x)


def test_tap_sum_takes_only_small_stride_1_layers():
  """'tapsum' sends a 3^3 stride-1 layer with few channels through tap sums (float32 rounding, not bit-equal to
  the 2D sum), and a strided one, a wide one or one padded beyond its kernel through the 2D sum (bit-equal)."""
  for kernel, strides, pad, cin, cout, taken in (((3, 3, 3), (1, 1, 1), 1, 8, 8, True),
                                                 ((3, 3, 3), (2, 2, 2), 1, 8, 8, False),
                                                 ((3, 3, 3), (1, 1, 1), 1, 8, 16, False),
                                                 ((3, 3, 3), (1, 1, 1), 1, 32, 8, False),
                                                 ((3, 3, 3), (1, 1, 1), 3, 2, 2, False)):
    if strides == (1, 1, 1):  # the layer's rule (strides are SlicedConv's to check)
      assert conv_lib.takes_tap_sum(kernel, ((pad, pad),) * 3, cin, cout) == taken
    x = jax.random.normal(jax.random.key(0), (1, 6, 6, 6, cin))
    padding = ((pad, pad),) * 3
    tap = conv_lib.make_conv("tapsum")(cout, kernel, strides=strides, padding=padding)
    sliced = conv_lib.SlicedConv(cout, kernel, strides=strides, padding=padding)
    variables = sliced.init(jax.random.key(1), x)
    a, b = np.asarray(tap.apply(variables, x)), np.asarray(sliced.apply(variables, x))
    assert np.array_equal(a, b) != taken
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_tap_sum_odd_batch_and_side_matches_nn_conv():
  """An odd batch goes through two overlapping slabs of the first axis (an odd side here): same values and
  gradients as nn.Conv."""
  x = jax.random.normal(jax.random.key(0), (3, 7, 5, 4, 8))
  ref_mod = nn.Conv(8, (3, 3, 3), padding=((1, 1),) * 3)
  variables = ref_mod.init(jax.random.key(1), x)
  ours = conv_lib.make_conv("tapsum")(8, (3, 3, 3), padding=((1, 1),) * 3)
  np.testing.assert_allclose(ours.apply(variables, x), ref_mod.apply(variables, x), rtol=1e-5, atol=1e-5)
  g_ref = jax.grad(lambda v, x: jnp.sum(jnp.sin(ref_mod.apply(v, x))), argnums=(0, 1))(variables, x)
  g_got = jax.grad(lambda v, x: jnp.sum(jnp.sin(ours.apply(v, x))), argnums=(0, 1))(variables, x)
  for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel,padding", [((1, 1), 'VALID'), ((3, 3), ((1, 1), (1, 1))), ((1, 1), ((1, 1), (1, 1)))])
def test_tapsum_two_spatial_dims(kernel, padding):
  """2D under 'tapsum' (the DenseNets on CPU): 1x1 kernels as a contraction, the rest XLA's; nn.Conv's
  results and gradients either way."""
  x = jax.random.normal(jax.random.key(0), (2, 6, 5, 7))
  ref_mod = nn.Conv(4, kernel, padding=padding)
  variables = jax.tree.map(lambda v: v + 0.1, ref_mod.init(jax.random.key(1), x))
  ours = conv_lib.make_conv('tapsum')(4, kernel, padding=padding)
  np.testing.assert_allclose(ours.apply(variables, x), ref_mod.apply(variables, x), rtol=1e-5, atol=1e-5)
  loss = lambda m: (lambda v, x: jnp.sum(jnp.sin(m.apply(v, x))))
  for a, b in zip(jax.tree.leaves(jax.grad(loss(ours), argnums=(0, 1))(variables, x)),
                  jax.tree.leaves(jax.grad(loss(ref_mod), argnums=(0, 1))(variables, x))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  if kernel == (1, 1) and padding == 'VALID':  # the contraction: no convolution left in the program
    assert 'convolution' not in jax.jit(lambda v, x: ours.apply(v, x)).lower(variables, x).as_text()

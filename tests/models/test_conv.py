"""SlicedConv (3D convolution as a sum of 2D ones, or through FFTs) computes what nn.Conv computes, gradients
included."""
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


@pytest.mark.parametrize("kernel,strides,padding,spatial,fft",
                         [(*c, False) for c in CASES] + [(*c, True) for c in FFT_CASES])
def test_sliced_conv_matches_nn_conv(kernel, strides, padding, spatial, fft):
  x = jax.random.normal(jax.random.key(0), (2, *spatial, 3))
  ref_mod = nn.Conv(4, kernel, strides=strides, padding=padding)
  variables = ref_mod.init(jax.random.key(1), x)
  variables = jax.tree.map(lambda v: v + 0.1, variables)  # a non-zero bias too
  ours = conv_lib.SlicedConv(4, kernel, strides=strides, padding=padding, fft_min_taps=1 if fft else 0)
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


def test_sliced_conv_two_spatial_dims_falls_back_to_lax():
  x = jax.random.normal(jax.random.key(0), (1, 6, 5, 2))
  ref_mod = nn.Conv(3, (3, 3), padding=((1, 1), (1, 1)))
  variables = ref_mod.init(jax.random.key(1), x)
  got = conv_lib.SlicedConv(3, (3, 3), padding=((1, 1), (1, 1))).apply(variables, x)
  np.testing.assert_allclose(got, ref_mod.apply(variables, x), rtol=1e-5, atol=1e-5)


def test_make_conv_and_bad_names():
  assert conv_lib.make_conv("xla") is nn.Conv
  assert conv_lib.make_conv("sliced") is conv_lib.SlicedConv
  assert conv_lib.make_conv("fft").keywords == {"fft_min_taps": conv_lib.FFT_MIN_TAPS}
  assert conv_lib.resolve_conv_impl("auto") == ("fft" if jax.default_backend() == "cpu" else "xla")
  assert conv_lib.is_sliced("fft") and conv_lib.is_sliced("sliced") and not conv_lib.is_sliced("xla")
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

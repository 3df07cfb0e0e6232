"""SlicedConv (3D convolution as a sum of 2D ones) computes what nn.Conv computes, gradients included."""
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


@pytest.mark.parametrize("kernel,strides,padding,spatial", CASES)
def test_sliced_conv_matches_nn_conv(kernel, strides, padding, spatial):
  x = jax.random.normal(jax.random.key(0), (2, *spatial, 3))
  ref_mod = nn.Conv(4, kernel, strides=strides, padding=padding)
  variables = ref_mod.init(jax.random.key(1), x)
  variables = jax.tree.map(lambda v: v + 0.1, variables)  # a non-zero bias too
  ours = conv_lib.SlicedConv(4, kernel, strides=strides, padding=padding)
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
  assert conv_lib.resolve_conv_impl("auto") == ("sliced" if jax.default_backend() == "cpu" else "xla")
  with pytest.raises(ValueError, match="unknown conv implementation 'cudnn'"):
    conv_lib.make_conv("cudnn")


def test_input_too_small_for_kernel_is_a_clear_error():
  x = jnp.zeros((1, 2, 8, 8, 1))
  with pytest.raises(ValueError, match="too small for kernel 7"):
    conv_lib.SlicedConv(2, (7, 3, 3), padding=((0, 0), (1, 1), (1, 1))).init(jax.random.key(0), x)

"""SPINEPS' Unet3D in Flax: parameter count, names and shapes, outputs, the transposed conv, PyTorch twin."""
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from spine_jax.models import instance_unet

# spineps 2.1.3: Unet3D(dim=16, dim_mults=(1, 2, 4, 8), channels=10, out_dim=4), SPINEPS 1.x's network.
SPINEPS_UNET3D_PARAMS = 5_375_124


def config(**overrides):
  cfg = instance_unet.default_instance_unet_config()
  cfg.update(overrides)
  return cfg


def init_shapes(model, shape):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def analytic_count(dim, dim_mults, in_channels, num_classes, init_kernel=7, **_):
  """Parameters of the recipe (SPEC section 3), not of our module."""
  conv = lambda cin, cout, k: cin * cout * k ** 3 + cout
  def res(cin, cout):
    return conv(cin, cout, 3) + 2 * cout + conv(cout, cout, 3) + 2 * cout + (conv(cin, cout, 1) if cin != cout else 0)
  widths = [dim] + [dim * m for m in dim_mults]
  total = conv(in_channels, dim, init_kernel)
  for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
    total += res(a, b) + res(b, b) + (conv(b, b, 4) if i < len(dim_mults) - 1 else 0)  # down
    total += res(b, a) + res(a, a) + (conv(a, a, 4) if i > 0 else 0)  # up (transposed: same count)
  return total + 2 * res(widths[-1], widths[-1]) + res(2 * dim, dim) + conv(dim, num_classes, 1)


def test_default_parameter_count_and_widths():
  cfg = instance_unet.default_instance_unet_config()
  model = instance_unet.build_instance_unet(cfg)
  assert model.widths == (16, 16, 32, 64, 128) and model.divisor == 8
  params = init_shapes(model, (1, 8, 8, 8, 10))['params']
  assert count(params) == SPINEPS_UNET3D_PARAMS == analytic_count(**cfg.to_dict())
  small = config(dim=8, dim_mults=(1, 2, 4), in_channels=11, init_kernel=5)
  assert count(init_shapes(instance_unet.build_instance_unet(small), (1, 4, 4, 4, 11))['params']) == \
      analytic_count(**small.to_dict())


def test_param_names_layouts_and_pytorch_keys():
  params = init_shapes(instance_unet.build_instance_unet(config()), (1, 8, 8, 8, 10))['params']
  flat = {'/'.join(k): v.shape for k, v in traverse_util.flatten_dict(params).items()}
  assert flat['init_conv/kernel'] == (7, 7, 7, 10, 16)
  assert flat['down1_res0/block1/proj/kernel'] == (3, 3, 3, 16, 32)
  assert flat['down1_res0/res_conv/kernel'] == (1, 1, 1, 16, 32)
  assert 'down0_res0/res_conv/kernel' not in flat  # 16 -> 16: identity residual
  assert flat['down2_conv/kernel'] == (4, 4, 4, 64, 64)
  assert 'down3_conv/kernel' not in flat  # the last level does not downsample
  assert flat['mid_block2/block2/norm/scale'] == (128,)
  assert flat['up0_res0/block1/proj/kernel'] == (3, 3, 3, 128, 64)
  assert flat['up0_transpconv/kernel'] == (4, 4, 4, 64, 64)
  assert 'up3_transpconv/kernel' not in flat
  assert flat['final_res_block/res_conv/kernel'] == (1, 1, 1, 32, 16)
  assert flat['final_conv/kernel'] == (1, 1, 1, 16, 4)
  key = instance_unet.pytorch_key
  assert key(('init_conv', 'bias')) == 'init_conv.bias'
  assert key(('down1_res0', 'block2', 'norm', 'scale')) == 'downs.1.0.block2.norm.weight'
  assert key(('down2_conv', 'kernel')) == 'downs.2.2.weight'
  assert key(('up0_res1', 'res_conv', 'bias')) == 'ups.0.1.res_conv.bias'
  assert key(('up2_transpconv', 'kernel')) == 'ups.2.2.weight'
  assert key(('mid_block1', 'block1', 'proj', 'kernel')) == 'mid_block1.block1.proj.weight'
  assert key(('final_res_block', 'block1', 'norm', 'bias')) == 'final_res_block.block1.norm.bias'
  with pytest.raises(ValueError, match='not an InstanceUNet'):
    key(('decoder_stage0', 'conv0', 'kernel'))


def test_tiny_forward_shapes_and_dtypes():
  cfg = instance_unet.tiny_instance_unet_config()
  model = instance_unet.build_instance_unet(cfg)
  x = jax.nn.one_hot(jax.random.randint(jax.random.key(1), (2, 8, 12, 4), 0, 10), 10)
  variables = jax.jit(model.init)(jax.random.key(0), x)
  out = jax.jit(model.apply)(variables, x)
  assert out.shape == (2, 8, 12, 4, 4) and out.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(out)))
  cfg.dtype = 'bfloat16'
  half = jax.jit(instance_unet.build_instance_unet(cfg).apply)(variables, x)
  assert half.dtype == jnp.float32 and float(jnp.max(jnp.abs(half - out))) < 0.1 * float(jnp.max(jnp.abs(out)))


def test_input_checks():
  model = instance_unet.build_instance_unet(instance_unet.tiny_instance_unet_config())  # divisor 4
  variables = init_shapes(model, (1, 4, 4, 4, 10))
  with pytest.raises(ValueError, match=r'\(6, 4, 4\).*divisible by 4'):
    jax.eval_shape(model.apply, variables, jnp.zeros((1, 6, 4, 4, 10)))
  with pytest.raises(ValueError, match='input channels'):
    jax.eval_shape(model.apply, variables, jnp.zeros((1, 4, 4, 4, 3)))
  with pytest.raises(ValueError, match='spatial dims'):
    jax.eval_shape(model.apply, variables, jnp.zeros((4, 4, 4, 10)))
  with pytest.raises(ValueError, match='GroupNorm groups'):
    init_shapes(instance_unet.build_instance_unet(config(dim=4)), (1, 8, 8, 8, 10))


def _transposed_conv_reference(x, kernel, bias):
  """ConvTranspose3d(k=4, s=2, p=1) by its definition: input i, tap k land on output 2i - 1 + k."""
  b, n0, n1, n2, _ = x.shape
  out = np.zeros((b, 2 * n0 + 2, 2 * n1 + 2, 2 * n2 + 2, kernel.shape[-1]), np.float64)
  for k0 in range(4):
    for k1 in range(4):
      for k2 in range(4):
        out[:, k0:k0 + 2 * n0:2, k1:k1 + 2 * n1:2, k2:k2 + 2 * n2:2] += x @ kernel[k0, k1, k2]
  return out[:, 1:-1, 1:-1, 1:-1] + bias


@pytest.mark.parametrize('sliced', [False, True])
def test_transposed_conv_is_pytorchs(sliced):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 2, 4, 5)).astype(np.float32)
  layer = instance_unet.TransposedConv(6, sliced=sliced)
  params = {'kernel': rng.normal(size=(4, 4, 4, 5, 6)).astype(np.float32),
            'bias': rng.normal(size=(6,)).astype(np.float32)}
  out = np.asarray(layer.apply({'params': params}, jnp.asarray(x)))
  ref = _transposed_conv_reference(x.astype(np.float64), params['kernel'], params['bias'])
  assert out.shape == (2, 6, 4, 8, 6)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_conv_implementations_and_remat_agree():
  x = jax.nn.one_hot(jax.random.randint(jax.random.key(1), (1, 8, 4, 4), 0, 10), 10)
  cfg = instance_unet.tiny_instance_unet_config()
  cfg.conv = 'xla'
  plain = instance_unet.build_instance_unet(cfg)
  variables = jax.jit(plain.init)(jax.random.key(0), x)
  cfg.conv, cfg.remat = 'sliced', True
  other = instance_unet.build_instance_unet(cfg)
  assert jax.tree.structure(init_shapes(other, x.shape)) == jax.tree.structure(variables)
  def loss_and_grads(model):  # one compilation per model
    out, grads = jax.jit(jax.value_and_grad(lambda v: jnp.sum(model.apply(v, x) ** 2)))(variables)
    return out, np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])
  rel = lambda a, b: float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))
  (out_a, grad_a), (out_b, grad_b) = loss_and_grads(other), loss_and_grads(plain)
  assert rel(out_a, out_b) < 1e-5 and rel(grad_a, grad_b) < 1e-5  # float32 summation order (measured 9e-7)


def test_params_from_pytorch_names_the_problem():
  model = instance_unet.build_instance_unet(instance_unet.tiny_instance_unet_config())
  template = init_shapes(model, (1, 4, 4, 4, 10))['params']
  flat = traverse_util.flatten_dict(template)
  state = {}
  for path, leaf in flat.items():
    shape = leaf.shape
    if len(shape) == 5:  # (*k, in, out) -> conv (out, in, *k), transposed conv (in, out, *k)
      shape = (shape[3:] if path[0].endswith('transpconv') else shape[:2:-1]) + shape[:3]
    state['network.' + instance_unet.pytorch_key(path)] = np.zeros(shape, np.float32)
  params = instance_unet.params_from_pytorch(state, template)
  assert jax.tree.structure(params) == jax.tree.structure(template)
  del state['network.final_conv.bias']
  with pytest.raises(KeyError, match='final_conv.bias'):
    instance_unet.params_from_pytorch(state, template)
  state['network.final_conv.bias'] = np.zeros((5,), np.float32)
  with pytest.raises(ValueError, match=r'final_conv.bias: shape \(5,\)'):
    instance_unet.params_from_pytorch(state, template)


# ---------------------------------------------------------------- against SPINEPS' PyTorch Unet3D
# The spineps package imports its whole pipeline (TPTBox, nnU-Net ...) on `import spineps`, so CI
# installs it with --no-deps and the tests load the architecture's file alone. `architectures` is
# the network of SPINEPS 1.x checkpoints (it needs einops), `architectures_new` that of 2.x.


def spineps_unet3d(package: str):
  pytest.importorskip('torch', reason='torch is an optional extra')
  spec = importlib.util.find_spec('spineps')
  if spec is None or not spec.submodule_search_locations:
    pytest.skip('needs spineps (pip install --no-deps spineps==2.1.3)')
  if package == 'architectures':
    pytest.importorskip('einops', reason="spineps' 1.x Unet3D imports einops (pip install --no-deps einops)")
  path = pathlib.Path(spec.submodule_search_locations[0]) / package / 'unet3D.py'
  module_spec = importlib.util.spec_from_file_location(f'spineps_{package}_unet3D', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.Unet3D


@pytest.mark.parametrize('package, dim, channels', [('architectures', 16, 10), ('architectures_new', 8, 11)])
def test_names_shapes_and_count_match_pytorch(package, dim, channels):
  net = spineps_unet3d(package)(dim=dim, dim_mults=(1, 2, 4, 8), out_dim=4, channels=channels)
  theirs = {k: tuple(v.shape) for k, v in net.state_dict().items()}
  model = instance_unet.build_instance_unet(config(dim=dim, in_channels=channels))
  ours = traverse_util.flatten_dict(init_shapes(model, (1, 8, 8, 8, channels))['params'])
  assert sorted(instance_unet.pytorch_key(p) for p in ours) == sorted(theirs)
  params = instance_unet.params_from_pytorch(net.state_dict(), traverse_util.unflatten_dict(ours))
  assert count(params) == sum(int(np.prod(s)) for s in theirs.values())
  if (dim, channels) == (16, 10):
    assert count(params) == SPINEPS_UNET3D_PARAMS


@pytest.mark.parametrize('conv', ['xla', 'sliced'])
def test_outputs_match_pytorch(conv):
  unet3d = spineps_unet3d('architectures_new')  # skips without torch or spineps
  import torch
  torch.manual_seed(0)
  net = unet3d(dim=8, dim_mults=(1, 2, 4), out_dim=4, channels=10).eval()
  with torch.no_grad():  # non-trivial norm affines and biases, so a swapped or dropped one would show
    for k, v in net.state_dict().items():
      if '.norm.' in k:
        v.copy_(torch.randn_like(v) * 0.5 + (1.0 if k.endswith('weight') else 0.0))
      elif k.endswith('bias'):
        v.copy_(torch.randn_like(v) * 0.1)
  model = instance_unet.build_instance_unet(config(dim=8, dim_mults=(1, 2, 4), conv=conv))
  x = np.random.default_rng(0).normal(size=(2, 8, 12, 4, 10)).astype(np.float32)
  template = init_shapes(model, x.shape)['params']
  # A Lightning checkpoint's keys carry the wrapper's attribute name.
  params = instance_unet.params_from_pytorch({f'network.{k}': v for k, v in net.state_dict().items()}, template)
  ours = np.asarray(model.apply({'params': params}, jnp.asarray(x)))
  with torch.no_grad():
    ref = net(torch.from_numpy(x).permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1).numpy()
  assert ours.shape == ref.shape == (2, 8, 12, 4, 4)
  assert float(np.linalg.norm(ours - ref) / np.linalg.norm(ref)) < 1e-5

"""PlainConvUNet: nnU-Net v2 parameter count, names and shapes, outputs, dtypes, input checks."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from spine_jax.models import unet

# dynamic_network_architectures' PlainConvUNet, 6 stages 32..320, 1 channel in, 15 classes.
PLAIN_CONV_UNET_31M = 31_206_059

# An anisotropic plan whose every stage differs, so that any index slip changes a shape.
ANISO = dict(n_stages=5, features_per_stage=(32, 64, 128, 256, 320),
             kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 1), (3, 3, 3), (3, 3, 3)),
             strides=((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 1)),
             n_conv_per_stage=(1, 2, 3, 2, 2), n_conv_per_stage_decoder=(3, 2, 1, 2),
             in_channels=2, num_classes=7, conv_bias=False)


def config(**overrides):
  cfg = unet.default_unet_config()
  cfg.update(overrides)
  return cfg


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def init_shapes(model, shape):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))


def analytic_count(features_per_stage, kernel_sizes, strides, n_conv_per_stage,
                   n_conv_per_stage_decoder, in_channels, num_classes, conv_bias, **_):
  """Parameters of the recipe (affine norms, seg heads always biased), not of our module."""
  f, b = features_per_stage, int(conv_bias)
  total, cin = 0, in_channels
  for s, n in enumerate(n_conv_per_stage):
    for _ in range(n):
      total += cin * f[s] * math.prod(kernel_sizes[s]) + b * f[s] + 2 * f[s]
      cin = f[s]
  for i, n in enumerate(n_conv_per_stage_decoder):
    out = f[-(i + 2)]
    total += f[-(i + 1)] * out * math.prod(strides[-(i + 1)]) + b * out
    cin = 2 * out
    for _ in range(n):
      total += cin * out * math.prod(kernel_sizes[-(i + 2)]) + b * out + 2 * out
      cin = out
    total += out * num_classes + num_classes
  return total


def test_default_parameter_count():
  cfg = unet.default_unet_config()
  params = init_shapes(unet.build_unet(cfg), (1, 32, 32, 32, 1))['params']
  assert count(params) == PLAIN_CONV_UNET_31M == analytic_count(**cfg.to_dict())
  aniso = config(**ANISO)
  model = unet.build_unet(aniso)
  assert count(init_shapes(model, (1, 8, 32, 64, 2))['params']) == analytic_count(**aniso.to_dict())


def test_param_names_and_layouts():
  params = init_shapes(unet.build_unet(unet.default_unet_config()), (1, 32, 32, 32, 1))['params']
  flat = {'/'.join(k): v.shape for k, v in traverse_util.flatten_dict(params).items()}
  assert flat['encoder_stage0/conv0/kernel'] == (3, 3, 3, 1, 32)
  assert flat['encoder_stage5/norm1/scale'] == (320,)
  # Decoder stage 0 sits right after the bottleneck; stage 4 at full resolution.
  assert flat['decoder_transpconv0/kernel'] == (2, 2, 2, 320, 320)
  assert flat['decoder_stage0/conv0/kernel'] == (3, 3, 3, 640, 320)
  assert flat['decoder_stage4/conv0/kernel'] == (3, 3, 3, 64, 32)
  assert flat['decoder_seg4/kernel'] == (1, 1, 1, 32, 15)
  assert unet.pytorch_key(('encoder_stage3', 'norm1', 'scale')) == 'encoder.stages.3.0.convs.1.norm.weight'
  assert unet.pytorch_key(('decoder_stage2', 'conv0', 'bias')) == 'decoder.stages.2.convs.0.conv.bias'
  assert unet.pytorch_key(('decoder_transpconv1', 'kernel')) == 'decoder.transpconvs.1.weight'
  assert unet.pytorch_key(('decoder_seg4', 'bias')) == 'decoder.seg_layers.4.bias'


def test_output_shapes_anisotropic():
  cfg = config(**ANISO)
  shape = (2, 8, 32, 64, 2)  # divisors per axis: 8, 16, 8
  model = unet.build_unet(cfg)
  variables = init_shapes(model, shape)
  outs = jax.eval_shape(model.apply, variables, jnp.zeros(shape))
  # Full resolution first; each level divides by the cumulative strides.
  assert [o.shape for o in outs] == [(2, 8, 32, 64, 7), (2, 8, 16, 32, 7), (2, 4, 8, 16, 7),
                                     (2, 2, 4, 8, 7)]
  assert all(o.dtype == jnp.float32 for o in outs)
  cfg.deep_supervision = False
  single = unet.build_unet(cfg)
  # Same parameter tree: every head exists whether or not it is used.
  assert jax.tree.structure(init_shapes(single, shape)) == jax.tree.structure(variables)
  out = jax.eval_shape(single.apply, variables, jnp.zeros(shape))
  assert out.shape == (2, 8, 32, 64, 7) and out.dtype == jnp.float32


def test_two_dimensional_plan():
  cfg = config(n_stages=3, features_per_stage=(8, 16, 32), kernel_sizes=((3, 3),) * 3,
               strides=((1, 1), (2, 2), (2, 1)), n_conv_per_stage=(2,) * 3,
               n_conv_per_stage_decoder=(2,) * 2)
  model = unet.build_unet(cfg)
  variables = init_shapes(model, (1, 16, 8, 1))
  assert [o.shape for o in jax.eval_shape(model.apply, variables, jnp.zeros((1, 16, 8, 1)))] == [
      (1, 16, 8, 15), (1, 8, 4, 15)]


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_tiny_forward(dtype):
  cfg = unet.tiny_unet_config()
  cfg.dtype = dtype
  model = unet.build_unet(cfg)
  x = jax.random.normal(jax.random.key(1), (1, 8, 8, 4, 1))
  variables = model.init(jax.random.key(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  outs = jax.jit(model.apply)(variables, x)
  assert [o.shape for o in outs] == [(1, 8, 8, 4, 15), (1, 4, 4, 4, 15)]
  assert all(o.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(o))) for o in outs)
  if dtype == 'bfloat16':
    ref = unet.build_unet(unet.tiny_unet_config()).apply(variables, x)[0]
    assert float(jnp.max(jnp.abs(outs[0] - ref))) < 0.1 * float(jnp.max(jnp.abs(ref)))


def test_remat_same_tree_and_gradients():
  cfg = unet.tiny_unet_config()
  cfg.deep_supervision = False
  x = jax.random.normal(jax.random.key(1), (1, 4, 4, 2, 1))
  plain = unet.build_unet(cfg)
  cfg.remat = True
  remat = unet.build_unet(cfg)
  variables = plain.init(jax.random.key(0), x)
  assert jax.tree.structure(remat.init(jax.random.key(0), x)) == jax.tree.structure(variables)
  loss = lambda m: jax.grad(lambda v: jnp.sum(m.apply(v, x) ** 2))(variables)
  np.testing.assert_allclose(np.concatenate([np.ravel(g) for g in jax.tree.leaves(loss(plain))]),
                             np.concatenate([np.ravel(g) for g in jax.tree.leaves(loss(remat))]),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('norm, collections', [('batch', {'params', 'batch_stats'}),
                                               ('group', {'params'})])
def test_other_norms(norm, collections):
  cfg = unet.tiny_unet_config()
  cfg.norm, cfg.norm_groups = norm, 2
  model = unet.build_unet(cfg)
  variables = init_shapes(model, (2, 4, 4, 2, 1))
  assert set(variables) == collections
  outs = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 4, 4, 2, 1)), train=True,
                                              mutable=['batch_stats'])[0], variables)
  assert outs[0].shape == (2, 4, 4, 2, 15)


def test_input_checks():
  model = unet.build_unet(unet.tiny_unet_config())  # divisor (4, 4, 2)
  variables = init_shapes(model, (1, 4, 4, 2, 1))
  with pytest.raises(ValueError, match=r'\(6, 4, 2\).*\(4, 4, 2\)'):
    jax.eval_shape(model.apply, variables, jnp.zeros((1, 6, 4, 2, 1)))
  with pytest.raises(ValueError, match='input channels'):
    jax.eval_shape(model.apply, variables, jnp.zeros((1, 4, 4, 2, 3)))
  with pytest.raises(ValueError, match='spatial dims'):
    jax.eval_shape(model.apply, variables, jnp.zeros((4, 4, 2, 1)))
  with pytest.raises(ValueError, match='n_conv_per_stage_decoder'):
    init_shapes(unet.build_unet(config(n_conv_per_stage_decoder=(2,) * 6)), (1, 32, 32, 32, 1))
  with pytest.raises(ValueError, match='unknown norm'):
    unet.build_unet(config(norm='layer'))


# ---------------------------------------------------------------- against PyTorch


def torch_unet(cfg):
  torch = pytest.importorskip('torch', reason='torch is an optional extra')
  arch = pytest.importorskip('dynamic_network_architectures.architectures.unet',
                             reason='needs dynamic-network-architectures (pip install --no-deps)')
  conv = torch.nn.Conv3d if len(cfg.strides[0]) == 3 else torch.nn.Conv2d
  norm = torch.nn.InstanceNorm3d if len(cfg.strides[0]) == 3 else torch.nn.InstanceNorm2d
  return arch.PlainConvUNet(
      cfg.in_channels, cfg.n_stages, cfg.features_per_stage, conv, cfg.kernel_sizes, cfg.strides,
      cfg.n_conv_per_stage, cfg.num_classes, cfg.n_conv_per_stage_decoder, cfg.conv_bias, norm,
      {'eps': 1e-5, 'affine': True}, None, None, torch.nn.LeakyReLU, {'inplace': True},
      deep_supervision=cfg.deep_supervision)


def torch_params(model):
  """The state dict without its aliases, as numpy."""
  return {k: v.detach().numpy() for k, v in model.state_dict().items()
          if '.all_modules.' not in k and not k.startswith('decoder.encoder.')}


def to_flax(key, value):
  """PyTorch layout -> Flax layout: conv (out, in, *k) and transposed conv (in, out, *k)."""
  d = value.ndim - 2
  if value.ndim <= 1:
    return value
  if '.transpconvs.' in key:
    return value.transpose(*range(2, 2 + d), 0, 1)
  return value.transpose(*range(2, 2 + d), 1, 0)


@pytest.mark.parametrize('plan', ['default', 'anisotropic'])
def test_names_shapes_and_count_match_pytorch(plan):
  cfg = unet.default_unet_config() if plan == 'default' else config(**ANISO)
  theirs = torch_params(torch_unet(cfg))
  shape = (1, 32, 32, 32, 1) if plan == 'default' else (1, 8, 32, 64, 2)
  ours = traverse_util.flatten_dict(init_shapes(unet.build_unet(cfg), shape)['params'])
  mapped = {unet.pytorch_key(path): leaf.shape for path, leaf in ours.items()}
  assert sorted(mapped) == sorted(theirs)
  assert {k: to_flax(k, v).shape for k, v in theirs.items()} == mapped
  assert sum(v.size for v in theirs.values()) == count(ours)


def test_outputs_match_pytorch():
  torch = pytest.importorskip('torch', reason='torch is an optional extra')
  cfg = config(n_stages=3, features_per_stage=(4, 8, 16),
               kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 1, 3)),
               strides=((1, 1, 1), (2, 2, 1), (1, 2, 2)), n_conv_per_stage=(1, 2, 2),
               n_conv_per_stage_decoder=(2, 1), in_channels=2, num_classes=3)
  net = torch_unet(cfg).eval()
  torch.manual_seed(0)
  with torch.no_grad():  # non-trivial norm affines, so a swapped scale/bias would show
    for k, v in net.state_dict().items():
      if '.norm.' in k:
        v.copy_(torch.randn_like(v) * 0.5 + (1.0 if k.endswith('weight') else 0.0))
  theirs = torch_params(net)
  model = unet.build_unet(cfg)
  x = np.random.default_rng(0).normal(size=(2, 4, 8, 6, 2)).astype(np.float32)
  template = traverse_util.flatten_dict(init_shapes(model, x.shape)['params'])
  params = traverse_util.unflatten_dict(
      {p: jnp.asarray(to_flax(unet.pytorch_key(p), theirs[unet.pytorch_key(p)])) for p in template})
  ours = model.apply({'params': params}, jnp.asarray(x))
  with torch.no_grad():
    ref = net(torch.from_numpy(x).permute(0, 4, 1, 2, 3))
  assert len(ours) == len(ref) == 2
  for a, b in zip(ours, ref):
    b = b.permute(0, 2, 3, 4, 1).numpy()
    assert a.shape == b.shape
    assert float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b))) < 1e-5

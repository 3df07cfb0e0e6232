"""DenseNet trunk: torchvision/MONAI parameter counts and names, shapes, BatchNorm, remat."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from spine_jax.models import densenet as dn

# torchvision totals with 3 input channels and a Linear(F, 1000) classifier.
TORCHVISION = {'densenet121': (7_978_856, 1024), 'densenet169': (14_149_480, 1664),
               'densenet201': (20_013_928, 1920)}
MONAI_DENSENET121_1CH_4OUT = 6_951_684


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def shapes_of_init(model, shape):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


class Classifier(nn.Module):
  """Trunk + Linear head, the layout of MONAI's DenseNet121."""
  trunk: dn.DenseNet
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool):
    return nn.Dense(self.num_classes)(self.trunk(x, train))


def analytic_count(preset, in_channels, spatial_dims):
  """Parameters of a DenseNet body counted from the paper's recipe, not from our module."""
  p = dn.densenet_preset(preset)
  g, bn, c = p['growth_rate'], p['bn_size'], p['num_init_features']
  k = lambda n: n ** spatial_dims
  total = in_channels * c * k(7 if p['stem'] == 'imagenet' else 3) + 2 * c
  for i, n in enumerate(p['block_config']):
    for _ in range(n):
      total += 2 * c + c * bn * g + 2 * bn * g + bn * g * g * k(3)
      c += g
    if i < len(p['block_config']) - 1:
      total += 2 * c + c * (c // 2)
      c //= 2
  return total + 2 * c, c


def torchvision_param_shapes(preset, in_channels):
  """Expected torchvision state-dict parameter names and shapes (2D)."""
  p = dn.densenet_preset(preset)
  g, bn, c = p['growth_rate'], p['bn_size'], p['num_init_features']
  out = {'features.conv0.weight': (c, in_channels, 7, 7)}
  norm = lambda prefix, ch: {f'{prefix}.weight': (ch,), f'{prefix}.bias': (ch,)}
  out.update(norm('features.norm0', c))
  for b, n in enumerate(p['block_config'], start=1):
    for l in range(1, n + 1):
      prefix = f'features.denseblock{b}.denselayer{l}'
      out.update(norm(f'{prefix}.norm1', c))
      out[f'{prefix}.conv1.weight'] = (bn * g, c, 1, 1)
      out.update(norm(f'{prefix}.norm2', bn * g))
      out[f'{prefix}.conv2.weight'] = (g, bn * g, 3, 3)
      c += g
    if b < len(p['block_config']):
      out.update(norm(f'features.transition{b}.norm', c))
      out[f'features.transition{b}.conv.weight'] = (c // 2, c, 1, 1)
      c //= 2
  out.update(norm('features.norm5', c))
  return out


def as_torch_names(params):
  """Our params under 'features', renamed and reshaped as a converter would see them."""
  out = {}
  for path, leaf in traverse_util.flatten_dict(params).items():
    name = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}[path[-1]]
    shape = tuple(leaf.shape)
    if path[-1] == 'kernel':  # (*k, in, out) -> (out, in, *k)
      shape = (shape[-1], shape[-2]) + shape[:-2]
    out['.'.join(('features',) + path[:-1] + (name,))] = shape
  return out


def test_presets():
  assert {'densenet121', 'densenet169', 'densenet201', 'tiny', 'small'} <= set(dn.preset_names())
  p = dn.densenet_preset('densenet121')
  assert p == dict(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64, bn_size=4,
                   stem='imagenet')
  p['growth_rate'] = 1
  assert dn.densenet_preset('densenet121')['growth_rate'] == 32
  with pytest.raises(ValueError, match='unknown DenseNet preset'):
    dn.densenet_preset('resnet50')


@pytest.mark.parametrize('name', sorted(TORCHVISION))
def test_torchvision_body_param_counts(name):
  total, features = TORCHVISION[name]
  body = total - (features * 1000 + 1000)
  model = dn.DenseNet(**dn.densenet_preset(name))
  variables = shapes_of_init(model, (1, 32, 32, 3))
  assert count(variables['params']) == body
  assert model.num_features == features
  assert analytic_count(name, 3, 2) == (body, features)
  # One BatchNorm (mean, var) per torchvision BatchNorm: 2 + 2 per layer + 1 per transition + norm5.
  num_norms = 1 + 2 * sum(model.block_config) + (len(model.block_config) - 1) + 1
  assert len(jax.tree.leaves(variables['batch_stats'])) == 2 * num_norms


def test_monai_densenet121_param_count():
  model = Classifier(dn.DenseNet(**dn.densenet_preset('densenet121')), num_classes=4)
  assert count(shapes_of_init(model, (1, 32, 32, 1))['params']) == MONAI_DENSENET121_1CH_4OUT


def test_3d_param_count_follows_the_recipe():
  model = Classifier(dn.DenseNet(**dn.densenet_preset('densenet121'), spatial_dims=3), num_classes=4)
  body, features = analytic_count('densenet121', 1, 3)
  assert count(shapes_of_init(model, (1, 32, 32, 32, 1))['params']) == body + features * 4 + 4


@pytest.mark.parametrize('name, stem_side', [('tiny', 64), ('small', 32)])
def test_small_presets_follow_the_recipe(name, stem_side):
  model = dn.DenseNet(**dn.densenet_preset(name))
  x = jnp.zeros((1, 64, 64, 1))
  variables = shapes_of_init(model, x.shape)
  body, features = analytic_count(name, 1, 2)
  assert count(variables['params']) == body
  assert model.num_features == features
  stem = jax.eval_shape(lambda v: model.apply(v, x, False, method=dn.DenseNet.forward_stem), variables)
  assert stem.shape == (1, stem_side, stem_side, model.num_init_features)


def test_names_and_shapes_map_onto_torchvision_state_dict():
  model = dn.DenseNet(**dn.densenet_preset('densenet121'))
  params = shapes_of_init(model, (1, 32, 32, 3))['params']
  assert as_torch_names(params) == torchvision_param_shapes('densenet121', 3)


def test_stage_shapes_match_torchvision_on_224():
  model = dn.DenseNet(**dn.densenet_preset('densenet121'))
  x = jnp.zeros((2, 224, 224, 3))
  variables = shapes_of_init(model, x.shape)

  def stages(module, x):
    outs = [module.forward_stem(x, False)]
    for i in range(module.num_stages):
      outs.append(module.forward_stage(i, outs[-1], False))
    return outs + [module.forward_head(outs[-1], False)]

  outs = jax.eval_shape(lambda v: model.apply(v, x, method=stages), variables)
  assert [o.shape for o in outs] == [(2, 56, 56, 64), (2, 28, 28, 128), (2, 14, 14, 256),
                                     (2, 7, 7, 512), (2, 7, 7, 1024), (2, 1024)]


def test_3d_densenet121_output_shape():
  model = dn.DenseNet(**dn.densenet_preset('densenet121'), spatial_dims=3)
  x = jnp.zeros((1, 32, 32, 32, 1))
  variables = shapes_of_init(model, x.shape)
  assert variables['params']['conv0']['kernel'].shape == (7, 7, 7, 1, 64)
  out = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
  assert out.shape == (1, 1024)


def test_bfloat16_computes_in_bf16_with_float32_params():
  model = dn.DenseNet(**dn.densenet_preset('tiny'), dtype=jnp.bfloat16)
  x = jnp.zeros((2, 16, 16, 1))
  variables = shapes_of_init(model, x.shape)
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  assert jax.eval_shape(lambda v: model.apply(v, x, train=False), variables).dtype == jnp.bfloat16


def test_rejects_wrong_rank_and_dims():
  model = dn.DenseNet(**dn.densenet_preset('tiny'), spatial_dims=3)
  with pytest.raises(ValueError, match='spatial dims'):
    shapes_of_init(model, (2, 16, 16, 1))
  with pytest.raises(ValueError, match='spatial_dims'):
    shapes_of_init(dn.DenseNet(**dn.densenet_preset('tiny'), spatial_dims=1), (2, 16, 1))
  with pytest.raises(ValueError, match='unknown stem'):
    shapes_of_init(dn.DenseNet(**{**dn.densenet_preset('tiny'), 'stem': 'big'}), (2, 16, 16, 1))


@pytest.fixture(scope='module')
def tiny2d():
  model = dn.DenseNet(**dn.densenet_preset('tiny'))
  x = jax.random.normal(jax.random.key(1), (4, 16, 16, 1)) * 2.0 + 0.5
  variables = jax.jit(lambda: model.init(jax.random.key(0), x[:1], train=False))()
  return model, x, variables


def test_batchnorm_train_updates_running_stats_like_pytorch(tiny2d):
  model, x, variables = tiny2d
  out, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(variables, x)
  assert out.shape == (4, model.num_features) and np.isfinite(out).all()
  # norm0 sees conv0's output: running = 0.9 * old + 0.1 * batch statistic (old mean 0, var 1).
  h = model.apply(variables, x, method=lambda m, x: m.conv0(x))
  stats = updates['batch_stats']['norm0']
  np.testing.assert_allclose(stats['mean'], 0.1 * h.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats['var'], 0.9 + 0.1 * h.var(axis=(0, 1, 2)), rtol=1e-4)
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), variables['batch_stats'], updates['batch_stats'])
  assert all(jax.tree.leaves(changed))


def test_batchnorm_eval_uses_running_stats_only(tiny2d):
  model, x, variables = tiny2d
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))  # no mutable: would raise if written
  whole = apply(variables, x)
  one = apply(variables, x[1:2])
  np.testing.assert_allclose(one[0], whole[1], rtol=1e-5, atol=1e-6)


def test_dropout_is_stochastic_in_training_only():
  model = dn.DenseNet(**dn.densenet_preset('tiny'), dropout_rate=0.5)
  x = jnp.ones((2, 8, 8, 1))
  variables = model.init(jax.random.key(0), x, train=False)
  train = jax.jit(lambda v, x, k: model.apply(v, x, train=True, rngs={'dropout': k}, mutable=['batch_stats'])[0])
  assert not np.allclose(train(variables, x, jax.random.key(1)), train(variables, x, jax.random.key(2)))
  np.testing.assert_array_equal(model.apply(variables, x, train=False), model.apply(variables, x, train=False))


def test_remat_keeps_names_outputs_and_gradients(tiny2d):
  model, x, variables = tiny2d
  remat = model.clone(remat=True)
  assert jax.tree.structure(shapes_of_init(remat, x.shape)) == jax.tree.structure(variables)

  def loss(m, params):
    out, _ = m.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
    return jnp.mean(out ** 2)

  grads = [jax.jit(jax.grad(functools.partial(loss, m)))(variables['params']) for m in (model, remat)]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), *grads)
  assert count(grads[0]) == count(variables['params'])

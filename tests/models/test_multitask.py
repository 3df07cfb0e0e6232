"""Multi-task networks: config, every kind's outputs, the quality MLP, cross-stitch coupling."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from spine_jax.models import densenet as dn
from spine_jax.models import multitask as mt

SHAPES = {2: (2, 32, 32, 1), 3: (2, 16, 16, 16, 1)}
EXPECTED = {'blastic': (2,), 'lytic': (2,), 'posterolateral': (2, 3), 'quality': (2, 4)}


def config(**overrides):
  cfg = mt.default_model_config()
  cfg.trunk = 'tiny'
  cfg.update(overrides)
  return cfg


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def shapes_of_init(model, shape):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


def test_default_config_has_every_field():
  cfg = mt.default_model_config()
  assert isinstance(cfg, ml_collections.ConfigDict)
  expected = dict(kind='hard', trunk='densenet121', growth_rate=None, block_config=None, num_init_features=None,
                  bn_size=None, stem=None, compression=0.5, dropout_rate=0.0, spatial_dims=2, in_channels=1,
                  mlp_hidden=16, head_dropout=0.0, cross_stitch_init=0.9, dtype='float32', remat=False)
  assert {k: cfg[k] for k in expected} == expected
  cfg.growth_rate = 12  # placeholders accept typed overrides
  cfg.block_config = (3, 6, 4)
  assert mt.trunk_fields(cfg)['growth_rate'] == 12


def test_trunk_fields_override_the_preset():
  fields = mt.trunk_fields(config(growth_rate=4, block_config=[1, 2, 3], stem='imagenet', dtype='bfloat16',
                                  spatial_dims=3))
  assert fields == dict(growth_rate=4, block_config=(1, 2, 3), num_init_features=16, bn_size=2,
                        stem='imagenet', compression=0.5, dropout_rate=0.0, spatial_dims=3, remat=False,
                        dtype=jnp.dtype(jnp.bfloat16))
  # A partial config (a plain dict) falls back on the defaults.
  assert mt.trunk_fields({'trunk': 'small'})['block_config'] == (3, 6, 4)


def test_unknown_kind_raises():
  with pytest.raises(ValueError, match='unknown model kind'):
    mt.build_model(config(kind='medium'))


def test_baseline_matches_monai_densenet121_param_count():
  model = mt.build_model(config(kind='single_quality', trunk='densenet121'))
  params = shapes_of_init(model, (1, 32, 32, 1))['params']
  assert count(params) == 6_951_684
  assert params['quality_head']['kernel'].shape == (1024, 4)


@pytest.mark.parametrize('spatial_dims', [2, 3])
@pytest.mark.parametrize('kind', mt.KINDS)
def test_output_keys_and_shapes(kind, spatial_dims):
  model = mt.build_model(config(kind=kind, spatial_dims=spatial_dims))
  x = jnp.zeros(SHAPES[spatial_dims])
  variables = shapes_of_init(model, x.shape)
  for train in (False, True):
    out = jax.eval_shape(lambda v: model.apply(v, x, train=train, mutable=['batch_stats'])[0], variables)
    assert tuple(out) == mt.OUTPUT_KEYS[kind]
    assert {k: v.shape for k, v in out.items()} == {k: EXPECTED[k] for k in mt.OUTPUT_KEYS[kind]}
    assert {v.dtype for v in out.values()} == {jnp.dtype(jnp.float32)}


def test_bfloat16_trunk_still_gives_float32_logits():
  model = mt.build_model(config(kind='hard', dtype='bfloat16'))
  x = jnp.zeros(SHAPES[2])
  variables = shapes_of_init(model, x.shape)
  out = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
  assert {v.dtype for v in out.values()} == {jnp.dtype(jnp.float32)}


@pytest.fixture(scope='module')
def hard():
  model = mt.build_model(config(kind='hard', mlp_hidden=8))
  x = jax.random.normal(jax.random.key(1), SHAPES[2])
  variables = jax.jit(lambda: model.init(jax.random.key(0), x, train=False))()
  return model, x, variables, jax.jit(lambda v, x: model.apply(v, x, train=False))


def test_hard_param_tree(hard):
  model, _, variables, _ = hard
  params = variables['params']
  assert set(params) == {'features', 'blastic_head', 'lytic_head', 'posterolateral_head', 'quality_mlp'}
  f = dn.num_features(**{k: v for k, v in dn.densenet_preset('tiny').items() if k not in ('bn_size', 'stem')})
  assert params['blastic_head']['kernel'].shape == params['lytic_head']['kernel'].shape == (f, 1)
  assert params['posterolateral_head']['kernel'].shape == (f, 3)
  assert params['quality_mlp']['hidden']['kernel'].shape == (2, 8)  # input: the two sub-task logits
  assert params['quality_mlp']['out']['kernel'].shape == (8, 4)
  # The trunk is a plain DenseNet under torchvision's name.
  trunk = dn.DenseNet(**mt.trunk_fields(config()))
  assert jax.tree.structure(shapes_of_init(trunk, SHAPES[2])['params']) == jax.tree.structure(params['features'])


def test_hard_quality_is_the_mlp_of_the_subtask_logits(hard):
  _, x, variables, apply = hard
  out = apply(variables, x)
  mlp = variables['params']['quality_mlp']
  z = np.stack([out['blastic'], out['lytic']], -1)
  h = np.maximum(z @ mlp['hidden']['kernel'] + mlp['hidden']['bias'], 0)
  np.testing.assert_allclose(out['quality'], h @ mlp['out']['kernel'] + mlp['out']['bias'], rtol=1e-5, atol=1e-6)
  # Moving only the lytic head moves the quality logits, not the other heads.
  moved = jax.tree.map(lambda a: a, variables)
  moved['params']['lytic_head']['bias'] = variables['params']['lytic_head']['bias'] + 3.0
  out2 = apply(moved, x)
  np.testing.assert_allclose(out2['lytic'], out['lytic'] + 3.0, rtol=1e-5)
  np.testing.assert_array_equal(out2['blastic'], out['blastic'])
  assert not np.allclose(out2['quality'], out['quality'])


def test_hard_quality_loss_trains_the_subtask_heads(hard):
  model, x, variables, _ = hard

  def quality_loss(params):
    out, _ = model.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
    return -jnp.mean(jax.nn.log_softmax(out['quality'])[:, 2])

  grads = jax.jit(jax.grad(quality_loss))(variables['params'])
  for name in ('blastic_head', 'lytic_head', 'features'):
    assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads[name])), name
  assert all(np.abs(g).max() == 0 for g in jax.tree.leaves(grads['posterolateral_head']))


def test_hard_batchnorm_train_and_eval(hard):
  model, x, variables, apply = hard
  _, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(variables, x)
  flat_old = traverse_util.flatten_dict(variables['batch_stats'])
  flat_new = traverse_util.flatten_dict(updates['batch_stats'])
  assert flat_old.keys() == flat_new.keys() and all(k[0] == 'features' for k in flat_new)
  assert all(not np.allclose(flat_old[k], flat_new[k]) for k in flat_new)
  # Eval mode reads the running statistics only: no mutation needed, no batch dependence.
  one = apply(variables, x[:1])
  both = apply(variables, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-6), one, both)


def test_single_task_params():
  for kind, head, n in (('single_quality', 'quality_head', 4), ('single_posterolateral', 'posterolateral_head', 3)):
    params = shapes_of_init(mt.build_model(config(kind=kind)), SHAPES[2])['params']
    assert set(params) == {'features', head}
    assert params[head]['kernel'].shape[-1] == n


@pytest.fixture(scope='module')
def soft():
  model = mt.build_model(config(kind='soft', cross_stitch_init=0.7))
  x = jax.random.normal(jax.random.key(1), SHAPES[2])
  variables = jax.jit(lambda: model.init(jax.random.key(0), x, train=False))()
  return model, x, variables, jax.jit(lambda v, x: model.apply(v, x, train=False))


def test_soft_cross_stitch_per_stage_with_init_values(soft):
  _, _, variables, _ = soft
  params = variables['params']
  stages = len(dn.densenet_preset('tiny')['block_config'])
  assert {k for k in params if k.startswith('cross_stitch')} == {f'cross_stitch{i + 1}' for i in range(stages)}
  expected = np.full((3, 3), 0.15, np.float32)
  np.fill_diagonal(expected, 0.7)
  for i in range(stages):
    np.testing.assert_allclose(params[f'cross_stitch{i + 1}']['alpha'], expected, rtol=1e-6)
  trunk_tree = jax.tree.structure(params['features_blastic'])
  assert all(jax.tree.structure(params[f'features_{t}']) == trunk_tree for t in mt.SUBTASKS)
  assert {'blastic_head', 'lytic_head', 'posterolateral_head', 'quality_mlp'} <= set(params)


def test_soft_cross_stitch_couples_the_trunks(soft):
  _, x, variables, apply = soft
  params = variables['params']
  bumped = dict(params, features_lytic=jax.tree.map(lambda a: a * 1.5, params['features_lytic']))
  base, moved = apply(variables, x), apply({**variables, 'params': bumped}, x)
  assert not np.allclose(base['blastic'], moved['blastic'])  # lytic trunk leaks into the blastic task
  # With identity matrices the tasks are independent trunks.
  ident = {k: {'alpha': jnp.eye(3)} if k.startswith('cross_stitch') else v for k, v in params.items()}
  bumped_ident = {**ident, 'features_lytic': bumped['features_lytic']}
  a = apply({**variables, 'params': ident}, x)
  b = apply({**variables, 'params': bumped_ident}, x)
  np.testing.assert_array_equal(a['blastic'], b['blastic'])
  np.testing.assert_array_equal(a['posterolateral'], b['posterolateral'])
  assert not np.allclose(a['lytic'], b['lytic'])


def test_cross_stitch_unit_mixes_maps():
  unit = mt.CrossStitch(0.5)
  maps = [jnp.full((1, 2, 2, 3), v) for v in (1.0, 2.0, 4.0)]
  variables = unit.init(jax.random.key(0), maps)
  out = unit.apply(variables, maps)
  np.testing.assert_allclose([o[0, 0, 0, 0] for o in out], [0.5 + 0.25 * 6, 1.0 + 0.25 * 5, 2.0 + 0.25 * 3])


def test_class_names():
  assert mt.QUALITY_CLASSES == ('normal', 'blastic', 'mixed', 'lytic')
  assert mt.POSTEROLATERAL_CLASSES == ('none', 'unilateral', 'bilateral')


@pytest.mark.parametrize('spatial_dims', [2, 3])
def test_conv_forms_share_parameters_and_results(spatial_dims):
  """`model.conv`: the CPU form (1x1 layers as contractions, 3D layers as 2D sums) and XLA's own take the same
  parameters and give the same outputs and gradients, so checkpoints and converted weights serve both."""
  x = jax.random.normal(jax.random.key(3), SHAPES[spatial_dims])
  xla = mt.build_model(config(conv='xla', spatial_dims=spatial_dims))
  ours = mt.build_model(config(conv='tapsum', spatial_dims=spatial_dims))
  variables = xla.init(jax.random.key(0), x, train=False)
  assert jax.tree.structure(ours.init(jax.random.key(0), x, train=False)) == jax.tree.structure(variables)

  def loss(model):
    def fn(params):
      out, _ = model.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
      return sum(jnp.sum(jnp.sin(v)) for v in jax.tree.leaves(out))
    return fn
  for a, b in zip(jax.tree.leaves(jax.value_and_grad(loss(ours))(variables['params'])),
                  jax.tree.leaves(jax.value_and_grad(loss(xla))(variables['params']))):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4)

"""Labelling network: one head per group on a 3D DenseNet trunk, its config, train and eval modes."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from spine_jax.engine import mesh as mesh_lib
from spine_jax.engine import networks
from spine_jax.models import densenet
from spine_jax.models import labeling

HEADS = (("VERT", 24), ("REGION", 3), ("FULLYVISIBLE", 2))
SHAPE = (2, 16, 12, 8, 1)  # (B, P, I, R, 1)


def tiny(**overrides):
  cfg = labeling.default_model_config()
  cfg.update(dict(backbone="tiny", heads=HEADS, **overrides))
  return labeling.build_labeling_model(cfg)


@pytest.fixture(scope="module")
def variables():
  return tiny().init(jax.random.key(0), jnp.zeros(SHAPE), train=False)


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_default_config_has_every_field():
  cfg = labeling.default_model_config()
  assert set(cfg) == {"backbone", "heads", "head_hidden", "dropout", "dtype", "conv"}
  assert (cfg.backbone, cfg.head_hidden, cfg.dropout, cfg.dtype, cfg.conv) == ("densenet121", True, 0.0, "float32",
                                                                               "auto")
  assert set(labeling.BACKBONES) <= set(densenet.preset_names())


def test_one_logit_vector_per_head_in_order(variables):
  x = jnp.asarray(np.random.default_rng(0).normal(size=SHAPE), jnp.float32)
  out = tiny().apply(variables, x, train=False)
  assert list(out) == [name for name, _ in HEADS]
  assert {k: v.shape for k, v in out.items()} == {name: (2, n) for name, n in HEADS}
  assert all(v.dtype == jnp.float32 and np.isfinite(np.asarray(v)).all() for v in out.values())
  # Each batch element is classified alone in eval mode (running statistics, no batch coupling).
  single = tiny().apply(variables, x[1:], train=False)
  np.testing.assert_allclose(np.asarray(single["VERT"][0]), np.asarray(out["VERT"][1]), rtol=1e-5, atol=1e-6)


def test_heads_are_spineps_layout(variables):
  f = densenet.num_features(growth_rate=8, block_config=(2, 2), num_init_features=16)
  shapes = {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(variables["params"]).items()
            if k[0].startswith("head_")}
  expected = {}
  for name, n in HEADS:
    expected.update({f"head_{name}/hidden/kernel": (f, f // 2), f"head_{name}/hidden/bias": (f // 2,),
                     f"head_{name}/out/kernel": (f // 2, n), f"head_{name}/out/bias": (n,)})
  assert shapes == expected and labeling.hidden_width("tiny") == f // 2
  flat = tiny(head_hidden=False).init(jax.random.key(0), jnp.zeros(SHAPE), train=False)["params"]
  assert {k: v.shape for k, v in flat["head_VERT"]["out"].items()} == {"kernel": (f, 24), "bias": (24,)}
  assert "hidden" not in flat["head_VERT"]


def test_densenet121_with_spineps_heads_has_plclassifier_parameter_count():
  """MONAI's DenseNet121(spatial_dims=3, in_channels=1, out_channels=1) has 11,243,649 parameters, 11,242,624
  outside class_layers (its Linear(1024, 1) dropped, as PLClassifier drops it); heads Linear(1024, 512) and
  Linear(512, n)."""
  model = labeling.LabelingNet(heads=HEADS, backbone="densenet121")
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 16, 1)), train=False))
  heads = sum(1024 * 512 + 512 + 512 * n + n for _, n in HEADS)
  assert count(shapes["params"]) == 11_242_624 + heads


def test_train_mode_updates_statistics_and_eval_mode_does_not(variables):
  x = jnp.asarray(np.random.default_rng(1).normal(2.0, 1.0, size=SHAPE), jnp.float32)
  model = tiny()
  out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  before = traverse_util.flatten_dict(variables["batch_stats"])
  after = traverse_util.flatten_dict(updates["batch_stats"])
  assert before.keys() == after.keys() and any(not np.allclose(before[k], after[k]) for k in before)
  assert {k: v.shape for k, v in out.items()} == {name: (2, n) for name, n in HEADS}
  with pytest.raises(Exception, match="batch_stats"):  # train mode needs mutable statistics
    model.apply(variables, x, train=True)


def test_dropout_only_in_train_mode(variables):
  x = jnp.asarray(np.random.default_rng(2).normal(size=SHAPE), jnp.float32)
  model = tiny(dropout=0.5)
  run = lambda key: model.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": key})[0]["VERT"]
  assert not np.allclose(run(jax.random.key(1)), run(jax.random.key(2)))
  np.testing.assert_array_equal(model.apply(variables, x, train=False)["VERT"],
                                tiny().apply(variables, x, train=False)["VERT"])


def test_bfloat16_trunk_gives_float32_logits(variables):
  out = tiny(dtype="bfloat16").apply(variables, jnp.ones(SHAPE), train=False)
  assert all(v.dtype == jnp.float32 for v in out.values())


def test_heads_from_json_and_mappings():
  assert labeling.normalise_heads([["VERT", 24], ["REGION", 3]]) == (("VERT", 24), ("REGION", 3))
  assert labeling.normalise_heads({"VERTEX": 26, "REGION": 3}) == (("VERTEX", 26), ("REGION", 3))


@pytest.mark.parametrize("heads, message", [
    ((), "one or more"), ((("VERT", 24), ("VERT", 3)), "distinct"), ((("VERT/X", 24),), "letters"),
    ((("VERT", 0),), "positive integer"), ((("VERT", 2.5),), "positive integer"), (("VERT",), "pair")])
def test_bad_heads_are_refused(heads, message):
  with pytest.raises(ValueError, match=message):
    labeling.normalise_heads(heads)


def test_unknown_backbone_is_refused():
  with pytest.raises(ValueError, match="model.backbone: unknown DenseNet preset 'resnet18'"):
    labeling.build_labeling_model({"backbone": "resnet18"})


def test_network_builder_knows_the_task():
  config = ml_collections.ConfigDict(dict(task="labeling", model=labeling.default_model_config(),
                                          data=dict(patch_size=(16, 12, 8))))
  config.model.backbone = "tiny"
  model, shape = networks.build(config)
  assert isinstance(model, labeling.LabelingNet) and shape == (1, 16, 12, 8, 1)
  _, abstract = networks.abstract_variables(config, mesh_lib.make_mesh(1))
  assert abstract["params"]["head_VERT"]["out"]["kernel"].shape[-1] == 24
  config.model.backbone = "labeling_small"  # pools by 16: an 8-voxel axis would leave nothing to convolve
  with pytest.raises(ValueError, match=r"data.patch_size \(16, 12, 8\): the labeling_small trunk needs at least 16"):
    networks.build(config)

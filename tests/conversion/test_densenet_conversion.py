"""torchvision / MONAI DenseNet weights -> our trunk: outputs against PyTorch, adaptation, bad input, init_from."""
import functools
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from spine_jax.conversion import ConversionError
from spine_jax.conversion import densenet as conv
from spine_jax.models import densenet
from tests import spineps_worker

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = dict(init_features=16, growth_rate=8, block_config=(2, 2), bn_size=2)  # MONAI DenseNet kwargs


def randomise_norms(net, torch, seed=0):
  """Non-trivial BatchNorm statistics and affines, so that a swapped or missing tensor shows."""
  return spineps_worker.randomise_weights(net, seed, biases=False)


def trunk_vector(net, x):
  """MONAI's trunk output: features -> ReLU -> global average pool -> flatten (what its Linear reads)."""
  return net.class_layers[:3](net.features(x))


def torchvision_names(state_dict, legacy=False):
  """A MONAI DenseNet state dict under torchvision's names (current, or the original downloads' ``norm.1``)."""
  out = {}
  for key, value in state_dict.items():
    key = key.replace(".layers.", ".").replace("class_layers.out.", "classifier.")
    if legacy:
      key = re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", key)
    out[key] = value
  return out


@functools.lru_cache(maxsize=None)
def _apply_fn(fields):
  model = densenet.DenseNet(**{k: v for k, v in fields if k != "in_channels"})
  return jax.jit(lambda variables, x: model.apply(variables, x, train=False))


def ours(fields, variables, x_channels_first):
  """Our trunk on a PyTorch-layout input (channels moved last)."""
  x = np.moveaxis(np.asarray(x_channels_first), 1, -1)
  return np.asarray(_apply_fn(tuple(sorted(fields.items())))(variables, jnp.asarray(x)))


def convert(path, **target):
  """Library path of a conversion: read, describe, check every key and shape against the target trunk."""
  _, arrays = conv.read_weights(path)
  fields = {**conv.infer_architecture(arrays, path), **target}
  return fields, conv.to_variables(arrays, conv.trunk_template(fields), path)


@pytest.fixture(scope="module")
def monai121_2d(torch, monai_nets, tmp_path_factory):
  torch.manual_seed(0)
  net = randomise_norms(monai_nets.DenseNet121(spatial_dims=2, in_channels=3, out_channels=4), torch)
  path = tmp_path_factory.mktemp("monai") / "densenet121_2d.pth"
  torch.save(net.state_dict(), path)
  x = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32))
  return net, path, x


def test_monai_densenet121_2d_matches(monai121_2d, torch, conformance):
  net, path, x = monai121_2d
  fields, variables = convert(path)
  assert conv.preset_name(fields) == "densenet121" and fields["spatial_dims"] == 2
  with torch.no_grad():
    ref, logits = trunk_vector(net, x).numpy(), net(x).numpy()
  got = ours(fields, variables, x)
  conformance("MONAI DenseNet121 2D, trunk (2x3x64x64)", got, ref)
  # The classifier is not converted (heads start fresh) but maps onto the trunk vector as documented.
  w, b = net.class_layers.out.weight.detach().numpy(), net.class_layers.out.bias.detach().numpy()
  conformance("MONAI DenseNet121 2D, logits via its Linear", got @ w.T + b, logits)


@pytest.mark.parametrize("legacy", [False, True], ids=["current-names", "legacy-norm.1-names"])
def test_torchvision_state_dicts(monai121_2d, torch, tmp_path, legacy, conformance):
  net, _, x = monai121_2d
  path = tmp_path / "densenet121.pth"
  torch.save(torchvision_names(net.state_dict(), legacy), path)
  flavour, _ = conv.read_weights(path)
  assert flavour == ("torchvision (legacy names)" if legacy else "torchvision")
  fields, variables = convert(path)
  with torch.no_grad():
    ref = trunk_vector(net, x).numpy()
  conformance(f"torchvision-named DenseNet121 2D ({'legacy' if legacy else 'current'} keys)",
              ours(fields, variables, x), ref)


def test_real_torchvision_densenet121(torch, tmp_path, conformance):
  try:
    import torchvision
  except Exception as e:  # a torchvision built for another torch fails at import with a RuntimeError
    pytest.skip(f"torchvision not importable here ({type(e).__name__}); torchvision-named files are "
                f"checked through MONAI's identical modules")
  torch.manual_seed(0)
  net = randomise_norms(torchvision.models.densenet121(weights=None), torch)
  path = tmp_path / "tv.pth"
  torch.save(net.state_dict(), path)
  fields, variables = convert(path)
  x = torch.from_numpy(np.random.default_rng(1).normal(size=(1, 3, 64, 64)).astype(np.float32))
  with torch.no_grad():
    ref = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(torch.relu(net.features(x)), 1), 1).numpy()
  conformance("torchvision densenet121 2D, trunk (1x3x64x64)", ours(fields, variables, x), ref)


def test_monai_densenet121_3d_matches(torch, monai_nets, tmp_path, conformance):
  torch.manual_seed(1)
  net = randomise_norms(monai_nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=4), torch, seed=1)
  path = tmp_path / "densenet121_3d.pth"
  torch.save(net.state_dict(), path)
  fields, variables = convert(path)
  assert fields["spatial_dims"] == 3 and fields["in_channels"] == 1
  x = torch.from_numpy(np.random.default_rng(2).normal(size=(1, 1, 32, 32, 32)).astype(np.float32))
  with torch.no_grad():
    ref = trunk_vector(net, x).numpy()
  conformance("MONAI DenseNet121 3D, trunk (1x1x32x32x32)", ours(fields, variables, x), ref)


def test_first_conv_sums_rgb_into_one_channel(monai121_2d, torch, conformance):
  net, path, x = monai121_2d
  fields, variables = convert(path, in_channels=1)
  assert variables["params"]["conv0"]["kernel"].shape == (7, 7, 1, 64)
  grey = x[:, :1]
  with torch.no_grad():  # a grey image replicated into RGB: the summed kernel gives the same response
    ref = trunk_vector(net, grey.repeat(1, 3, 1, 1)).numpy()
  conformance("DenseNet121 2D, 3->1 channel first conv (grey replicated)", ours(fields, variables, grey), ref)
  assert conv.adapt_input_channels(np.ones((2, 3, 1, 1)), 5).shape == (2, 5, 1, 1)
  np.testing.assert_allclose(conv.adapt_input_channels(np.ones((2, 3, 1, 1)), 6).sum(1), 3.0)


def test_inflation_to_3d_matches_inflated_monai(monai121_2d, torch, monai_nets, conformance):
  net2d, path, _ = monai121_2d
  fields, variables = convert(path, spatial_dims=3, in_channels=1)
  net3d = monai_nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=4).eval()
  inflated = {}
  for key, value in net2d.state_dict().items():  # independent of ours: summed RGB, repeated along depth / k
    if key == "features.conv0.weight":
      value = value.sum(1, keepdim=True)
    if value.ndim == 4:
      value = value.unsqueeze(2).repeat(1, 1, value.shape[-1], 1, 1) / value.shape[-1]
    inflated[key] = value
  net3d.load_state_dict(inflated)
  x = torch.from_numpy(np.random.default_rng(3).normal(size=(1, 1, 32, 32, 32)).astype(np.float32))
  with torch.no_grad():
    ref = trunk_vector(net3d, x).numpy()
  conformance("DenseNet121 2D inflated to 3D, 1 channel (1x1x32x32x32)", ours(fields, variables, x), ref)


def test_convert_command_writes_a_torch_free_npz(monai121_2d, tmp_path):
  _, path, _ = monai121_2d
  out = tmp_path / "trunk.npz"
  run = subprocess.run([sys.executable, "-m", "spine_jax.convert", "densenet", f"--input={path}", f"--output={out}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "monai densenet121" in run.stdout and "classifier not kept" in run.stdout
  flavour, arrays = conv.read_weights(out)
  _, original = conv.read_weights(path)
  assert flavour == "monai" and set(arrays) < set(original)
  assert all(np.array_equal(arrays[k], original[k]) for k in arrays)
  _, from_npz = convert(out)
  _, from_pth = convert(path)
  assert jax.tree.all(jax.tree.map(np.array_equal, from_npz, from_pth))


# ---------------------------------------------------------------- bad input: clear errors, nothing written


@pytest.fixture
def tiny_file(torch, monai_nets, tmp_path):
  """A small MONAI DenseNet state dict (and a writer for edited copies)."""
  torch.manual_seed(0)
  state = monai_nets.DenseNet(spatial_dims=2, in_channels=3, out_channels=4, **TINY).state_dict()

  def write(name="tiny.pth", edit=None):
    sd = dict(state)
    if edit:
      edit(sd)
    path = tmp_path / name
    torch.save(sd, path)
    return path
  return write


def _refused(src, out, pattern):
  with pytest.raises(ConversionError, match=pattern):
    conv.convert_file(src, out)
  assert not out.exists()
  assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]  # no temporary left


def test_missing_key_is_named(tiny_file, torch, tmp_path):
  src = tiny_file(edit=lambda sd: sd.pop("features.denseblock2.denselayer2.layers.conv2.weight"))
  _refused(src, tmp_path / "out.npz", r"tiny\.pth: missing features\.denseblock2\.denselayer2\.conv2\.weight "
                                      r"\(the model's trunk needs a tensor of shape \(8, 16, 3, 3\)\)")


def test_unexpected_key_is_named(tiny_file, torch, tmp_path):
  src = tiny_file(edit=lambda sd: sd.update({"features.extra.weight": torch.zeros(3)}))
  _refused(src, tmp_path / "out.npz", r"tiny\.pth: unexpected keys \['features\.extra\.weight'\]")


def test_wrong_shape_names_key_and_both_shapes(tiny_file, torch, tmp_path):
  src = tiny_file(edit=lambda sd: sd.update({"features.transition1.conv.weight": torch.zeros(9, 32, 1, 1)}))
  _refused(src, tmp_path / "out.npz",
           r"tiny\.pth: features\.transition1\.conv\.weight has shape \(9, 32, 1, 1\), expected \(16, 32, 1, 1\)")


def test_truncated_and_foreign_files(tiny_file, torch, tmp_path):
  src = tiny_file()
  src.write_bytes(src.read_bytes()[:2000])
  _refused(src, tmp_path / "out.npz", r"tiny\.pth: not a readable PyTorch file \(truncated or corrupt")
  other = tmp_path / "other.pth"
  torch.save({"conv.weight": torch.zeros(4, 3, 3, 3)}, other)
  _refused(other, tmp_path / "out.npz", r"other\.pth: missing features\.conv0\.weight")
  npz = tmp_path / "cut.npz"
  conv.convert_file(tiny_file("whole.pth"), npz)
  npz.write_bytes(npz.read_bytes()[:3000])
  with pytest.raises(ConversionError, match=r"cut\.npz: not a readable \.npz \(truncated or corrupt"):
    conv.read_weights(npz)


# ---------------------------------------------------------------- config.model.init_from


def classifier_state(kind, trunk_overrides, init_from):
  from configs import bone_quality
  from spine_jax.training.bone_quality import BoneQualityTask
  from spine_jax.engine import mesh as mesh_lib
  from spine_jax.engine import state as state_lib

  config = bone_quality.get_config("smoke")
  config.model.kind = kind
  config.model.update(trunk_overrides)
  config.model.init_from = str(init_from)
  task = BoneQualityTask(config)
  mesh = mesh_lib.make_mesh()
  tx = state_lib.make_optimizer(config.optimizer, config.num_train_steps)
  fresh = state_lib.create_train_state(task.model, tx, task.init_shape, jax.random.key(0), mesh)
  return fresh, task


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_init_from_loads_every_trunk_and_keeps_heads(tiny_file, kind):
  src = tiny_file()
  fresh, task = classifier_state(kind, dict(trunk="tiny", stem="imagenet"), src)
  state = task.initial_state(fresh)
  _, arrays = conv.read_weights(src)
  kernel = arrays["features.conv0.weight"].sum(1, keepdims=True).transpose(2, 3, 1, 0)  # 3 -> 1 channel
  trunks = conv.trunk_names(state.params)
  assert trunks == (["features"] if kind == "hard" else ["features_blastic", "features_lytic", "features_posterolateral"])
  for name in trunks:
    np.testing.assert_allclose(state.params[name]["conv0"]["kernel"], kernel, rtol=1e-6)
    np.testing.assert_array_equal(state.batch_stats[name]["norm5"]["var"], arrays["features.norm5.running_var"])
    assert state.params[name]["conv0"]["kernel"].sharding == fresh.params[name]["conv0"]["kernel"].sharding
  flat_new, flat_old = (traverse_util.flatten_dict(s.params) for s in (state, fresh))
  heads = [p for p in flat_old if not p[0].startswith("features")]
  assert heads and all(np.array_equal(flat_new[p], flat_old[p]) for p in heads)


def test_init_from_a_mismatched_trunk_names_key_and_shapes(tiny_file):
  src = tiny_file()
  fresh, task = classifier_state("hard", dict(trunk="small"), src)  # 'small' has a 3x3 stem
  with pytest.raises(ConversionError, match=r"tiny\.pth: features\.conv0\.weight has shape \(16, 1, 7, 7\) "
                                            r"\(adapted from the file's \(16, 3, 7, 7\)\), expected \(24, 1, 3, 3\)"):
    task.initial_state(fresh)


def test_training_run_starts_from_init_from(tiny_file, tmp_path, capsys):
  from configs import bone_quality
  from spine_jax.training import loop

  config = bone_quality.get_config("smoke")
  config.model.stem = "imagenet"
  config.model.init_from = str(tiny_file())
  config.num_train_steps, config.checkpoint_every = 2, 0
  loop.train_and_evaluate(config, tmp_path / "run")
  out = capsys.readouterr().out
  assert f"trunk initialised from {config.model.init_from}" in out and "step 2/2" in out

"""spine_jax models -> SPINEPS model folders: the way back is bit-identical, PyTorch runs them as we do."""
import json
import os
import pathlib
import pydoc
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from spine_jax.conversion import ConversionError
from spine_jax.conversion import export_spineps
from spine_jax.conversion import spineps
from spine_jax.engine import bundle
from spine_jax.inference import restore
from spine_jax.models import instance_unet
from spine_jax.models import unet
from tests import spineps_oracle
from tests.conversion.spineps_folders import load_unet3d

ROOT = pathlib.Path(__file__).resolve().parents[2]
CUTOUT = (16, 16, 16)


@pytest.fixture(scope="module")
def instance_bundle(tmp_path_factory):
  """An instance model as SPINEPS builds them (dim 8, widths x1, 2, 4, 8), random weights, small cutouts."""
  config = spineps.spineps_instance_config()
  config.model.update(dim=8, dim_mults=(1, 2, 4, 8))
  config.data.cutout.cutout_size = CUTOUT
  model = instance_unet.build_instance_unet(config.model)
  params = model.init(jax.random.key(3), jnp.zeros((1, *CUTOUT, 10)))["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda v: np.asarray(v) + rng.normal(0, 0.05, v.shape).astype(np.float32), params)
  return bundle.write_bundle(tmp_path_factory.mktemp("instance") / "bundle", config, {"params": params})


@pytest.fixture(scope="module")
def exported(semantic_smoke_run, instance_bundle, tmp_path_factory):
  pytest.importorskip("torch", reason="torch is an optional extra (pip install -e '.[torch]')", exc_type=ImportError)
  out = tmp_path_factory.mktemp("export") / "spineps_models"
  summary = export_spineps.export_pair(out, semantic_checkpoint=semantic_smoke_run,
                                       instance_checkpoint=instance_bundle)
  return out, summary


def _flat(tree):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(dict(tree))).items()}


def test_the_way_back_is_bit_identical(exported, semantic_smoke_run, instance_bundle, tmp_path):
  out, _ = exported
  assert sorted(p.name for p in out.iterdir()) == ["instance", "semantic"]
  back = tmp_path / "back"
  spineps.convert_pair(back, semantic_folder=out / "semantic", instance_folder=out / "instance", trust_pickle=True)
  for name, source in (("semantic", semantic_smoke_run), ("instance", instance_bundle)):
    want, want_config, _ = restore.load_for_inference(source, name)
    got, got_config, _ = restore.load_for_inference(back / name, name)
    for collection in ("params", "batch_stats"):
      a, b = _flat(getattr(want, collection)), _flat(getattr(got, collection))
      assert a.keys() == b.keys(), name
      assert all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a), name
    arch = ("n_stages", "features_per_stage", "kernel_sizes", "strides", "norm", "conv_bias", "dim", "dim_mults")
    assert {k: got_config.model.get(k) for k in arch} == {k: want_config.model.get(k) for k in arch}
    assert tuple(got_config.data.preprocess.spacing) == tuple(want_config.data.preprocess.spacing)
  assert tuple(got_config.data.cutout.cutout_size) == CUTOUT


def test_nnunet_runs_the_exported_semantic_model_as_we_do(exported, semantic_smoke_run, unet_arch, torch,
                                                         conformance):
  out, _ = exported
  folder = out / "semantic"
  plans = json.loads((folder / "plans.json").read_text())
  dataset = json.loads((folder / "dataset.json").read_text())
  checkpoint = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=False)
  assert checkpoint["init_args"]["configuration"] == "3d_fullres" and checkpoint["trainer_name"] == "nnUNetTrainer"
  kwargs = dict(plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"])
  for key in ("conv_op", "norm_op", "nonlin"):
    kwargs[key] = pydoc.locate(kwargs[key])
  net = unet_arch.PlainConvUNet(input_channels=1, num_classes=len(dataset["labels"]), deep_supervision=False,
                                **kwargs)
  net.load_state_dict(checkpoint["network_weights"], strict=True)  # every key, aliases included
  net.eval()
  state, config, _ = restore.load_for_inference(semantic_smoke_run, "semantic")
  patch = tuple(config.data.patch.patch_size)
  x = np.random.default_rng(1).normal(size=(1, *patch, 1)).astype(np.float32)
  model = unet.build_unet(config.model)
  ours = model.apply({"params": state.params, "batch_stats": state.batch_stats}, jnp.asarray(x), train=False)
  ours = np.asarray(ours[0] if isinstance(ours, (list, tuple)) else ours)
  with torch.no_grad():  # nnU-Net sees the voxels with the axes reversed
    ref = net(torch.from_numpy(x[..., 0].transpose(0, 3, 2, 1).copy())[:, None]).numpy().transpose(0, 4, 3, 2, 1)
  assert ours.shape == ref.shape
  conformance("export: semantic U-Net (smoke) in PlainConvUNet", ours, ref, tolerance=2e-5)


def test_spineps_unet3d_runs_the_exported_instance_model_as_we_do(exported, instance_bundle, torch, conformance):
  cls = load_unet3d()
  if cls is None:
    pytest.skip("needs spineps (pip install --no-deps spineps==2.1.3)")
  out, _ = exported
  (weights,) = (out / "instance").glob("*weights*.ckpt")
  checkpoint = torch.load(weights, weights_only=False)
  hp = checkpoint["hyper_parameters"]
  assert hp["opt"].channelwise and hp["num_channels"] == 10 and hp["dim"] == 8
  net = cls(dim=hp["dim"], dim_mults=(1, 2, 4, 8), out_dim=4, channels=hp["num_channels"])
  net.load_state_dict({k[len("network."):]: v for k, v in checkpoint["state_dict"].items()}, strict=True)
  net.eval()
  state, config, _ = restore.load_for_inference(instance_bundle, "instance")
  x = np.eye(10, dtype=np.float32)[np.random.default_rng(2).integers(0, 10, size=(1, *CUTOUT))]
  ours = np.asarray(instance_unet.build_instance_unet(config.model).apply({"params": state.params}, jnp.asarray(x)))
  with torch.no_grad():
    ref = net(torch.from_numpy(x).permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1).numpy()
  conformance("export: instance Unet3D dim 8 (1,2,4,8) in SPINEPS' Unet3D", ours, ref, tolerance=2e-5)
  config_json = json.loads((out / "instance" / "inference_config.json").read_text())
  assert config_json["modeltype"] == "unet" and config_json["cutout_size"] == list(CUTOUT)


def test_spineps_loads_the_exported_folders(exported, semantic_smoke_run, instance_bundle):
  """SPINEPS 2.1.3's own loader, in its own environment, offline."""
  reason = spineps_oracle.available()
  if reason:
    pytest.skip(reason)
  out, _ = exported
  loaded = spineps_oracle.call("worker.load_model_folders", {}, semantic=str(out / "semantic"),
                               instance=str(out / "instance"))
  for name, source in (("semantic", semantic_smoke_run), ("instance", instance_bundle)):
    state, _, _ = restore.load_for_inference(source, name)
    ours = sum(np.size(v) for v in jax.tree.leaves(state.params))
    assert int(loaded[f"{name}/num_parameters"]) == ours, name
  assert str(loaded["instance/class"]).endswith("architectures_new.pl_unet.PLNet")


def test_instance_models_spineps_cannot_build_are_refused(instance_smoke_run, tmp_path):
  with pytest.raises(ConversionError, match=r"dim_mults.*SPINEPS' PLNet builds only"):
    export_spineps.export_pair(tmp_path / "out", instance_checkpoint=instance_smoke_run)
  assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_export_command_line(exported, semantic_smoke_run, tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  run = lambda *a: subprocess.run([sys.executable, "-m", "spine_jax.convert", "export_spineps", *a],
                                  capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
  done = run(f"--semantic_checkpoint={semantic_smoke_run}", f"--output={tmp_path / 'models'}")
  assert done.returncode == 0, done.stderr[-2000:]
  assert f"-ms {tmp_path / 'models' / 'semantic'}" in done.stdout
  again = run(f"--semantic_checkpoint={semantic_smoke_run}", f"--output={tmp_path / 'models'}")
  assert again.returncode == 1 and "exists" in again.stderr and "Traceback" not in again.stderr
  wrong = run(f"--semantic_checkpoint={tmp_path / 'nothing'}", f"--output={tmp_path / 'other'}")
  assert wrong.returncode == 1 and "--semantic_checkpoint" in wrong.stderr and "Traceback" not in wrong.stderr
  assert not (tmp_path / "other").exists()
  usage = run(f"--output={tmp_path / 'x'}")
  assert usage.returncode == 1 and "export_spineps needs" in usage.stderr

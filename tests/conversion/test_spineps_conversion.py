"""SPINEPS model folders -> spine_jax checkpoints: the instance Unet3D against SPINEPS' own, the pair, bad input."""
import argparse
import json
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from spine_jax.conversion import ConversionError
from spine_jax.conversion import spineps
from tests.conversion.spineps_folders import CUTOUT, DIM, DIM_MULTS, INSTANCE_CONFIG
from tests.conversion.spineps_folders import load_unet3d, torch_unet3d, write_instance_folder

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def unet3d():
  """SPINEPS 2.x's Unet3D class (tests/conversion/spineps_folders.py)."""
  pytest.importorskip("torch", reason="torch is an optional extra (pip install -e '.[torch]')", exc_type=ImportError)
  cls = load_unet3d()
  if cls is None:
    pytest.skip("needs spineps (pip install --no-deps spineps==2.1.3)")
  return cls


@pytest.fixture(scope="module")
def converted(unet3d, tmp_path_factory):
  root = tmp_path_factory.mktemp("spineps")
  net = torch_unet3d(unet3d)
  folder = write_instance_folder(root, net)
  summary = spineps.convert_instance_folder(folder, root / "ckpt")
  return net, root, summary


def test_converted_instance_matches_spineps_unet3d(converted, conformance):
  import torch

  from spine_jax.inference import restore
  from spine_jax.models import instance_unet
  net, root, summary = converted
  state, config, _ = restore.load_for_inference(root / "ckpt", "instance")
  assert (config.model.dim, tuple(config.model.dim_mults)) == (DIM, DIM_MULTS)
  assert tuple(config.data.cutout.cutout_size) == tuple(config.inference.cutout_size) == CUTOUT
  assert tuple(config.data.preprocess.spacing) == (0.8, 0.75, 1.7)
  assert (config.inference.min_body_voxels, config.inference.min_instance_voxels) == (90, 240)
  # SPINEPS' settings: TPTBox's grid, and the top vertebra numbered 2 (C2) without a labelling model.
  assert config.data.preprocess.grid == "spineps" and config.inference.first_vertebra == 2
  assert summary["num_parameters"] == sum(v.numel() for v in net.state_dict().values())
  assert json.loads((root / "ckpt" / "conversion.json").read_text())["dim"] == DIM
  classes = np.random.default_rng(0).integers(0, 10, size=(2, *CUTOUT))
  x = np.eye(10, dtype=np.float32)[classes]  # one-hot, as phase 2 feeds it
  model = instance_unet.build_instance_unet(config.model)
  ours = np.asarray(model.apply({"params": state.params}, jnp.asarray(x)))
  with torch.no_grad():
    ref = net(torch.from_numpy(x).permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1).numpy()
  assert ours.shape == ref.shape == (2, *CUTOUT, 4)
  # Most of this figure is PyTorch's own float32 round-off (9.4e-6 from its float64 run on the build
  # machine; ours is 7e-7 from it), which another CPU's kernels may round differently: the float64
  # run below is the check of the conversion held to 1e-5; this one gets room for PyTorch's rounding.
  conformance("SPINEPS Unet3D dim 8 (1,2,4), one-hot 2x16x24x8", ours, ref, tolerance=2e-5)
  with torch.no_grad():
    ref64 = net.double()(torch.from_numpy(x).double().permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1).numpy()
  net.float()
  conformance("same, against PyTorch in float64", ours, ref64)


def _refused(folder, pattern, **kwargs):
  out = folder.parent / "out"
  with pytest.raises(ConversionError, match=pattern):
    spineps.convert_instance_folder(folder, out, **kwargs)
  assert not out.exists() and not [p for p in folder.parent.iterdir() if p.name.startswith(".out.")]


def test_missing_key_is_named(unet3d, tmp_path):
  sd = {k: v for k, v in torch_unet3d(unet3d).state_dict().items() if k != "ups.1.0.block2.norm.weight"}
  _refused(write_instance_folder(tmp_path, state_dict=sd),
           r"weights\.ckpt: missing network\.ups\.1\.0\.block2\.norm\.weight \(the network needs a tensor of "
           r"shape \(8,\)\)")


def test_wrong_shape_names_key_and_both_shapes(unet3d, tmp_path):
  import torch
  sd = {**torch_unet3d(unet3d).state_dict(), "downs.1.2.weight": torch.zeros(16, 16, 3, 3, 3)}
  _refused(write_instance_folder(tmp_path, state_dict=sd),
           r"weights\.ckpt: network\.downs\.1\.2\.weight has shape \(16, 16, 3, 3, 3\), expected \(16, 16, 4, 4, 4\)")


def test_unexpected_key_and_foreign_network(unet3d, tmp_path):
  import torch
  sd = {**torch_unet3d(unet3d).state_dict(), "extra.weight": torch.zeros(2)}
  _refused(write_instance_folder(tmp_path, state_dict=sd, name="a"), r"unexpected keys \['network\.extra\.weight'\]")
  net = unet3d(dim=DIM, dim_mults=DIM_MULTS, out_dim=4, channels=11)
  _refused(write_instance_folder(tmp_path, net, name="b"), r"11 input channels and 4 outputs")


def test_no_checkpoint_or_config_in_folder(tmp_path):
  folder = tmp_path / "instance"
  folder.mkdir()
  (folder / "inference_config.json").write_text(json.dumps(INSTANCE_CONFIG))
  _refused(folder, r"no Lightning checkpoint \(\*weights\*\.ckpt or \*\.ckpt\)")
  (folder / "inference_config.json").unlink()
  _refused(folder, r"expected one inference_config\.json in SPINEPS' instance model folder, found 0")


def test_wrong_modeltype_and_fields_are_named(unet3d, tmp_path):
  net = torch_unet3d(unet3d)
  _refused(write_instance_folder(tmp_path, net, config={**INSTANCE_CONFIG, "modeltype": "nnunet"}, name="a"),
           r"modeltype 'nnunet', expected 'unet': this is SPINEPS' semantic model")
  _refused(write_instance_folder(tmp_path, net, config={**INSTANCE_CONFIG, "cutout_size": [16, 24, 6]}, name="b"),
           r"cutout_size \(16, 24, 6\) is not divisible by 4")
  _refused(write_instance_folder(tmp_path, net, config={**INSTANCE_CONFIG, "mapping": {"41": 2}}, name="c"),
           r"mapping sends \{41: 2")
  _refused(write_instance_folder(tmp_path, net, config={**INSTANCE_CONFIG, "model_expected_orientation": "RAS"},
                                 name="d"), r"model_expected_orientation RAS.*only PIR")


def test_pickled_hyper_parameters_need_the_trust_flag(unet3d, tmp_path):
  net = torch_unet3d(unet3d)
  folder = write_instance_folder(tmp_path, net, extra={"hyper_parameters": {"opt": argparse.Namespace(n_epoch=3)}})
  _refused(folder, r"weights\.ckpt: holds argparse\.Namespace.*--trust_pickle")
  summary = spineps.convert_instance_folder(folder, tmp_path / "trusted", trust_pickle=True)
  assert (tmp_path / "trusted" / "bundle.json").is_file() and summary["dim"] == DIM


def test_existing_output_needs_overwrite(converted):
  _, root, _ = converted
  with pytest.raises(ConversionError, match=r"exists; choose another --output or pass --overwrite"):
    spineps.convert_instance_folder(root / "instance", root / "ckpt")


def _spineps_semantic_folder(root):
  """An nnU-Net folder (tests/conversion/test_nnunet_conversion.py's PlainConvUNet) with SPINEPS'
  inference_config.json: a SPINEPS semantic model folder."""
  unet_arch = pytest.importorskip("dynamic_network_architectures.architectures.unet",
                                  reason="needs dynamic-network-architectures (pip install --no-deps)")
  import torch

  from tests.conversion import test_nnunet_conversion as nn_tests
  semantic = nn_tests.write_folder(root, torch, nn_tests.torch_net(torch, unet_arch))
  (semantic / "inference_config.json").write_text(json.dumps({
      "log_name": "T2w_semantic", "modality": "T2w", "acquisition": "sag", "modeltype": "nnunet",
      "model_expected_orientation": ["P", "I", "R"], "available_folds": 1, "inference_augmentation": False,
      "resolution_range": [0.75, 0.75, 1.65], "default_step_size": 0.5,
      "labels": {str(v): k for k, v in nn_tests.LABELS.items() if v}}))
  return semantic


def test_command_converts_the_pair_for_predict_spine(unet3d, tmp_path):
  """The semantic folder (an nnU-Net folder with inference_config.json) and the instance folder,
  converted by the command into OUTPUT/semantic and OUTPUT/instance, load as predict spine loads them."""
  from spine_jax.inference import spine
  semantic = _spineps_semantic_folder(tmp_path / "sem")
  instance = write_instance_folder(tmp_path / "inst", torch_unet3d(unet3d))

  def cli(*args):
    return subprocess.run([sys.executable, "-m", "spine_jax.convert", "spineps", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
  out = tmp_path / "out"
  swapped = cli(f"--semantic_folder={instance.parent}", f"--instance_folder={semantic.parent}", f"--output={out}")
  assert swapped.returncode == 1 and "Traceback" not in swapped.stderr, swapped.stderr
  assert "modeltype 'nnunet', expected 'unet'" in swapped.stderr and not out.exists()
  run = cli(f"--semantic_folder={semantic.parent}", f"--instance_folder={instance.parent}", f"--output={out}")
  assert run.returncode == 0, run.stderr
  assert sorted(p.name for p in out.iterdir()) == ["instance", "semantic"]
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
  sem, inst = spine.load_spine_models(out / "semantic", out / "instance")
  assert sem.config.task == "semantic" and inst.config.task == "instance"
  assert tuple(inst.config.inference.cutout_size) == CUTOUT
  # SPINEPS' defects stay out unless asked for (BUILD_NOTES.md, SPINEPS parity)
  assert sem.config.inference.sliding_window_mode == "spine_jax" and not inst.config.inference.abort_on_empty_couple
  assert sem.config.data.preprocess.n4_backend == "numpy"
  run = cli(f"--semantic_folder={semantic.parent}", f"--instance_folder={instance.parent}", f"--output={out}",
            "--overwrite", "--spineps_defects")
  assert run.returncode == 0, run.stderr
  sem, inst = spine.load_spine_models(out / "semantic", out / "instance")
  assert sem.config.inference.sliding_window_mode == "spineps" and inst.config.inference.abort_on_empty_couple
  assert sem.config.data.preprocess.n4_backend == "sitk"  # SPINEPS' masks: SimpleITK's N4, as ANTsPy's


def test_a_resolution_range_takes_the_semantic_spacing_clamped_into_it(unet3d, tmp_path):
  """SPINEPS rescales phase 1's mask to the instance model's `calc_recommended_resampling_zoom` of the
  semantic model's zoom: with a (min, max) range, each axis clamped into it; alone, the finer bound."""
  from spine_jax.inference import restore
  semantic = _spineps_semantic_folder(tmp_path / "sem")
  ranged = {**INSTANCE_CONFIG, "resolution_range": [[0.5, 1.0, 2.0], [1.0, 2.0, 3.0]]}
  instance = write_instance_folder(tmp_path / "inst", torch_unet3d(unet3d), config=ranged)
  spineps.convert_pair(tmp_path / "pair", semantic_folder=semantic, instance_folder=instance, trust_pickle=True)
  config = restore.load_for_inference(tmp_path / "pair" / "instance", "instance")[1]
  assert tuple(config.data.preprocess.spacing) == (0.75, 1.0, 2.0)  # (0.75, 0.75, 1.65) clamped
  spineps.convert_pair(tmp_path / "alone", instance_folder=instance, trust_pickle=True)
  config = restore.load_for_inference(tmp_path / "alone" / "instance", "instance")[1]
  assert tuple(config.data.preprocess.spacing) == (0.5, 1.0, 2.0)


def test_converted_random_set_runs_predict_spine_with_labeling(unet3d, tmp_path):
  """Three randomly initialised SPINEPS-format folders (semantic nnU-Net, instance Unet3D, labelling PLClassifier),
  converted as one set, run `segment_spine` end to end on a phantom with phase 3; and the converted labelling
  model names the phantom's reference vertebrae (positional ids) with valid levels, a scan spacing clamped into
  the folder's resolution_range."""
  from spine_jax.data.phantoms import mri
  from spine_jax.inference import spine
  from spine_jax.inference.phase3 import naming
  from spine_jax.training import labeling as labeling_task
  from tests.conversion.spineps_folders import torch_plclassifier, write_labeling_folder
  pytest.importorskip("monai", reason="monai builds SPINEPS' DenseNet (pip install monai --no-deps)")
  semantic = _spineps_semantic_folder(tmp_path / "sem")
  instance = write_instance_folder(tmp_path / "inst", torch_unet3d(unet3d))
  labeling = write_labeling_folder(tmp_path / "lab", torch_plclassifier())
  spineps.convert_pair(tmp_path / "set", semantic_folder=semantic, instance_folder=instance,
                       labeling_folder=labeling, trust_pickle=True)
  sem, inst = spine.load_spine_models(tmp_path / "set" / "semantic", tmp_path / "set" / "instance")
  lab = spine.load_labeling_model(tmp_path / "set" / "labeling", sem.mesh)
  spec = naming.spec_of(lab.config)
  cfg = mri.labeling_smoke_config()
  volume = mri.make_spine(np.random.default_rng(1), cfg)  # a lumbar field, 1.5 x 1.5 x 3.3 mm
  assert naming.patch_zoom(spec, volume["affine"]) == (1.5, 1.5, 3.3)  # inside [0.75..3, 0.75..3, 1.65..4]
  result = spine.segment_spine(volume["image"], volume["affine"], sem, inst, labeling_model=lab)
  assert result["labeling"]["method"] == naming.NETWORK_METHOD and "labeling" in result["seconds"]
  instances, truth = labeling_task.positional(volume["instance"])
  named = naming.name_vertebrae(volume["image"], volume["affine"], instances, volume["semantic"], lab.fn, spec)
  assert named.vertebrae and all(v["level"] for v in named.vertebrae.values())
  ids = [named.mapping[k] for k in sorted(named.vertebrae)]
  assert all(b > a or (a, b) in ((28, 20), (19, 28), (18, 20)) for a, b in zip(ids, ids[1:]))  # a level path

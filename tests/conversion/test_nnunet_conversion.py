"""nnU-Net v2 model folders -> semantic checkpoints: outputs against PlainConvUNet, plans, labels, bad input."""
import copy
import fractions
import json
import pathlib
import pydoc
import subprocess
import sys

import jax
import nibabel as nib
import numpy as np
import pytest

from spine_jax.conversion import ConversionError
from spine_jax.conversion import nnunet
from spine_jax.conversion import nnunet_plans
from spine_jax.data import spine_labels
from spine_jax.engine import predict as predict_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]
PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"

# A SPINEPS-like anisotropic plan in nnU-Net's axis order (R, I, P: a PIR NIfTI read by SimpleITK),
# 6 stages as a real 3d_fullres plan, but 4..32 features to stay cheap on a CPU.
ARCH = dict(n_stages=6, features_per_stage=[4, 8, 16, 32, 32, 32],
            kernel_sizes=[[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
            strides=[[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
            n_conv_per_stage=[2] * 6, n_conv_per_stage_decoder=[2] * 5)
PATCH, SPACING = [16, 64, 64], [1.65, 0.75, 0.75]
# dataset.json in an order of its own, so that the head reordering is exercised.
LABELS = {"background": 0, "Vertebra_Disc": 1, "Arcus_Vertebrae": 2, "Spinosus_Process": 3, "Costal_Process_Left": 4,
          "Costal_Process_Right": 5, "Superior_Articular_Left": 6, "Superior_Articular_Right": 7,
          "Inferior_Articular_Left": 8, "Inferior_Articular_Right": 9, "Vertebra_Corpus_border": 10,
          "Spinal_Canal": 11, "Spinal_Cord": 12, "Endplate": 13, "Sacrum": 14}
SPINEPS_ID = {0: 0, 1: 100, 2: 41, 3: 42, 4: 43, 5: 44, 6: 45, 7: 46, 8: 47, 9: 48, 10: 49, 11: 61, 12: 60, 13: 62,
              14: 26}


def arch_kwargs(**overrides):
  kwargs = dict(ARCH, conv_op="torch.nn.modules.conv.Conv3d", conv_bias=True,
                norm_op="torch.nn.modules.instancenorm.InstanceNorm3d", norm_op_kwargs={"eps": 1e-05, "affine": True},
                dropout_op=None, dropout_op_kwargs=None, nonlin="torch.nn.LeakyReLU", nonlin_kwargs={"inplace": True})
  kwargs.update(overrides)
  return kwargs


def plans_new(network_class=PLAIN, **arch):
  """plans.json as nnU-Net >= 2.4 writes it (architecture.arch_kwargs), with a 2d configuration beside."""
  common = dict(batch_size=2, spacing=SPACING, normalization_schemes=["ZScoreNormalization"],
                use_mask_for_norm=[False], resampling_fn_data="resample_data_or_seg_to_shape", batch_dice=False)
  two_d = dict(common, data_identifier="nnUNetPlans_2d", patch_size=[64, 64], spacing=SPACING[1:],
               architecture={"network_class_name": PLAIN, "arch_kwargs": arch_kwargs(
                   conv_op="torch.nn.modules.conv.Conv2d", kernel_sizes=[[3, 3]] * 6, strides=[[1, 1]] + [[2, 2]] * 5),
                   "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]})
  three_d = dict(common, data_identifier="nnUNetPlans_3d_fullres", patch_size=PATCH,
                 architecture={"network_class_name": network_class, "arch_kwargs": arch_kwargs(**arch),
                               "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]})
  return {"dataset_name": "Dataset101_Spine", "plans_name": "nnUNetPlans", "image_reader_writer": "SimpleITKIO",
          "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
          "original_median_spacing_after_transp": SPACING,
          "configurations": {"2d": two_d, "3d_fullres": three_d},
          "foreground_intensity_properties_per_channel": {"0": {"mean": 300.0, "std": 120.0}}}


def plans_old():
  """plans.json of nnU-Net < 2.4: UNet_class_name and the fields get_network_from_plans read then."""
  plans = plans_new()
  three_d = plans["configurations"]["3d_fullres"]
  del three_d["architecture"]
  three_d.update(UNet_class_name="PlainConvUNet", UNet_base_num_features=4, unet_max_num_features=32,
                 conv_kernel_sizes=ARCH["kernel_sizes"], pool_op_kernel_sizes=ARCH["strides"],
                 n_conv_per_stage_encoder=ARCH["n_conv_per_stage"],
                 n_conv_per_stage_decoder=ARCH["n_conv_per_stage_decoder"])
  del plans["configurations"]["2d"]
  return plans


def dataset_json(labels=LABELS):
  return {"channel_names": {"0": "T2"}, "labels": labels, "numTraining": 42, "file_ending": ".nii.gz"}


def torch_net(torch, unet_arch, num_classes=len(LABELS), seed=0):
  """The PlainConvUNet nnU-Net builds from plans_new() (strings resolved as get_network_from_plans does),
  with non-trivial norm affines so that a swapped scale/bias shows."""
  kwargs = arch_kwargs()
  for key in ("conv_op", "norm_op", "nonlin"):
    kwargs[key] = pydoc.locate(kwargs[key])
  torch.manual_seed(seed)
  net = unet_arch.PlainConvUNet(input_channels=1, num_classes=num_classes, deep_supervision=True, **kwargs)
  with torch.no_grad():
    for key, value in net.state_dict().items():
      if ".norm." in key:
        value.copy_(torch.randn_like(value) * 0.5 + (1.0 if key.endswith("weight") else 0.0))
  return net.eval()


def write_folder(root, torch, net, plans=None, dataset=None, weights=None, extra=None, name="3d_fullres"):
  """An nnU-Net v2 results folder: plans.json, dataset.json, fold_0/checkpoint_final.pth."""
  folder = root / f"nnUNetTrainer__nnUNetPlans__{name}"
  (folder / "fold_0").mkdir(parents=True)
  plans = plans_new() if plans is None else plans
  dataset = dataset_json() if dataset is None else dataset
  (folder / "plans.json").write_text(json.dumps(plans))
  (folder / "dataset.json").write_text(json.dumps(dataset))
  optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True)
  checkpoint = {"network_weights": net.state_dict() if weights is None else weights,
                "optimizer_state": optimizer.state_dict(), "grad_scaler_state": None,
                "logging": {"ema_fg_dice": [np.float64(0.81)], "epoch_start_timestamps": [1.7e9]},
                "_best_ema": np.float64(0.81), "current_epoch": 1000,
                "init_args": {"plans": plans, "configuration": name, "fold": 0, "dataset_json": dataset,
                              "device": torch.device("cpu")},
                "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2), **(extra or {})}
  torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
  return folder


def to_ours(x, order):
  """(B, C, *network axes) -> (B, *our axes, C)."""
  return np.transpose(x, (0, *(2 + a for a in order), 1))


def _convert_cli(*args):
  return subprocess.run([sys.executable, "-m", "spine_jax.convert", "nnunet", *args], capture_output=True,
                        text=True, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def converted(torch, unet_arch, tmp_path_factory):
  """A realistic folder converted by the command, then loaded as predict semantic loads it."""
  from spine_jax.inference import restore

  root = tmp_path_factory.mktemp("nnunet")
  net = torch_net(torch, unet_arch)
  folder = write_folder(root, torch, net)
  out = root / "converted"
  run = _convert_cli(f"--input={folder}", f"--output={out}")
  assert run.returncode == 0, run.stderr[-3000:]
  state, config, mesh = restore.load_for_inference(out, "semantic")
  assert config.postprocess.mode == "spine_jax"  # a plain nnU-Net folder: our clean-up
  return net, folder, out, state, config, mesh


def test_converted_outputs_match_plain_conv_unet(converted, torch, conformance):
  net, _, _, state, config, mesh = converted
  order = tuple(config.converted_from.network_axes_of_model_axes)
  assert order == (2, 1, 0)  # our P, I, R are nnU-Net's axes 2, 1, 0
  x = np.random.default_rng(0).normal(size=(2, 1, *PATCH)).astype(np.float32)
  with torch.no_grad():
    ref = net(torch.from_numpy(x))[0].numpy()  # deep supervision: full resolution first
  channel_of = {SPINEPS_ID[c]: c for c in range(len(LABELS))}
  ref = to_ours(ref, order)[..., [channel_of[i] for i in spine_labels.SEMANTIC_IDS]]
  logits = predict_lib.semantic_logits_fn(state, mesh)(to_ours(x, order))  # what predict semantic runs
  conformance("nnU-Net PlainConvUNet 6 stages 4..32, anisotropic (2x1x16x64x64)", logits, ref)


def test_converted_config_is_the_plans_in_model_axes(converted):
  _, folder, out, _, config, _ = converted
  assert tuple(config.data.preprocess.axcodes) == ("P", "I", "R")
  assert tuple(config.data.preprocess.spacing) == (0.75, 0.75, 1.65)
  assert tuple(config.data.patch.patch_size) == (64, 64, 16)
  assert [tuple(k) for k in config.model.kernel_sizes][:2] == [(3, 3, 1), (3, 3, 1)]
  assert [tuple(s) for s in config.model.strides][-1] == (2, 2, 1)
  assert config.model.num_classes == 15 and config.converted_from.configuration == "3d_fullres"
  summary = json.loads((out / "conversion.json").read_text())
  assert summary["structures_not_predicted"] == [] and summary["folder"] == str(folder.absolute())
  assert not [p for p in out.parent.iterdir() if p.name.startswith(".converted.")]  # no temporary left


def test_predict_pipeline_segments_a_nifti_with_the_converted_checkpoint(converted):
  from spine_jax.inference import semantic

  _, _, _, state, config, mesh = converted
  affine = np.array([[0, 0, 1.65, 0], [-0.75, 0, 0, 0], [0, -0.75, 0, 0], [0, 0, 0, 1.0]])  # PIR
  assert nib.aff2axcodes(affine) == ("P", "I", "R")
  image = np.random.default_rng(1).gamma(2.0, 100.0, size=(70, 66, 18)).astype(np.float32)
  result = semantic.segment_array(state, config, mesh, image, affine, name="noise")
  assert result.mask.shape == image.shape and result.mask.dtype == np.uint8
  assert set(np.unique(result.mask)) <= set(spine_labels.SEMANTIC_IDS)


def test_old_plans_format_gives_the_same_parameters(converted, torch, unet_arch, tmp_path):
  from spine_jax.inference import restore

  net, _, _, state, _, _ = converted
  folder = write_folder(tmp_path, torch, net, plans=plans_old())
  nnunet.convert_folder(folder, tmp_path / "old")
  old_state, old_config, _ = restore.load_for_inference(tmp_path / "old", "semantic")
  assert jax.tree.all(jax.tree.map(np.array_equal, old_state.params, state.params))
  assert tuple(old_config.model.features_per_stage) == (4, 8, 16, 32, 32, 32)


def test_spineps_folder_uses_its_inference_config(converted, torch, tmp_path):
  net, _, _, state, _, _ = converted
  # SPINEPS: dataset.json names mean nothing here; inference_config.json maps network values to labels.
  labels = {"background": 0, **{f"class_{i}": i for i in range(1, 15)}}
  names = {1: "Vertebra_Disc", 2: "Arcus_Vertebrae", 3: "Spinosus_Process", 4: "Costal_Process_Left",
           5: "Costal_Process_Right", 6: "Superior_Articular_Left", 7: "Superior_Articular_Right",
           8: "Inferior_Articular_Left", 9: "Inferior_Articular_Right", 10: "Vertebra_Corpus", 11: 61,
           12: "Spinal_Cord", 13: "Endplate", 14: "S1"}
  folder = write_folder(tmp_path, torch, net, dataset=dataset_json(labels))
  (folder / "inference_config.json").write_text(json.dumps({
      "log_name": "T2w_semantic", "modality": "T2w", "acquisition": "sag", "modeltype": "nnunet",
      "model_expected_orientation": ["P", "I", "R"], "available_folds": 1, "inference_augmentation": False,
      "resolution_range": [0.75, 0.75, 1.65], "default_step_size": 0.5 + 0.1, "labels": {str(k): v for k, v in names.items()}}))
  summary = nnunet.convert_folder(folder, tmp_path / "spineps")
  assert {int(k): v for k, v in summary["labels"].items()} == SPINEPS_ID  # Vertebra_Corpus (50) is the body, 49
  from spine_jax.inference import restore
  spineps_state, config, _ = restore.load_for_inference(tmp_path / "spineps", "semantic")
  assert config.inference.step_size == pytest.approx(0.6)
  assert jax.tree.all(jax.tree.map(np.array_equal, spineps_state.params, state.params))
  # SPINEPS' own settings: TPTBox's resampling grid; no mirroring, as its inference_augmentation is false.
  assert config.data.preprocess.grid == "spineps" and tuple(config.inference.mirror_axes) == ()
  assert config.postprocess.mode == "spineps"  # its phase-1 clean-up (phase_semantic.py)


def test_mirroring_follows_the_model_folder():
  order = (2, 1, 0)  # our P, I, R are the network's axes 2, 1, 0
  assert nnunet.mirror_axes((0, 1, 2), order, None) == (0, 1, 2)  # nnU-Net mirrors by default
  assert nnunet.mirror_axes(None, order, None) == ()  # none recorded: nnU-Net's predictor does not mirror
  assert nnunet.mirror_axes((0,), order, None) == (2,)  # network axis 0 is our R
  assert nnunet.mirror_axes((0, 1, 2), order, {"inference_augmentation": False}) == ()
  assert nnunet.mirror_axes((1, 2), order, {"inference_augmentation": True}) == (0, 1)


def test_missing_structures_get_heads_that_never_win():
  mapping = {0: 0, 1: 49, 2: 100}
  params = {"decoder_seg0": {"kernel": np.ones((1, 1, 1, 4, 3)), "bias": np.array([0.0, 1.0, 2.0])}}
  out = nnunet.remap_heads({"params": params}, mapping)["params"]["decoder_seg0"]
  assert out["kernel"].shape == (1, 1, 1, 4, 15)
  index = {v: i for i, v in enumerate(spine_labels.SEMANTIC_IDS)}
  assert out["bias"][index[49]] == 1.0 and out["bias"][index[100]] == 2.0 and out["bias"][index[0]] == 0.0
  assert out["bias"][index[41]] == nnunet.NEVER_LOGIT and not out["kernel"][..., index[41]].any()


def test_label_mapping_names_overrides_and_errors():
  labels = {"background": 0, "vertebra": 1, "IVD": 2}
  assert nnunet_plans.label_mapping(labels, "d.json", overrides={"vertebra": 49}) == {0: 0, 1: 49, 2: 100}
  assert nnunet_plans.label_mapping(labels, "d.json", overrides={"1": 49}) == {0: 0, 1: 49, 2: 100}
  with pytest.raises(ConversionError, match=r"d\.json: labels \['vertebra=1'\] have no SPINEPS semantic id; "
                                            r"give them with --label_map"):
    nnunet_plans.label_mapping(labels, "d.json")
  with pytest.raises(ConversionError, match=r"same SPINEPS id\(s\) \[100\]"):
    nnunet_plans.label_mapping(labels, "d.json", overrides={"vertebra": 100})
  with pytest.raises(ConversionError, match="not NAME=ID"):
    nnunet_plans.parse_label_map("vertebra:49")


def test_spatial_order_follows_reader_and_transpose():
  assert nnunet_plans.spatial_order({"transpose_forward": [0, 1, 2]}, "p") == (2, 1, 0)
  # SimpleITK reverses (voxel axis v is array axis 2 - v), then transpose_forward picks array axes.
  assert nnunet_plans.spatial_order({"transpose_forward": [2, 0, 1]}, "p") == (0, 2, 1)
  assert nnunet_plans.spatial_order({"image_reader_writer": "NibabelIO", "transpose_forward": [2, 0, 1]}, "p") == (1, 2, 0)
  with pytest.raises(ConversionError, match="image_reader_writer 'Tiff3DIO'"):
    nnunet_plans.spatial_order({"image_reader_writer": "Tiff3DIO"}, "p")


# ---------------------------------------------------------------- bad input: clear errors, nothing written


@pytest.fixture(scope="module")
def state_dict(torch, unet_arch):
  return torch_net(torch, unet_arch).state_dict()


def _refused(folder, pattern, **kwargs):
  out = folder.parent / "out"
  with pytest.raises(ConversionError, match=pattern):
    nnunet.convert_folder(folder, out, **kwargs)
  assert not out.exists() and not [p for p in folder.parent.iterdir() if p.name.startswith(".out.")]


def test_unsupported_network_class_is_refused_by_the_command(torch, unet_arch, tmp_path):
  res_enc = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
  folder = write_folder(tmp_path, torch, torch_net(torch, unet_arch), plans=plans_new(network_class=res_enc))
  run = _convert_cli(f"--input={folder}", f"--output={tmp_path / 'out'}")
  assert run.returncode == 1 and "Traceback" not in run.stderr
  assert f"plans.json: configuration '3d_fullres' uses network class '{res_enc}'; only PlainConvUNet" in run.stderr
  assert not (tmp_path / "out").exists()


def test_missing_key_is_named(torch, unet_arch, state_dict, tmp_path):
  weights = {k: v for k, v in state_dict.items() if k != "decoder.seg_layers.2.weight"}
  folder = write_folder(tmp_path, torch, torch_net(torch, unet_arch), weights=weights)
  _refused(folder, r"checkpoint_final\.pth: missing decoder\.seg_layers\.2\.weight \(the plan's network needs a "
                   r"tensor of shape \(15, 16, 1, 1, 1\)\)")


def test_unexpected_key_is_named(torch, unet_arch, state_dict, tmp_path):
  weights = {**state_dict, "decoder.extra.weight": torch.zeros(2)}
  folder = write_folder(tmp_path, torch, torch_net(torch, unet_arch), weights=weights)
  _refused(folder, r"checkpoint_final\.pth: unexpected keys \['decoder\.extra\.weight'\]")


def test_wrong_shape_names_key_and_both_shapes(torch, unet_arch, state_dict, tmp_path):
  weights = {**state_dict, "encoder.stages.1.0.convs.0.conv.weight": torch.zeros(8, 4, 3, 3, 3)}
  folder = write_folder(tmp_path, torch, torch_net(torch, unet_arch), weights=weights)
  _refused(folder, r"checkpoint_final\.pth: encoder\.stages\.1\.0\.convs\.0\.conv\.weight has shape "
                   r"\(8, 4, 3, 3, 3\), expected \(8, 4, 1, 3, 3\)")


def test_plan_that_does_not_match_the_weights(torch, unet_arch, tmp_path):
  plans = plans_new(features_per_stage=[8, 16, 32, 32, 32, 32])
  folder = write_folder(tmp_path, torch, torch_net(torch, unet_arch), plans=plans)
  _refused(folder, r"encoder\.stages\.0\.0\.convs\.0\.conv\.weight has shape \(4, 1, 1, 3, 3\), "
                   r"expected \(8, 1, 1, 3, 3\)")


def test_truncated_checkpoint_and_missing_fold(torch, unet_arch, tmp_path):
  folder = write_folder(tmp_path, torch, torch_net(torch, unet_arch))
  path = folder / "fold_0" / "checkpoint_final.pth"
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  _refused(folder, r"checkpoint_final\.pth: not a readable PyTorch file \(truncated or corrupt")
  _refused(folder, r"fold_3/checkpoint_final\.pth: no such file \(folds with checkpoint_final\.pth here: \['0'\]\)", fold=3)


def test_checkpoint_needing_pickle_is_refused(torch, unet_arch, tmp_path):
  folder = write_folder(tmp_path, torch, torch_net(torch, unet_arch), extra={"note": fractions.Fraction(1, 3)})
  _refused(folder, r"checkpoint_final\.pth: holds fractions\.Fraction.*--trust_pickle")


def test_unsupported_plan_fields(torch, unet_arch, tmp_path):
  net = torch_net(torch, unet_arch)
  regions = copy.deepcopy(dataset_json())
  regions["labels"]["Spinal_Canal"] = [11, 12]
  _refused(write_folder(tmp_path / "a", torch, net, dataset=regions), r"dataset\.json: region-based labels")
  plans = plans_new()
  plans["configurations"]["3d_fullres"]["normalization_schemes"] = ["CTNormalization"]
  _refused(write_folder(tmp_path / "b", torch, net, plans=plans),
           r"plans\.json: configuration '3d_fullres'\.normalization_schemes \['CTNormalization'\]")
  _refused(write_folder(tmp_path / "c", torch, net, plans=plans_new(nonlin_first=True)), r"nonlin_first is true")
  _refused(write_folder(tmp_path / "d", torch, net), r"no configuration '3d_lowres'; the plans have \['2d', "
                                                     r"'3d_fullres'\]", configuration="3d_lowres")


def test_existing_output_needs_overwrite(converted, tmp_path):
  _, folder, _, _, _, _ = converted
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  with pytest.raises(ConversionError, match=r"out: exists; choose another --output or pass --overwrite"):
    nnunet.convert_folder(folder, out)
  assert (out / "keep.txt").read_text() == "mine"


def test_folds_become_an_ensemble_with_the_mean_of_their_logits(converted, torch, unet_arch, conformance, tmp_path):
  """Every fold_k with a checkpoint (nnU-Net's predictor's default) converts into one bundle whose logits
  are the folds' mean, as nnU-Net averages them; `--fold` still picks one, and back to SPINEPS each fold
  is written again."""
  from spine_jax.engine import bundle
  from spine_jax.inference import restore
  nets = [torch_net(torch, unet_arch, seed=seed) for seed in (0, 5)]
  folder = write_folder(tmp_path, torch, nets[0])
  (folder / "fold_1").mkdir()
  checkpoint = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=False)
  torch.save({**checkpoint, "network_weights": nets[1].state_dict()}, folder / "fold_1" / "checkpoint_final.pth")
  run = _convert_cli(f"--input={folder}", f"--output={tmp_path / 'both'}")
  assert run.returncode == 0, run.stderr[-3000:]
  state, config, mesh = restore.load_for_inference(tmp_path / "both", "semantic")
  assert config.model.ensemble_size == 2 and config.converted_from.fold == "0,1"
  order = tuple(config.converted_from.network_axes_of_model_axes)
  x = np.random.default_rng(1).normal(size=(2, 1, *PATCH)).astype(np.float32)
  with torch.no_grad():
    ref = np.mean([net(torch.from_numpy(x))[0].numpy() for net in nets], axis=0)
  channel_of = {SPINEPS_ID[c]: c for c in range(len(LABELS))}
  ref = to_ours(ref, order)[..., [channel_of[i] for i in spine_labels.SEMANTIC_IDS]]
  conformance("nnU-Net PlainConvUNet, mean of 2 folds", predict_lib.semantic_logits_fn(state, mesh)(to_ours(x, order)),
              ref)
  one = _convert_cli(f"--input={folder}", f"--output={tmp_path / 'one'}", "--fold=1")
  assert one.returncode == 0, one.stderr[-3000:]
  assert "ensemble_size" not in bundle.load_bundle(tmp_path / "one")[1].model
  assert _convert_cli(f"--input={folder}", f"--output={tmp_path / 'x'}", "--fold=0,4").returncode == 1

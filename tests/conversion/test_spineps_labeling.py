"""SPINEPS' labelling model (PLClassifier) <-> spine_jax labelling bundles: logits against SPINEPS' own network
(random weights), its loader on the exported folder, the bit-identical way back, and bad input."""
import functools
import json
import os
import pathlib
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
from spine_jax.conversion import spineps_labeling
from spine_jax.inference import restore
from spine_jax.inference.phase3 import naming
from spine_jax.models import labeling
from tests import spineps_oracle
from tests.conversion.spineps_folders import LABELING_CONFIG, LABELING_HEADS, LABELING_PATCH, labeling_opt
from tests.conversion.spineps_folders import torch_plclassifier, write_labeling_folder

ROOT = pathlib.Path(__file__).resolve().parents[2]
X = np.random.default_rng(0).normal(size=(1, 1, *LABELING_PATCH)).astype(np.float32)  # (B, 1, P, I, R)
ZOOM = [0.5, 3.3, 5.0]  # a scan's spacing, one axis below, one inside, one above the range
EXACT_HEADS = (("VERTEXACT", 26), ("REGION", 3))
SINGLE_SPACING = dict(LABELING_CONFIG, resolution_range=[0.8, 0.75, 1.7])
MAX_RELATIVE = 2e-5  # max |ours - reference| / max |reference| per head, float32


@functools.lru_cache(maxsize=None)
def _forward(backbone, heads, hidden):
  model = labeling.LabelingNet(heads=heads, backbone=backbone, head_hidden=hidden)
  return jax.jit(lambda variables, x: model.apply(variables, x, train=False))


def our_logits(bundle_dir, x=X) -> dict[str, np.ndarray]:
  """The converted bundle, restored as inference restores it, on a PyTorch-layout input; heads in the bundle's order."""
  state, config, _ = restore.load_for_inference(bundle_dir, "labeling")
  heads = labeling.normalise_heads(config.model.heads)
  fn = _forward(config.model.backbone, heads, bool(config.model.head_hidden))
  out = fn({"params": state.params, "batch_stats": state.batch_stats}, jnp.asarray(np.moveaxis(x, 1, -1)))
  return {name: np.asarray(out[name]) for name, _ in heads}  # jit returns a dict's keys sorted


def agree(name, ours, reference, conformance) -> float:
  """Same heads in the same order, each within MAX_RELATIVE; returns the largest relative error (printed)."""
  assert list(ours) == list(reference), name
  worst = max(float(np.abs(ours[k] - reference[k]).max() / np.abs(reference[k]).max()) for k in ours)
  print(f"{name}: max relative error {worst:.2e}")
  conformance(name, np.concatenate([ours[k].ravel() for k in ours]),
              np.concatenate([reference[k].ravel() for k in ours]))
  assert worst < MAX_RELATIVE, (name, worst)
  return worst


def _logits(arrays, prefix) -> dict[str, np.ndarray]:
  return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def _flat(tree):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(dict(tree))).items()}


# ------------------------------------------------------------------------ PLClassifier rebuilt from MONAI


@pytest.fixture(scope="module")
def monai_folder(torch, monai_nets, tmp_path_factory):
  net = torch_plclassifier()
  folder = write_labeling_folder(tmp_path_factory.mktemp("monai"), net)
  with torch.no_grad():
    reference = {k: v.numpy() for k, v in net(torch.from_numpy(X)).items()}
  return folder, net.state_dict(), reference


def test_monai_plclassifier_converts_to_the_same_logits(monai_folder, tmp_path, conformance):
  folder, _, reference = monai_folder
  summary = spineps.convert_pair(tmp_path / "models", labeling_folder=folder, spineps_defects=True)
  assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["labeling"]
  agree("labelling: PLClassifier (MONAI DenseNet-121, 6 heads) 1x48x64x32", our_logits(tmp_path / "models" / "labeling"),
        reference, conformance)
  _, config, _ = restore.load_for_inference(tmp_path / "models" / "labeling", "labeling")
  assert config.task == "labeling" and tuple(config.data.patch_size) == LABELING_PATCH
  assert [tuple(h) for h in config.model.heads] == list(LABELING_HEADS) and config.model.head_hidden
  assert (config.model.backbone, config.model.dropout) == ("densenet121", 0.0)  # opt.dropout 0.05 never reaches it
  # resolution_range (min, max): the lower bound as the zoom, both as the range the scan's spacing is clamped into.
  assert tuple(config.data.zoom) == (0.75, 0.75, 1.65)
  assert [tuple(b) for b in config.data.zoom_range] == [(0.75, 0.75, 1.65), (3.0, 3.0, 4.0)]
  assert (config.data.crop_margin_mm, config.data.corpus_masked) == (128, True)
  assert config.data.rotate is False  # ds_name sagittal_v3corpus_npz
  assert config.inference.spineps_defects is True
  assert {k: v for k, v in config.inference.items() if k != "spineps_defects"} == {
      k: v for k, v in naming.default_inference_config().items() if k != "spineps_defects"}
  spec = naming.spec_of(config)  # what predict spine --labeling_checkpoint reads
  assert (spec.patch_size, spec.zoom, spec.rotate, spec.corpus_masked) == (LABELING_PATCH, (0.75, 0.75, 1.65),
                                                                           False, True)
  assert summary["labeling"]["unused_opt_dropout"] == 0.05
  assert json.loads((tmp_path / "models" / "labeling" / "conversion.json").read_text())["backbone"] == "densenet121"


# ------------------------------------------------------------------------ SPINEPS' own PLClassifier


@pytest.fixture(scope="module")
def spineps_folders(tmp_path_factory):
  """Two PLClassifiers built and saved by SPINEPS and Lightning themselves (tests/spineps_worker.py)."""
  reason = spineps_oracle.available()
  if reason:
    pytest.skip(reason)
  root = tmp_path_factory.mktemp("spineps_labeling")
  specs = {str(root / "veridah"): dict(heads=LABELING_HEADS, final_size=LABELING_PATCH, ds_name="sagittal_v4corpus_npz",
                                       inference_config=LABELING_CONFIG),
           # DenseNet-169 without the hidden layer, 26 exact classes; no final_size, no ds_name.
           str(root / "exact169"): dict(heads=EXACT_HEADS, backbone="DENSENET169", classification_linear=False,
                                        inference_config=SINGLE_SPACING, seed=1)}
  out = spineps_oracle.call("worker.labeling_folders", {"x": X}, specs=specs)
  print(f"SPINEPS' DenseNet-121 PLClassifier forward on 1x1x{'x'.join(map(str, LABELING_PATCH))}, CPU: "
        f"{float(out['0/seconds']):.1f} s; DenseNet-169: {float(out['1/seconds']):.1f} s")
  return root, {i: _logits(out, f"{i}/logits/") for i in (0, 1)}


@pytest.fixture(scope="module")
def converted(spineps_folders, tmp_path_factory):
  root, _ = spineps_folders
  out = tmp_path_factory.mktemp("converted")
  spineps_labeling.convert_labeling_folder(root / "veridah", out / "veridah")
  spineps_labeling.convert_labeling_folder(root / "exact169", out / "exact169")
  return out


def test_spineps_plclassifier_gives_the_same_logits(spineps_folders, converted, conformance):
  _, reference = spineps_folders
  agree("labelling: SPINEPS PLClassifier DenseNet-121, 6 heads", our_logits(converted / "veridah"), reference[0],
        conformance)
  _, config, _ = restore.load_for_inference(converted / "veridah", "labeling")
  assert tuple(config.data.patch_size) == LABELING_PATCH and config.data.rotate is True  # v4corpus
  assert config.converted_from.log_name == "T2w_labeling"


def test_densenet169_without_hidden_layers_and_defaults(spineps_folders, converted, conformance):
  _, reference = spineps_folders
  agree("labelling: SPINEPS PLClassifier DenseNet-169, VERTEXACT 26 + REGION, no hidden layer",
        our_logits(converted / "exact169"), reference[1], conformance)
  _, config, _ = restore.load_for_inference(converted / "exact169", "labeling")
  assert (config.model.backbone, config.model.head_hidden) == ("densenet169", False)
  assert [tuple(h) for h in config.model.heads] == list(EXACT_HEADS)
  assert tuple(config.data.patch_size) == (152, 168, 32)  # no opt.final_size: SPINEPS' default
  assert config.data.rotate is False  # no ds_name
  assert tuple(config.data.zoom) == (0.8, 0.75, 1.7) and "zoom_range" not in config.data  # one spacing


# ------------------------------------------------------------------------ the way back


@pytest.fixture(scope="module")
def exported(converted, tmp_path_factory):
  out = tmp_path_factory.mktemp("export") / "models"
  export_spineps.export_pair(out, labeling_checkpoint=converted / "veridah")
  return out


def test_the_way_back_is_bit_identical(converted, exported, tmp_path):
  assert sorted(p.name for p in exported.iterdir()) == ["labeling"]
  spineps.convert_pair(tmp_path / "back", labeling_folder=exported / "labeling")
  want, want_config, _ = restore.load_for_inference(converted / "veridah", "labeling")
  got, got_config, _ = restore.load_for_inference(tmp_path / "back" / "labeling", "labeling")
  for collection in ("params", "batch_stats"):
    a, b = _flat(getattr(want, collection)), _flat(getattr(got, collection))
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
  for part in ("model", "data", "inference"):
    assert json.loads(got_config[part].to_json()) == json.loads(want_config[part].to_json()), part


def test_spineps_loads_the_exported_folder_and_a_monai_made_one(spineps_folders, converted, exported, monai_folder,
                                                                conformance):
  """SPINEPS 2.1.3's own VertLabelingClassifier.load on our export (and on the test maker's folder)."""
  folder, _, monai_reference = monai_folder
  loaded = spineps_oracle.call("worker.labeling_logits", {"x": X}, folders=[str(exported / "labeling"), str(folder)],
                               zoom=ZOOM)
  _, reference = spineps_folders
  agree("labelling: our export in SPINEPS' VertLabelingClassifier", _logits(loaded, "0/logits/"),
        our_logits(converted / "veridah"), conformance)
  assert all(np.array_equal(v, reference[0][k]) for k, v in _logits(loaded, "0/logits/").items())  # bit for bit
  agree("labelling: test maker's folder in SPINEPS' VertLabelingClassifier", _logits(loaded, "1/logits/"),
        monai_reference, conformance)
  _, config, _ = restore.load_for_inference(converted / "veridah", "labeling")
  assert str(loaded["0/class"]) == "spineps.architectures.pl_densenet.PLClassifier"
  assert list(loaded["0/heads"]) == [name for name, _ in LABELING_HEADS]
  assert tuple(loaded["0/final_size"]) == tuple(loaded["0/cutout_size"]) == tuple(config.data.patch_size)
  assert bool(loaded["0/patch_rotation"]) is config.data.rotate is True
  assert tuple(loaded["0/orientation"]) == ("P", "I", "R")
  # The bundle's zoom range gives SPINEPS' rescaling spacing: each axis clamped into [min, max].
  np.testing.assert_array_equal(loaded["0/recommended_zoom"], np.clip(ZOOM, *config.data.zoom_range))
  assert bool(loaded["1/patch_rotation"]) is False and tuple(loaded["1/final_size"]) == LABELING_PATCH


# ------------------------------------------------------------------------ command line


def test_command_line_both_ways(monai_folder, tmp_path):
  folder, _, _ = monai_folder
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  run = lambda *a: subprocess.run([sys.executable, "-m", "spine_jax.convert", *map(str, a)], capture_output=True,
                                  text=True, cwd=ROOT, env=env, timeout=600)
  done = run("spineps", f"--labeling_folder={folder}", f"--output={tmp_path / 'models'}")
  assert done.returncode == 0, done.stderr[-2000:]
  assert "labelling bundle written" in done.stdout and (tmp_path / "models" / "labeling" / "bundle.json").is_file()
  back = run("export_spineps", f"--labeling_checkpoint={tmp_path / 'models' / 'labeling'}",
             f"--output={tmp_path / 'spineps'}")
  assert back.returncode == 0, back.stderr[-2000:]
  assert f"-ml {tmp_path / 'spineps' / 'labeling'}" in back.stdout
  (checkpoint,) = (tmp_path / "spineps" / "labeling").glob("*val_f1=*valf1-weights.ckpt")
  assert json.loads((tmp_path / "spineps" / "labeling" / "inference_config.json").read_text())["modeltype"] == \
      "classifier"
  assert checkpoint.stat().st_size > 40e6  # DenseNet-121 and six heads in float32


# ------------------------------------------------------------------------ bad input


def _refused(folder, pattern):
  out = folder.parent / "out"
  with pytest.raises(ConversionError, match=pattern):
    spineps_labeling.convert_labeling_folder(folder, out)
  assert not out.exists() and not [p for p in folder.parent.iterdir() if p.name.startswith(".out.")]


def _head_keys(prefix):
  return lambda sd: {k: v for k, v in sd.items() if not k.startswith(prefix)}


def test_folder_without_the_checkpoint(tmp_path):
  folder = tmp_path / "labeling"
  folder.mkdir()
  (folder / "inference_config.json").write_text(json.dumps(LABELING_CONFIG))
  (folder / "epoch=3-weights.ckpt").write_bytes(b"")  # not the name SPINEPS looks for
  _refused(folder, r"no \*\*/\*val_f1=\*valf1-weights.ckpt")


def test_other_model_folders_are_named(tmp_path):
  folder = tmp_path / "labeling"
  folder.mkdir()
  (folder / "inference_config.json").write_text(json.dumps(dict(LABELING_CONFIG, modeltype="unet")))
  _refused(folder, r"modeltype 'unet', expected 'classifier'.*--instance_folder")


@pytest.mark.parametrize("case, change, pattern", [
    ("resnet", lambda sd: {"net.conv1.weight": sd["net.features.conv0.weight"], **_head_keys("net.")(sd)},
     r"unexpected keys \['net.conv1.weight'\].*ResNet"),
    ("conv head", lambda sd: {**sd, "classification_heads.VERT.0.weight": np.zeros((512, 1024, 3, 3, 3), np.float32)},
     r"classification_heads.VERT holds a non-Linear layer"),
    ("head layers", lambda sd: {**_head_keys("classification_heads.REGION.2")(sd),
                                "classification_heads.REGION.1.weight": np.zeros((3, 512), np.float32),
                                "classification_heads.REGION.1.bias": np.zeros(3, np.float32)},
     r"classification_heads.REGION has layers \[0, 1\]"),
    ("head width", lambda sd: {**sd, "classification_heads.VERT.0.weight": np.zeros((500, 1024), np.float32)},
     r"classification_heads.VERT.0.weight has shape \(500, 1024\), expected \(512, 1024\)"),
    ("bad name", lambda sd: {k.replace("heads.VERT.", "heads.VERT-1."): v for k, v in sd.items()},
     r"name 'VERT-1' is not letters"),
    ("no heads", _head_keys("classification_heads."), r"no classification_heads"),
    ("unknown head", lambda sd: {k.replace("heads.REGION.", "heads.VERTREGION."): v for k, v in sd.items()},
     r"unknown labelling head 'VERTREGION'"),
    ("missing trunk tensor", _head_keys("net.features.denseblock4.denselayer16.layers.norm2.weight"),
     r"missing features.denseblock4.denselayer16.norm2.weight"),
])
def test_head_and_backbone_layouts_it_cannot_map(monai_folder, tmp_path, case, change, pattern):
  import torch
  _, state_dict, _ = monai_folder
  arrays = {k: (v.numpy() if hasattr(v, "numpy") else v) for k, v in state_dict.items()}
  changed = {k: torch.from_numpy(np.asarray(v)) for k, v in change(arrays).items()}
  groups = {name: n for name, n in LABELING_HEADS}
  renamed = {"bad name": ("VERT", "VERT-1"), "unknown head": ("REGION", "VERTREGION")}.get(case)
  if renamed:
    groups = {renamed[1] if k == renamed[0] else k: n for k, n in groups.items()}
  _refused(write_labeling_folder(tmp_path, state_dict=changed, groups=groups), pattern)


@pytest.mark.parametrize("opt, groups, config, pattern", [
    (dict(backbone="RESNET18"), None, None, r"opt.backbone is 'RESNET18' but the weights are a densenet121"),
    (dict(classification_conv=True), None, None, r"opt.classification_conv is set"),
    (dict(classification_linear=False), None, None, r"opt.classification_linear is False but the heads have hidden"),
    (dict(final_size=(152, 168, 16)), None, None, r"opt.final_size \(152, 168, 16\) is below the 32 voxels"),
    (dict(final_size=(152, 168)), None, None, r"opt.final_size \(152, 168\) is not 3 positive numbers"),
    (dict(final_size=(152, 167, 32)), None, None, r"opt.final_size: expected three positive even voxel counts"),
    ({}, {"VERT": 24, "REGION": 3}, None, r"group_2_n_channel .* differs from the heads"),
    ({}, None, {k: v for k, v in LABELING_CONFIG.items() if k != "resolution_range"},
     r"needs model_expected_orientation and resolution_range"),
    ({}, None, dict(LABELING_CONFIG, resolution_range=[[1, 1, 1], [0.5, 2, 2]]), r"a minimum above its maximum"),
    ({}, None, dict(LABELING_CONFIG, model_expected_orientation=["I", "P", "L"]), r"IPL: .* only PIR converts"),
])
def test_hyper_parameters_and_config_that_disagree(monai_folder, tmp_path, opt, groups, config, pattern):
  _, state_dict, _ = monai_folder
  folder = write_labeling_folder(tmp_path, state_dict=state_dict, opt=labeling_opt(**opt), groups=groups, config=config)
  _refused(folder, pattern)


def test_other_densenets_are_refused(torch, monai_nets, tmp_path):
  small = monai_nets.DenseNet(spatial_dims=3, in_channels=1, out_channels=1, init_features=16, growth_rate=8,
                              block_config=(2, 2))
  state_dict = {f"net.{k}": v for k, v in small.state_dict().items() if not k.startswith("class_layers")}
  state_dict.update({"classification_heads.VERT.0.weight": torch.zeros(24, 32),
                     "classification_heads.VERT.0.bias": torch.zeros(24)})
  folder = write_labeling_folder(tmp_path, state_dict=state_dict, groups={"VERT": 24},
                                 opt=labeling_opt(heads=(("VERT", 24),), backbone=None, classification_linear=False))
  _refused(folder, r"the trunk is a DenseNet \(3D, 1 input channel\(s\), growth 8, blocks \(2, 2\).*DenseNet-121 or -169")


@pytest.mark.parametrize("change, pattern", [
    (dict(backbone="labeling_small"), r"backbone 'labeling_small': SPINEPS' PLClassifier builds only densenet121"),
    (dict(backbone="densenet121", dropout=0.1), r"dropout 0.1: SPINEPS' network has no dropout"),
    (dict(backbone="densenet121", corpus_masked=False), r"data.corpus_masked False .* always masks to the corpus"),
])
def test_models_spineps_cannot_run_are_not_exported(tmp_path, change, pattern):
  from configs import labeling as labeling_config
  from spine_jax.engine import bundle
  config = labeling_config.get_config("smoke")
  config.model.update({k: v for k, v in change.items() if k in config.model})
  config.data.update({k: v for k, v in change.items() if k in config.data})
  config.data.patch_size = (32, 32, 32)  # DenseNet-121 downsamples by 32: the smallest patch it takes
  model = labeling.build_labeling_model(config.model)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *config.data.patch_size, 1)),
                                             train=False))
  variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  saved = bundle.write_bundle(tmp_path / "model", config, variables)
  with pytest.raises(ConversionError, match=pattern):
    export_spineps.export_pair(tmp_path / "out", labeling_checkpoint=saved)
  assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))

"""Tiny SPINEPS instance model folders (inference_config.json and a Lightning-style weights .ckpt of
SPINEPS' own Unet3D with random weights), for the conversion tests and the installed-package check."""
import importlib.util
import json
import pathlib

from tests import spineps_worker

# Small: widths 8, 8, 16, 32 (Unet3D's 8 GroupNorm groups need multiples of 8), 3 levels.
DIM, DIM_MULTS, CUTOUT = 8, (1, 2, 4), (16, 24, 8)
INSTANCE_CONFIG = {
    "log_name": "T2w_instance", "modality": "SEG", "acquisition": "sag", "modeltype": "unet",
    "model_expected_orientation": ["P", "I", "R"], "available_folds": 1, "inference_augmentation": False,
    "resolution_range": [0.8, 0.75, 1.7], "default_step_size": 0.5, "labels": {"1": 1, "2": 2, "3": 3},
    "cutout_size": list(CUTOUT), "corpus_size_cleaning": 90, "vert_size_threshold": 240}


def load_unet3d():
  """SPINEPS 2.x's Unet3D class, loaded from the installed package's file alone (`import spineps`
  would import its whole pipeline), or None when spineps is not installed."""
  spec = importlib.util.find_spec("spineps")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = pathlib.Path(spec.submodule_search_locations[0]) / "architectures_new" / "unet3D.py"
  module_spec = importlib.util.spec_from_file_location("spineps_architectures_new_unet3D_conv", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.Unet3D


def torch_unet3d(unet3d, seed=0):
  """Random weights with non-trivial norm affines and biases, so a swapped or dropped one shows."""
  import torch
  torch.manual_seed(seed)
  net = unet3d(dim=DIM, dim_mults=DIM_MULTS, out_dim=4, channels=10).eval()
  with torch.no_grad():
    for k, v in net.state_dict().items():
      if ".norm." in k:
        v.copy_(torch.randn_like(v) * 0.5 + (1.0 if k.endswith("weight") else 0.0))
      elif k.endswith("bias"):
        v.copy_(torch.randn_like(v) * 0.1)
  return net


def write_instance_folder(root, net=None, *, state_dict=None, config=None, extra=None, name="instance"):
  """A SPINEPS instance model folder: inference_config.json and a Lightning-style weights .ckpt."""
  import torch
  folder = pathlib.Path(root) / name
  folder.mkdir(parents=True)
  (folder / "inference_config.json").write_text(json.dumps(INSTANCE_CONFIG if config is None else config))
  sd = net.state_dict() if state_dict is None else state_dict
  checkpoint = {"state_dict": {f"network.{k}": v for k, v in sd.items()}, "epoch": 12, "global_step": 3400,
                "pytorch-lightning_version": "2.4.0", **(extra or {})}
  torch.save(checkpoint, folder / "epoch=12-weights.ckpt")
  return folder


# SPINEPS' labelling model (VERIDAH): PLClassifier's output groups as read_labels.py sizes them (VertExact 24,
# VertRegion 3, VertGroup 12, VertRel 6, VertT13 2, the binary FULLYVISIBLE 2), in the order its ModuleDict keeps.
LABELING_HEADS = (("VERT", 24), ("REGION", 3), ("VERTGRP", 12), ("VERTREL", 6), ("VERTT13", 2), ("FULLYVISIBLE", 2))
# The smallest patch a DenseNet-121 pools to one voxel is 32 per axis; P and I differ so that a swapped axis shows.
LABELING_PATCH = (48, 64, 32)
LABELING_CONFIG = {
    "log_name": "T2w_labeling", "modality": "T2w", "acquisition": "sag", "modeltype": "classifier",
    "model_expected_orientation": ["P", "I", "R"], "available_folds": 1, "inference_augmentation": False,
    "resolution_range": [[0.75, 0.75, 1.65], [3.0, 3.0, 4.0]], "default_step_size": 0.5, "labels": {}}
LABELING_CHECKPOINT = "epoch=3-val_f1=0.9000valf1-weights.ckpt"


def torch_plclassifier(heads=LABELING_HEADS, backbone="DenseNet121", hidden=True, seed=0):
  """SPINEPS' PLClassifier network (pl_densenet.py) rebuilt from MONAI alone, without Lightning or SPINEPS: `net` is
  MONAI's 3D DenseNet with class_layers' Linear dropped, `classification_heads` a ModuleDict of
  [Linear(F, F // 2), ReLU,] Linear(., classes) per group; its state dict has PLClassifier's keys. Random weights
  with BatchNorm statistics, affines and biases randomised, so that a swapped or dropped tensor shows; eval mode."""
  import torch
  from monai.networks import nets

  torch.manual_seed(seed)

  class PLClassifierNetwork(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.net = getattr(nets, backbone)(spatial_dims=3, in_channels=1, out_channels=1)
      f = self.net.class_layers[-1].in_features
      self.net.class_layers = self.net.class_layers[:-1]
      layers = lambda n: ([torch.nn.Linear(f, f // 2), torch.nn.ReLU(), torch.nn.Linear(f // 2, n)] if hidden
                          else [torch.nn.Linear(f, n)])
      self.classification_heads = torch.nn.ModuleDict({name: torch.nn.Sequential(*layers(n)) for name, n in heads})

    def forward(self, x):
      features = self.net(x)
      return {name: head(features) for name, head in self.classification_heads.items()}

  return spineps_worker.randomise_weights(PLClassifierNetwork(), seed)


def labeling_opt(heads=LABELING_HEADS, **overrides):
  """PLClassifier's `opt` with ARGS_MODEL's fields, as an argparse.Namespace (SPINEPS reads it by attribute)."""
  import argparse
  fields = dict(backbone="DENSENET121", classification_conv=False, classification_linear=True, n_epoch=100, lr=1e-4,
                l2_regularization_w=1e-6, scheduler_endfactor=1e-3, in_channel=1, not_pretrained=True,
                mse_weighting=0.0, dropout=0.05, weight_decay=0, num_classes=sum(n for _, n in heads),
                n_channel_p_group=[n for _, n in heads], final_size=LABELING_PATCH, ds_name="sagittal_v3corpus_npz")
  fields.update(overrides)
  return argparse.Namespace(**{k: v for k, v in fields.items() if v is not None})


def write_labeling_folder(root, net=None, *, state_dict=None, opt=None, groups=None, config=None, name="labeling",
                          checkpoint=LABELING_CHECKPOINT):
  """A SPINEPS labelling model folder as VertLabelingClassifier.load finds it: inference_config.json and a
  Lightning-style checkpoint (state_dict, hyper_parameters with `opt` and `group_2_n_channel`) named
  `*val_f1=*valf1-weights.ckpt`. SPINEPS' own loader restores it (PLClassifier.load_from_checkpoint)."""
  import torch
  folder = pathlib.Path(root) / name
  folder.mkdir(parents=True)
  (folder / "inference_config.json").write_text(json.dumps(LABELING_CONFIG if config is None else config))
  sd = net.state_dict() if state_dict is None else state_dict
  if groups is None:
    groups = {k.split(".")[1]: int(v.shape[0]) for k, v in sd.items()
              if k.startswith("classification_heads.") and k.endswith(".weight")}  # the last layer of each wins
  torch.save({"state_dict": dict(sd), "epoch": 3, "global_step": 900, "pytorch-lightning_version": "2.6.6",
              "hyper_parameters": {"opt": labeling_opt() if opt is None else opt, "group_2_n_channel": groups}},
             folder / checkpoint)
  return folder

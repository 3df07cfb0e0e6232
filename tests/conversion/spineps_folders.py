"""Tiny SPINEPS instance model folders (inference_config.json and a Lightning-style weights .ckpt of
SPINEPS' own Unet3D with random weights), for the conversion tests and the installed-package check."""
import importlib.util
import json
import pathlib

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

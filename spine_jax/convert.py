"""Entry point for converting public PyTorch weights.

  python -m spine_jax.convert densenet --input=densenet121.pth --output=densenet121.npz
  python -m spine_jax.convert nnunet --input=MODEL_FOLDER --output=runs/converted [--fold=0]
  python -m spine_jax.convert spineps --semantic_folder=SEM --instance_folder=INST [--labeling_folder=LAB] \
      --output=runs/spineps
  python -m spine_jax.convert checkpoint --input=RUN_DIR[/checkpoints/STEP] --output=runs/bundle
  python -m spine_jax.convert export_spineps --semantic_checkpoint=RUN --instance_checkpoint=RUN \
      [--labeling_checkpoint=RUN] --output=DIR

`densenet` checks a torchvision or MONAI DenseNet-121/169/201 state dict against the architecture it
describes and writes its trunk as a torch-free .npz; train from it with
`--config.model.init_from=densenet121.npz` (a .pth works there too, when torch is installed).

`nnunet` converts an nnU-Net v2 model folder (plans.json, dataset.json, fold_k/checkpoint_final.pth;
a SPINEPS semantic model folder with its inference_config.json too) into a model bundle folder that
`python -m spine_jax.predict semantic --checkpoint=OUTPUT` loads like a trained one.

`spineps` converts SPINEPS' model set: the semantic folder (an nnU-Net folder with its
inference_config.json) as `nnunet` does, and the instance folder (inference_config.json and a
Lightning `*weights*.ckpt` of its Unet3D) into OUTPUT/semantic and OUTPUT/instance, for
`python -m spine_jax.predict spine --semantic_checkpoint=OUTPUT/semantic --instance_checkpoint=OUTPUT/instance`,
and the labelling folder (inference_config.json with `modeltype: classifier` and a Lightning
`*val_f1=*valf1-weights.ckpt` of its PLClassifier, a DenseNet-121/169 with one head per output group)
into OUTPUT/labeling, a bundle of task `labeling` (conversion/spineps_labeling.py lists its fields).
Any of the folders alone converts too. Lightning checkpoints often pickle their hyper-parameters: the
instance one needs --trust_pickle for them; the labelling one is read without running them.

`checkpoint` writes the model bundle of a training checkpoint (a work directory's latest step, or the
step folder given): its variables and inference config, without the optimiser, as training writes at
the end of a run.

`export_spineps` goes the other way: a semantic, an instance and/or a labelling model (bundle, work
directory or checkpoint) become SPINEPS model folders, OUTPUT/semantic (nnU-Net v2), OUTPUT/instance
(Lightning Unet3D) and OUTPUT/labeling (Lightning PLClassifier; DenseNet-121/169 backbones only), each with
its inference_config.json, for `spineps sample -ms OUTPUT/semantic -mi OUTPUT/instance -ml OUTPUT/labeling`.

Files are read with torch.load(weights_only=True): a file that holds more than tensors and plain data
is refused unless --trust_pickle is given. Nothing is written unless the conversion succeeds.
"""
from __future__ import annotations

import json
import sys

from absl import app
from absl import flags
from absl import logging

from spine_jax import cli

_INPUT = flags.DEFINE_string("input", None, "densenet: a .pth/.pt state dict; nnunet: the model folder; "
                             "checkpoint: a training work directory or one step folder.")
_OUTPUT = flags.DEFINE_string("output", None, "densenet: the .npz to write; nnunet, checkpoint: the model bundle folder; "
                              "spineps: the folder to hold semantic/, instance/ and labeling/.")
_TRUST = flags.DEFINE_bool("trust_pickle", False, "Load files that need full pickle (can run code from the file).")
_FOLD = flags.DEFINE_string("fold", None, "nnunet, spineps: which fold_k to convert: 0, a list 0,1,2 (an ensemble: "
                            "their logits averaged) or all (fold_all). Default: SPINEPS' available_folds, else "
                            "every fold_k with a checkpoint, as nnU-Net's predictor.")
_CONFIGURATION = flags.DEFINE_string("configuration", None, "nnunet: plans configuration (default: the "
                                     "checkpoint's, else the folder name's, e.g. 3d_fullres).")
_CHECKPOINT_NAME = flags.DEFINE_string("checkpoint_name", "checkpoint_final.pth", "nnunet: file in fold_k.")
_AXCODES = flags.DEFINE_string("axcodes", None, "nnunet: orientation the network's training images had, e.g. "
                               "PIR (default: inference_config.json's, else PIR).")
_LABEL_MAP = flags.DEFINE_string("label_map", "", "nnunet: NAME=ID,... dataset.json label names (or values) to "
                                 "SPINEPS ids, for names that are not recognised.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "nnunet, spineps, checkpoint, export_spineps: replace an existing output folder.")
_SPINEPS_DEFECTS = flags.DEFINE_bool(
    "spineps_defects", False, "spineps: keep what SPINEPS does wrong, to get its masks exactly: float16 "
    "sliding-window weights, the whole instance phase lost on one empty couple (BUILD_NOTES.md, SPINEPS parity).")
_SEMANTIC_FOLDER = flags.DEFINE_string("semantic_folder", None, "spineps: SPINEPS' semantic model folder.")
_INSTANCE_FOLDER = flags.DEFINE_string("instance_folder", None, "spineps: SPINEPS' instance model folder.")
_LABELING_FOLDER = flags.DEFINE_string("labeling_folder", None, "spineps: SPINEPS' labelling model folder "
                                       "(-> OUTPUT/labeling).")
_SEMANTIC_CHECKPOINT = flags.DEFINE_string("semantic_checkpoint", None,
                                           "export_spineps: the semantic model (bundle, run or checkpoint).")
_INSTANCE_CHECKPOINT = flags.DEFINE_string("instance_checkpoint", None,
                                           "export_spineps: the instance model (bundle, run or checkpoint).")
_LABELING_CHECKPOINT = flags.DEFINE_string("labeling_checkpoint", None,
                                           "export_spineps: the labelling model (bundle, run or checkpoint).")

COMMANDS = ("densenet", "nnunet", "spineps", "checkpoint", "export_spineps")


def run_densenet() -> int:
  from spine_jax.conversion import densenet

  summary = densenet.convert_file(_INPUT.value, _OUTPUT.value, trust_pickle=_TRUST.value)
  print(f"{summary['source']}: {summary['flavour']} {summary['description']}, "
        f"{summary['num_parameters']:,} trunk parameters -> {summary['output']}")
  if summary["dropped_head"]:
    print(f"  classifier not kept (heads start fresh): {summary['dropped_head']}")
  return 0


def run_nnunet() -> int:
  from spine_jax.conversion import nnunet
  from spine_jax.conversion import nnunet_plans

  summary = nnunet.convert_folder(
      _INPUT.value, _OUTPUT.value, fold=_FOLD.value, configuration=_CONFIGURATION.value,
      checkpoint_name=_CHECKPOINT_NAME.value, axcodes=tuple(_AXCODES.value) if _AXCODES.value else None,
      label_map=nnunet_plans.parse_label_map(_LABEL_MAP.value), trust_pickle=_TRUST.value, overwrite=_OVERWRITE.value)
  print(json.dumps(summary, indent=2))
  print(f"model bundle written: python -m spine_jax.predict semantic --checkpoint={summary['output']} ...")
  return 0


def run_spineps() -> int:
  from spine_jax.conversion import nnunet_plans
  from spine_jax.conversion import spineps

  summary = spineps.convert_pair(
      _OUTPUT.value, semantic_folder=_SEMANTIC_FOLDER.value, instance_folder=_INSTANCE_FOLDER.value,
      labeling_folder=_LABELING_FOLDER.value, trust_pickle=_TRUST.value, overwrite=_OVERWRITE.value, spineps_defects=_SPINEPS_DEFECTS.value, fold=_FOLD.value,
      configuration=_CONFIGURATION.value, checkpoint_name=_CHECKPOINT_NAME.value,
      axcodes=tuple(_AXCODES.value) if _AXCODES.value else None,
      label_map=nnunet_plans.parse_label_map(_LABEL_MAP.value))
  print(json.dumps(summary, indent=2))
  if "semantic" in summary and "instance" in summary:
    print(f"model bundles written: python -m spine_jax.predict spine --semantic_checkpoint={summary['output']}/semantic "
          f"--instance_checkpoint={summary['output']}/instance ...")
  if "labeling" in summary:
    print(f"labelling bundle written: {summary['labeling']['output']} ({summary['labeling']['backbone']}, heads "
          f"{', '.join(name for name, _ in summary['labeling']['heads'])})")
  return 0


def run_checkpoint() -> int:
  from spine_jax.conversion import checkpoint

  summary = checkpoint.checkpoint_to_bundle(_INPUT.value, _OUTPUT.value, overwrite=_OVERWRITE.value)
  print(f"{summary['source']}: {summary['task']} model of step {summary['step']} -> {summary['output']}")
  return 0


def run_export_spineps() -> int:
  from spine_jax.conversion import export_spineps

  summary = export_spineps.export_pair(_OUTPUT.value, semantic_checkpoint=_SEMANTIC_CHECKPOINT.value,
                                       instance_checkpoint=_INSTANCE_CHECKPOINT.value,
                                       labeling_checkpoint=_LABELING_CHECKPOINT.value, overwrite=_OVERWRITE.value)
  print(json.dumps(summary, indent=2))
  print("SPINEPS model folders written: spineps sample -i SCAN"
        + (f" -ms {summary['semantic']['folder']}" if "semantic" in summary else "")
        + (f" -mi {summary['instance']['folder']}" if "instance" in summary else "")
        + (f" -ml {summary['labeling']['folder']}" if "labeling" in summary else ""))
  return 0


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: python -m spine_jax.convert {{{'|'.join(COMMANDS)}}} --input=... --output=... "
                         f"(got {argv[1:]})")
  if argv[1] == "spineps":
    if not _OUTPUT.value or not (_SEMANTIC_FOLDER.value or _INSTANCE_FOLDER.value or _LABELING_FOLDER.value):
      raise app.UsageError("spineps needs --output and --semantic_folder, --instance_folder and/or --labeling_folder")
  elif argv[1] == "export_spineps":
    if not _OUTPUT.value or not (_SEMANTIC_CHECKPOINT.value or _INSTANCE_CHECKPOINT.value or _LABELING_CHECKPOINT.value):
      raise app.UsageError("export_spineps needs --output and --semantic_checkpoint, --instance_checkpoint and/or "
                           "--labeling_checkpoint")
  elif not _INPUT.value or not _OUTPUT.value:
    raise app.UsageError(f"{argv[1]} needs --input and --output")
  logging.set_verbosity(logging.WARNING)
  from spine_jax.conversion.errors import ConversionError
  try:
    return {"densenet": run_densenet, "nnunet": run_nnunet, "spineps": run_spineps,
            "checkpoint": run_checkpoint, "export_spineps": run_export_spineps}[argv[1]]()
  except ConversionError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  cli.run(main, "spine_jax.convert")

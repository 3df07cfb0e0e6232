"""The bone-quality classifier as a training task: data, model, step, and the final evaluation."""
from __future__ import annotations

import pathlib

import jax
import numpy as np

from spine_jax.data import manifest as manifest_lib
from spine_jax.data import pipelines
from spine_jax.data.phantoms import ct as ct_phantoms
from spine_jax.engine import networks
from spine_jax.engine import predict as predict_lib
from spine_jax.inference import bone_quality
from spine_jax.metrics import classification
from spine_jax.reports import pictures
from spine_jax.training import steps


def load_split(config, split: str) -> dict[str, np.ndarray]:
  """Slices of one split: procedural phantoms by default, users' NIfTI vertebrae through a manifest."""
  data = config.data
  if data.source == "phantom":
    return ct_phantoms.build_phantom_slices(data.phantom, split)
  if data.source == "manifest":
    if not data.manifest:
      raise ValueError("config.data.manifest: empty, but config.data.source is 'manifest'")
    if split == "test" and data.test_manifest:
      return manifest_lib.build_manifest_slices(data.test_manifest, data.slices)
    return manifest_lib.build_manifest_slices(data.manifest, data.slices, split=split)
  raise ValueError(f"config.data.source: unknown source {data.source!r} (phantom, manifest)")


class BoneQualityTask:
  """What the generic loop needs from the classifier."""

  train_step = staticmethod(steps.bone_quality_train_step)

  def __init__(self, config):
    self.config = config
    self.model, self.init_shape = networks.build(config)
    self._test = None

  def initial_state(self, state):
    """A new run's state with the DenseNet trunk from ``config.model.init_from`` (a torchvision/MONAI
    .pth or a converted .npz); heads start fresh. Resumed runs never come here."""
    path = self.config.model.get("init_from", "")
    if not path:
      return state
    from spine_jax.conversion import densenet as densenet_conversion  # torch only for .pth files
    state = densenet_conversion.load_into_state(state, path)
    if jax.process_index() == 0:
      print(f"trunk initialised from {path}", flush=True)
    return state

  def train_iterator(self, process_index=None, process_count=None):
    return pipelines.bone_quality_train_iterator(load_split(self.config, "train"), self.config,
                                               process_index, process_count)

  def evaluate(self, state, mesh, workdir: pathlib.Path | None = None) -> dict:
    """Slice- and vertebra-level reports on the held-out split; confusion-matrix pictures beside."""
    cfg = self.config
    if self._test is None:
      self._test = load_split(cfg, "test")
    test = self._test
    predict = predict_lib.classifier_predict_fn(state, mesh)
    probs = bone_quality.predict_slices(predict, test["image"], in_channels=cfg.data.in_channels,
                                     batch_size=cfg.eval.batch_size)
    decided = bone_quality.vertebra_decisions(probs, test["vertebra"], cfg.eval)
    report = {"num_slices": int(len(test["image"])), "num_vertebrae": int(len(decided["vertebra"])),
              "slice": {}, "vertebra": {}}
    tasks = (("quality", bone_quality.QUALITY_CLASSES), ("posterolateral", bone_quality.POSTEROLATERAL_CLASSES))
    for name, classes in tasks:
      if name not in probs:
        continue
      report["slice"][name] = classification.classification_report(
          test[name], probs[name].argmax(-1), list(classes))
      report["vertebra"][name] = classification.classification_report(
          test[f"vert_{name}"][decided["vertebra"]], decided[name], list(classes))
      if workdir is not None:
        for level in ("slice", "vertebra"):
          pictures.confusion_matrix_png(
              np.asarray(report[level][name]["confusion_matrix"]), list(classes),
              f"{name} ({level} level)", pathlib.Path(workdir) / f"confusion_{name}_{level}.png")
    return report

  @staticmethod
  def format_report(report: dict) -> str:
    parts = [f"held-out: {report['num_slices']} slices, {report['num_vertebrae']} vertebrae"]
    for level in ("slice", "vertebra"):
      for name, rep in report[level].items():
        parts.append(classification.format_table(rep, f"{name}, {level} level"))
    return "\n\n".join(parts)

  @staticmethod
  def headline(report: dict) -> dict:
    """The few numbers a progress line shows."""
    out = {}
    for level in ("slice", "vertebra"):
      for name, rep in report[level].items():
        out[f"{level}_{name}_balanced_accuracy"] = rep["balanced_accuracy"]
    return out

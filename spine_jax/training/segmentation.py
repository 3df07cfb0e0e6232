"""SPINEPS phase 1 (semantic U-Net) as a training task: patches, Dice + CE, sliding-window evaluation."""
from __future__ import annotations

import pathlib

from spine_jax.data import patches
from spine_jax.data import pipelines
from spine_jax.data import spine_labels
from spine_jax.data import volumes as volumes_lib
from spine_jax.engine import networks
from spine_jax.engine import predict as predict_lib
from spine_jax.inference import semantic as semantic_inference
from spine_jax.inference import semantic_postprocess
from spine_jax.metrics import segmentation as seg_metrics
from spine_jax.metrics.segmentation import finite_mean, format_score
from spine_jax.training import steps

STRUCTURES = tuple(i for i in spine_labels.SEMANTIC_IDS if i)


class SemanticTask:
  """What the generic loop needs from the semantic segmentation model."""

  train_step = staticmethod(steps.segmentation_train_step)

  def __init__(self, config):
    self.config = config
    self.model, self.init_shape = networks.build(config)
    self._test = None

  def initial_state(self, state):
    """New runs start from the initialisation (no pretrained weights for this network)."""
    return state

  def train_iterator(self, process_index=None, process_count=None):
    cfg = self.config
    vols = [v.as_record() for v in volumes_lib.load_split(cfg.data, "train", cfg.data.prep_workers)]
    transform = patches.patch_transform(cfg.data.patch, spine_labels.left_right_swap(), vols)
    return pipelines.train_iterator(_ListSource(vols), global_batch=cfg.batch_size, seed=cfg.seed,
                                    transform=transform, num_workers=cfg.data.num_workers,
                                    process_index=process_index, process_count=process_count)

  def evaluate(self, state, mesh, workdir: pathlib.Path | None = None) -> dict:
    """Dice and ASSD per structure on the held-out volumes (model space, the network's own output),
    and Dice after the SPINEPS post-processing that `predict` applies (`postprocessed`)."""
    cfg = self.config
    if self._test is None:
      self._test = volumes_lib.load_split(cfg.data, "test", cfg.data.prep_workers)
    logits_fn = predict_lib.semantic_logits_fn(state, mesh)
    post_cfg = cfg.get("postprocess") or semantic_postprocess.default_postprocess_config()
    per_volume, post_dice = [], []
    for vol in self._test:
      pred = spine_labels.indices_to_ids(semantic_inference.predict_volume(logits_fn, vol.image, cfg))
      ref = spine_labels.indices_to_ids(vol.labels)
      report = seg_metrics.segmentation_report(pred, ref, vol.spacing, dict(spine_labels.STRUCTURE_NAMES))
      per_volume.append({"name": vol.name, **report})
      post = semantic_postprocess.postprocess_semantic(pred, vol.spacing, post_cfg)
      post_dice.append(seg_metrics.dice_per_label(post, ref, STRUCTURES))
    names = [spine_labels.structure_name(i) for i in STRUCTURES]
    dice = {n: finite_mean([v["labels"][n]["dice"] for v in per_volume]) for n in names}
    assd = {n: finite_mean([v["labels"][n]["assd_mm"] for v in per_volume]) for n in names}
    post = {spine_labels.structure_name(i): finite_mean([d[i] for d in post_dice]) for i in STRUCTURES}
    return {"num_volumes": len(per_volume), "mean_dice": finite_mean(list(dice.values())), "dice": dice,
            "assd_mm": assd, "postprocessed": {"mean_dice": finite_mean(list(post.values())), "dice": post},
            "volumes": per_volume}

  @staticmethod
  def format_report(report: dict) -> str:
    post = report.get("postprocessed") or {"mean_dice": None, "dice": {}}
    lines = [f"held-out: {report['num_volumes']} volumes; mean Dice over {len(report['dice'])} structures "
             f"{format_score(report['mean_dice'])} (after post-processing {format_score(post['mean_dice'])})",
             f"{'structure':26s} {'Dice':>6s} {'ASSD mm':>8s} {'post':>6s}"]
    for name, d in report["dice"].items():
      lines.append(f"{name:26s} {format_score(d):>6s} {format_score(report['assd_mm'][name]):>8s} "
                   f"{format_score(post['dice'].get(name)):>6s}")
    return "\n".join(lines)

  @staticmethod
  def headline(report: dict) -> dict:
    """Mean Dice and Dice per structure: what metrics.jsonl and TensorBoard track during training."""
    post = report.get("postprocessed") or {}
    return {"mean_dice": report["mean_dice"], "postprocessed_mean_dice": post.get("mean_dice"),
            **{f"dice_{k}": v for k, v in report["dice"].items()}}


class _ListSource:
  def __init__(self, items):
    if not items:
      raise ValueError("the data set is empty")
    self._items = items

  def __len__(self):
    return len(self._items)

  def __getitem__(self, i):
    return self._items[i]

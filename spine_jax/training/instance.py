"""SPINEPS phase 2 (the instance network) as a training task: body-centred cutouts, Dice + CE.

Evaluation runs the whole of phase 2 on each held-out volume's reference semantic mask
(`inference.phase2.pipeline.segment_instances`: body centres, cutouts, consolidation, labelling) and
scores each reference vertebra by the Dice of the predicted instance it is matched to (one-to-one
by overlap), so the number measures the network and the consolidation, not phase 1. The network
alone is scored too: Dice of above / centre / below on exact cutouts at the bodies' centroids.
"""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from spine_jax.data import instance_cutouts as cutouts
from spine_jax.data import pipelines
from spine_jax.data import spine_labels
from spine_jax.data import volumes as volumes_lib
from spine_jax.engine import networks
from spine_jax.engine import predict as predict_lib
from spine_jax.inference.phase2 import pipeline as phase2
from spine_jax.metrics import instances as instance_metrics
from spine_jax.metrics import segmentation as seg_metrics
from spine_jax.metrics.segmentation import finite_mean, format_score
from spine_jax.training import steps

POSITIONS = ("above", "centre", "below")


def instance_train_step(state, batch, *, config):
  """Segmentation's Dice + CE step on one-hot inputs made on the device (the host sends uint8
  classes, a fortieth of the float32 one-hot)."""
  batch = {"image": jax.nn.one_hot(batch["input"], cutouts.INPUT_CLASSES, dtype=jnp.float32),
           "labels": batch["labels"].astype(jnp.int32)}
  return steps.segmentation_train_step(state, batch, config=config)


def vertebra_dice(pred: np.ndarray, ref: np.ndarray) -> dict[int, float]:
  """{reference vertebra id: Dice of the predicted instance paired with it} for every reference
  vertebra (ids 1..99 but the sacrum); pairs are one-to-one by overlap, an unpaired vertebra
  scores 0. Predicted ids need not match the reference's."""
  table = instance_metrics.overlap_table(pred, ref, (1, cutouts.VERTEBRA_MAX_ID))
  scores = table.dice()
  pred_index = {int(v): i for i, v in enumerate(table.pred_ids)}
  ref_index = {int(v): j for j, v in enumerate(table.ref_ids)}
  # The sacrum's instance is its semantic label, not the network's work: not scored.
  out = {int(v): 0.0 for v in table.ref_ids if int(v) != spine_labels.SACRUM_INSTANCE}
  for p, r in instance_metrics.match_by_overlap(table):
    if p is not None and r is not None and r in out:
      out[r] = float(scores[pred_index[p], ref_index[r]])
  return out


def found_and_ordered(pred: np.ndarray, ref: np.ndarray, vertebrae, min_dice: float = 0.5) -> bool:
  """Every one of `vertebrae` (reference ids) is found (paired by overlap with Dice >= min_dice) and
  numbered in order: predicted id minus the vertebra's top-to-bottom position in the reference is the
  same for all of them. So the numbering is right up to the level of the field's top vertebra, which
  only a labelling network (or the user's --first_vertebra) gives, and a T13 (id 28) counts by position."""
  table = instance_metrics.overlap_table(pred, ref, (1, cutouts.VERTEBRA_MAX_ID))
  scores = table.dice()
  pred_index = {int(v): i for i, v in enumerate(table.pred_ids)}
  ref_index = {int(v): j for j, v in enumerate(table.ref_ids)}
  pairs = {r: p for p, r in instance_metrics.match_by_overlap(table) if p is not None and r is not None}
  position = {v: k for k, v in enumerate(cutouts.vertebra_order(ref))}
  offsets = set()
  for r in vertebrae:
    p = pairs.get(int(r))
    if p is None or scores[pred_index[p], ref_index[int(r)]] < min_dice:
      return False
    offsets.add(p - position[int(r)])
  return len(offsets) <= 1


class InstanceTask:
  """What the generic loop needs from the instance network."""

  train_step = staticmethod(instance_train_step)

  def __init__(self, config):
    self.config = config
    self.model, self.init_shape = networks.build(config)
    self._test = None

  def _records(self, split: str) -> list[tuple[dict, np.ndarray, np.ndarray]]:
    """(cutout record, semantic ids, reference instances) per volume of a split, images dropped."""
    cfg = self.config
    out = []
    for v in volumes_lib.load_split(cfg.data, split, cfg.data.prep_workers):
      record = cutouts.volume_record(v.labels, v.instance, v.spacing, v.name, cfg.data.cutout.min_body_mm3)
      out.append((record, spine_labels.indices_to_ids(v.labels), v.instance))
    return out

  def initial_state(self, state):
    """New runs start from the initialisation (no pretrained weights for this network)."""
    return state

  def train_iterator(self, process_index=None, process_count=None):
    cfg = self.config
    source = cutouts.CutoutSource([r for r, _, _ in self._records("train")])
    return pipelines.train_iterator(source, global_batch=cfg.batch_size, seed=cfg.seed,
                                    transform=cutouts.cutout_transform(cfg.data.cutout),
                                    num_workers=cfg.data.num_workers, process_index=process_index,
                                    process_count=process_count)

  def evaluate(self, state, mesh, workdir: pathlib.Path | None = None) -> dict:
    """Per-vertebra Dice of phase 2 on the held-out volumes, and the network's per-cutout Dice."""
    del workdir
    cfg = self.config
    if self._test is None:
      self._test = self._records("test")
    predict = predict_lib.instance_predict_fn(state, mesh)
    per_cutout = {p: [] for p in POSITIONS}
    volumes = []
    for record, semantic, reference in self._test:
      for position, scores in _cutout_dice(record, predict, cfg).items():
        per_cutout[position] += scores
      pred, messages = phase2.segment_instances(semantic, predict, cfg.inference,
                                                            spacing=record["spacing"])
      scores = vertebra_dice(pred, reference)
      order = cutouts.vertebra_order(reference)
      centred = {order[p - 1] for p in record["body_positions"]}
      with_body = sorted(int(k) for k in scores if k in centred)
      volumes.append({"name": record["name"], "vertebra_dice": {str(k): v for k, v in scores.items()},
                      "with_body": with_body, "all_found_and_ordered": found_and_ordered(pred, reference, with_body),
                      "messages": messages})
    cutout_dice = {p: finite_mean(v) for p, v in per_cutout.items()}
    with_body = [v["vertebra_dice"][str(k)] for v in volumes for k in v["with_body"]]
    every = [d for v in volumes for d in v["vertebra_dice"].values()]
    return {"num_volumes": len(volumes), "num_vertebrae": len(with_body), "mean_vertebra_dice": finite_mean(with_body),
            "mean_vertebra_dice_all": finite_mean(every), "num_vertebrae_all": len(every),
            "num_cutouts": len(per_cutout["centre"]), "cutout_dice": cutout_dice,
            "mean_cutout_dice": finite_mean(list(cutout_dice.values())),
            "fraction_volumes_all_found_and_ordered": finite_mean([float(v["all_found_and_ordered"]) for v in volumes]),
            "volumes": volumes}

  @staticmethod
  def format_report(report: dict) -> str:
    lines = [f"held-out: {report['num_volumes']} volumes; phase 2 on the reference semantic masks: mean "
             f"vertebra Dice {format_score(report['mean_vertebra_dice'])} over {report['num_vertebrae']} vertebrae with a "
             f"body in the field ({format_score(report['mean_vertebra_dice_all'])} over all {report['num_vertebrae_all']}); "
             f"volumes with every such vertebra found and numbered in order: "
             f"{format_score(report['fraction_volumes_all_found_and_ordered'])}",
             f"network alone, {report['num_cutouts']} cutouts at the body centroids: Dice " +
             ", ".join(f"{p} {format_score(d)}" for p, d in report["cutout_dice"].items())]
    return "\n".join(lines)

  @staticmethod
  def headline(report: dict) -> dict:
    """What metrics.jsonl and TensorBoard track during training."""
    return {"mean_vertebra_dice": report["mean_vertebra_dice"], "mean_cutout_dice": report["mean_cutout_dice"],
            "fraction_volumes_all_found_and_ordered": report["fraction_volumes_all_found_and_ordered"],
            **{f"cutout_dice_{p}": d for p, d in report["cutout_dice"].items()}}


def _cutout_dice(record: dict, predict, cfg) -> dict[str, list[float]]:
  """Dice of above / centre / below on the exact cutout around each body of a record."""
  n = len(record["body_positions"])
  scores = {p: [] for p in POSITIONS}
  step = int(cfg.inference.batch_size)
  for start in range(0, n, step):
    pairs = [cutouts.extract_cutout(record, b, None, cfg.data.cutout) for b in range(start, min(start + step, n))]
    batch = np.zeros((step, *pairs[0][0].shape), np.uint8)  # always full: one compiled shape
    batch[:len(pairs)] = [inputs for inputs, _ in pairs]
    pred = predict(batch)
    for k, (_, target) in enumerate(pairs):
      for c, position in enumerate(POSITIONS, start=1):
        scores[position].append(seg_metrics.dice(pred[k] == c, target == c))
  return scores

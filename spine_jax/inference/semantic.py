"""SPINEPS phase 1 on NIfTI scans: preprocessing, sliding window, post-processing, back to the input grid."""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from spine_jax.data import nifti
from spine_jax.data import spatial
from spine_jax.data import spine_labels
from spine_jax.data import spineps_preprocess
from spine_jax.data import volumes
from spine_jax.engine import predict as predict_lib
from spine_jax.inference import semantic_postprocess
from spine_jax.inference import sliding_window


def predict_volume(logits_fn, image: np.ndarray, cfg, progress=None) -> np.ndarray:
  """Class-index map (X, Y, Z) of one model-space volume by Gaussian-weighted sliding window.

  Test-time mirroring along the left-right axis (R of PIR) swaps the left and right structures of
  the flipped prediction back, as training's mirroring along it swaps their labels; converted nnU-Net
  models mirror as nnU-Net does, without the swap (`inference.mirror_swaps_left_right` false).
  `inference.sliding_window_mode` 'spineps' weighs the windows with SPINEPS' float16 arithmetic.
  """
  axcodes = tuple(cfg.data.preprocess.get("axcodes", spatial.PIR))
  lr_axis = next(i for i, code in enumerate(axcodes) if code in "LR")
  swaps = {lr_axis: spine_labels.left_right_swap()} if cfg.inference.get("mirror_swaps_left_right", True) else {}
  probs = sliding_window.sliding_window_predict(
      logits_fn, image[..., None], tuple(cfg.data.patch.patch_size), spine_labels.NUM_CLASSES,
      step_size=cfg.inference.step_size, batch_size=cfg.inference.batch_size,
      use_gaussian=True, mirror_axes=tuple(cfg.inference.mirror_axes),
      mirror_channel_swaps=swaps, progress=progress,
      mode=sliding_window.window_mode_of(cfg.inference))
  return probs.argmax(-1).astype(np.uint8)


def predict_prepared(logits_fn, vol: volumes.Volume, cfg, progress=None) -> np.ndarray:
  """`predict_volume` on the part of a prepared scan its network sees (`vol.network_box`), the rest
  background: nnU-Net predicts on its non-zero crop and pads the prediction back with background."""
  if vol.network_box is None:
    return predict_volume(logits_fn, vol.image, cfg, progress=progress)
  indices = np.zeros(vol.image.shape, np.uint8)
  indices[vol.network_box] = predict_volume(logits_fn, vol.image[vol.network_box], cfg, progress=progress)
  return indices


@dataclasses.dataclass
class SemanticResult:
  mask: np.ndarray  # (input grid) uint8 SPINEPS ids
  affine: np.ndarray  # the input's affine
  header: object
  model_image: np.ndarray  # PIR model-space image (normalised), for pictures and phase 2
  model_mask: np.ndarray  # PIR model-space SPINEPS ids after post-processing
  volume: volumes.Volume


def segment_array(state, config, mesh, image: np.ndarray, affine: np.ndarray, *, name="scan",
                  logits_fn=None, progress=None, seconds: dict | None = None) -> SemanticResult:
  """An image already in memory (with its affine) -> semantic mask on the same grid.

  `seconds`, when given, receives the wall time of each step: preprocess (N4, resampling, normalisation),
  semantic_network (the sliding window) and semantic_cleanup (post-processing and the way back)."""
  seconds = {} if seconds is None else seconds
  start = time.perf_counter()
  vol = volumes.prepare_scan(image, affine, config.data.preprocess, name=name)
  logits_fn = logits_fn or predict_lib.semantic_logits_fn(state, mesh)
  seconds["preprocess"], start = time.perf_counter() - start, time.perf_counter()
  indices = predict_prepared(logits_fn, vol, config, progress=progress)
  seconds["semantic_network"], start = time.perf_counter() - start, time.perf_counter()
  ids = spine_labels.indices_to_ids(indices)
  post_cfg = config.get("postprocess") or semantic_postprocess.default_postprocess_config()
  ids = semantic_postprocess.postprocess_semantic(ids, vol.spacing, post_cfg).astype(np.uint8)
  mask = spatial.from_model_space(ids, vol.model_space, is_mask=True).astype(np.uint8)
  seconds["semantic_cleanup"] = time.perf_counter() - start
  return SemanticResult(mask, np.asarray(affine), None, vol.image, ids, vol)


def load_scan(path, config) -> tuple[np.ndarray, np.ndarray, object]:
  """(image, affine, header) of a scan as the semantic model's preprocessing reads it: SPINEPS' steps on the
  input grid work in the file's stored integer dtype (its normalisation truncates), so they get that back."""
  image, affine, header = nifti.load_nifti(path)
  if spineps_preprocess.runs_on_input_grid(config.data.preprocess):
    image = spineps_preprocess.stored_dtype(image, header)
  return image, affine, header


def segment_file(state, config, mesh, path, *, logits_fn=None, progress=None) -> SemanticResult:
  image, affine, header = load_scan(path, config)
  result = segment_array(state, config, mesh, image, affine, name=str(path), logits_fn=logits_fn,
                         progress=progress)
  result.header = header
  return result


def blank_image_message(image: np.ndarray) -> str | None:
  """A warning when the scan holds one value everywhere (all zero, say): nothing to segment."""
  image = np.asarray(image)
  if image.size and float(image.min()) == float(image.max()):
    return f"the input image is blank (every voxel is {float(image.min()):g}): nothing to segment"
  return None

"""Runs one SPINEPS/TPTBox function in the SPINEPS reference environment (scripts/spineps_env.sh).

    <spineps-env>/bin/python -I tests/spineps_worker.py WORKDIR FUNCTION

reads WORKDIR/in.npz (arrays, passed as keyword arguments) and WORKDIR/kwargs.json (the other keyword
arguments), calls FUNCTION and writes its outputs as arrays to WORKDIR/out.npz, or the traceback to
WORKDIR/error.txt (exit status 1). FUNCTION is a dotted name in spineps or TPTBox
("TPTBox.core.np_utils.np_dilate_msk") or "worker.NAME", one of the adapters below. tests/spineps_oracle.py
is the caller; this file runs under the other environment's Python and must not import spine_jax (nor
anything from the tests). Imports are lazy: TPTBox alone costs well under a second, `import spineps` (which
brings torch, Lightning and monai) several seconds.
"""
from __future__ import annotations

import importlib
import json
import pathlib
import sys
import traceback

import numpy as np

ROOTS = ("spineps", "TPTBox", "worker")


# --- Adapters: SPINEPS/TPTBox calls whose inputs or outputs are not plain arrays. -----------------------------


def test_mri(orientation: list[str] | None = None) -> dict[str, np.ndarray]:
  """The small real T2w MRI that the TPTBox wheel ships, with its SPINEPS masks
  (TPTBox.tests.test_utils.get_test_mri, which returns (T2w, seg-subreg, seg-vert, 6)).

  Returns image (uint16), affine (of all three, which share one grid), zoom, semantic (the seg-subreg
  mask: SPINEPS semantic ids), instance (the seg-vert mask: vertebra ids, 100 + id for discs, 200 + id for
  endplates) and label (the vertebra that the file names, 6)."""
  from TPTBox.tests.test_utils import get_test_mri
  mri, subreg, vert, label = get_test_mri(tuple(orientation) if orientation is not None else None)
  return {"image": mri.get_array(), "affine": np.asarray(mri.affine), "zoom": np.asarray(mri.zoom, np.float64),
          "semantic": subreg.get_seg_array(), "instance": vert.get_seg_array(), "label": np.asarray(label)}


def rescale(arr: np.ndarray, affine: np.ndarray, voxel_spacing: list[float], order: int | None = None,
            seg: bool = False, mode: str = "nearest") -> dict[str, np.ndarray]:
  """TPTBox's NII.rescale as SPINEPS calls it: seg_model.py (SegmentationModel.segment_scan) does
  `nii.rescale_(zoom, verbose=...)` on the reoriented input, phase_instance.py `seg_nii_rdy.rescale_(zms)`,
  phase_labeling.py `img.rescale_(...)`/`vert.rescale_(...)`: c_val, mode ('nearest'), order (None: 0 for
  a segmentation, 3 otherwise) and align_corners (False) stay at their defaults. (In tptbox 1.1.0 rescale's
  own c_val argument never reaches the resampler, which uses the NII's c_val or the image minimum; with
  mode 'nearest' it is unused anyway.)

  Returns array and affine of the rescaled NII."""
  from TPTBox import NII
  nii = NII.from_numpy(np.asarray(arr), np.asarray(affine, np.float64), seg=seg)
  out = nii.rescale(tuple(voxel_spacing), order=order, mode=mode)
  return {"array": out.get_array(), "affine": np.asarray(out.affine)}


def rescale_to(arr: np.ndarray, affine: np.ndarray, voxel_spacing: list[float], axcodes: list[str] = ("P", "I", "R"),
               seg: bool = False) -> dict[str, np.ndarray]:
  """A scan onto a model's grid as SegmentationModel.segment_scan (seg_model.py) puts it:
  `nii.reorient_(model_expected_orientation)`, then `nii.rescale_(zoom)` with rescale's defaults (mode
  'nearest', order 3, or 0 for a segmentation, align_corners False); phase_instance.py does the same to the
  semantic mask (`seg_nii.reorient()`, `seg_nii_rdy.rescale_(expected_zms)`).

  Returns the reoriented grid (reoriented, reoriented_affine) and the model grid (array, affine)."""
  from TPTBox import NII
  nii = NII.from_numpy(np.asarray(arr), np.asarray(affine, np.float64), seg=seg)
  nii.reorient_(tuple(axcodes), verbose=False)
  out = {"reoriented": nii.get_array(), "reoriented_affine": np.asarray(nii.affine)}
  nii.rescale_(tuple(voxel_spacing), verbose=False)
  return {**out, "array": nii.get_array(), "affine": np.asarray(nii.affine)}


def resample_back(mask: np.ndarray, mask_affine: np.ndarray, target: np.ndarray,
                  target_affine: np.ndarray) -> dict[str, np.ndarray]:
  """A model-grid mask onto the input scan's grid as SPINEPS puts it there: seg_run.py
  `seg_nii_modelres.resample_from_to(input_nii_)` (semantic and instance masks) and seg_model.py
  `v.resample_from_to_(input)`: a segmentation, so order 0, mode 'nearest', align_corners False (the
  default of both methods, so _resample_from_to's align-corners branch for order 0 is not taken).

  Returns the mask on the target's grid (array, affine)."""
  from TPTBox import NII
  seg = NII.from_numpy(np.asarray(mask), np.asarray(mask_affine, np.float64), seg=True)
  scan = NII.from_numpy(np.asarray(target), np.asarray(target_affine, np.float64), seg=False)
  out = seg.resample_from_to(scan, verbose=False)
  return {"array": out.get_array(), "affine": np.asarray(out.affine)}


def echo(**arrays_and_kwargs) -> dict[str, np.ndarray]:
  """The inputs, unchanged (the harness's round trip); non-array keyword arguments come back as arrays."""
  return dict(arrays_and_kwargs)


def semantic_postprocess(zooms: dict[str, list[float]], proc_clean_small_cc_artifacts: bool = True,
                         proc_clean_beyond_largest_bounding_box: bool = True, proc_fill_3d_holes: bool = True,
                         **masks: np.ndarray) -> dict[str, np.ndarray]:
  """SPINEPS' phase-1 clean-up of each semantic mask: phase_semantic.predict_semantic_mask itself, with a
  stand-in model whose segment_scan returns the mask as a P, I, R NII of zooms[NAME] mm (as
  SegmentationModel.segment_scan returns the prediction on the model grid); proc_remove_inferior_beyond_canal
  stays at its default (off), the other three steps are switchable. One `import spineps` for all masks.

  Returns each cleaned mask under its name, or where SPINEPS raised, the message under NAME/error."""
  from spineps.phase_semantic import predict_semantic_mask
  from spineps.seg_enums import OutputType
  from TPTBox import NII

  class StandInModel:
    def __init__(self, nii):
      self.nii = nii

    def segment_scan(self, *args, **kwargs):
      return {OutputType.seg: self.nii, OutputType.softmax_logits: None}

  out = {}
  for name, mask in masks.items():
    p, i, r = (float(z) for z in zooms[name])
    affine = np.array([[0, 0, r, 0], [-p, 0, 0, 0], [0, -i, 0, 0], [0, 0, 0, 1]], np.float64)  # P, I, R in RAS+
    nii = NII.from_numpy(np.asarray(mask), affine, seg=True)
    assert nii.orientation == ("P", "I", "R"), nii.orientation
    try:
      seg, _, _ = predict_semantic_mask(nii, StandInModel(nii), debug_data={}, proc_fill_3d_holes=proc_fill_3d_holes,
                                        proc_clean_beyond_largest_bounding_box=proc_clean_beyond_largest_bounding_box,
                                        proc_clean_small_cc_artifacts=proc_clean_small_cc_artifacts)
      out[name] = seg.get_seg_array()
    except Exception as error:  # noqa: BLE001 - reported per mask (an empty mask after cleaning, say)
      out[f"{name}/error"] = np.asarray(f"{type(error).__name__}: {error}")
  return out


def fill_voids(**masks: np.ndarray) -> dict[str, np.ndarray]:
  """`fill_voids.fill` of each binary mask, as TPTBox's np_fill_holes calls it (`TPTBox.core.np_utils._fill`),
  many masks in one call."""
  from TPTBox.core.np_utils import _fill
  return {name: _fill(np.asarray(mask, bool)) for name, mask in masks.items()}


def load_model_folders(semantic: str, instance: str) -> dict[str, np.ndarray]:
  """SPINEPS' own loader on a semantic and an instance model folder (`get_actual_model(...).load()`, on the CPU):
  the parameter count of each loaded network and the class SPINEPS restored the instance network as."""
  from spineps.get_models import get_actual_model

  out = {}
  for name, folder in (("semantic", semantic), ("instance", instance)):
    model = get_actual_model(folder, use_cpu=True).load()
    network = model.predictor.network  # nnU-Net's predictor, or the restored Lightning PLNet
    out[f"{name}/num_parameters"] = np.asarray(sum(p.numel() for p in network.parameters()))
    out[f"{name}/class"] = np.asarray(f"{type(model.predictor).__module__}.{type(model.predictor).__name__}")
  return out


def postprocess_combined(labeling_offset: int = 1, **arrays: np.ndarray) -> dict[str, np.ndarray]:
  """SPINEPS' joint post-processing of each case: phase_post.phase_postprocess_combined itself, with the flags
  that seg_run.py passes it (no labelling model, labeling_offset = vertebra_instance_labeling_offset - 1, which
  is 1 for MRI; missing-cc assignment on, its fast variant off; inconsistency and clean-by-semantic on; C1
  disabled; sacrum and metal ids the model config's defaults). Cases come as NAME/semantic, NAME/instance and
  NAME/affine (NAME/image optional), the masks as seg_run.py hands them over: uint8 semantic, uint16 instance.
  One `import spineps` for all cases.

  Returns NAME/semantic and NAME/instance, or where SPINEPS raised, the message under NAME/error."""
  from spineps.phase_post import phase_postprocess_combined
  from spineps.utils.seg_modelconfig import DEFAULT_METAL, DEFAULT_SACRUM_IDS
  from TPTBox import NII

  out = {}
  for name in sorted({key.rpartition("/")[0] for key in arrays}):
    affine = np.asarray(arrays[f"{name}/affine"], np.float64)
    semantic = np.asarray(arrays[f"{name}/semantic"]).astype(np.uint8)
    image = arrays.get(f"{name}/image", np.zeros(semantic.shape, np.float32))
    try:
      seg, vert = phase_postprocess_combined(
          img_nii=NII.from_numpy(np.asarray(image, np.float32), affine, seg=False),
          seg_nii=NII.from_numpy(semantic, affine, seg=True),
          vert_nii=NII.from_numpy(np.asarray(arrays[f"{name}/instance"]).astype(np.uint16), affine, seg=True),
          model_labeling=None, debug_data={}, proc_lab_force_no_tl_anomaly=False, labeling_offset=labeling_offset,
          proc_clean_inst_by_sem=True, proc_assign_missing_cc=True, proc_assign_missing_cc_fast=False,
          proc_vertebra_inconsistency=True, verbose=False, disable_c1=True, sacrum_ids=DEFAULT_SACRUM_IDS,
          metal_ids=DEFAULT_METAL)
      out[f"{name}/semantic"], out[f"{name}/instance"] = seg.get_seg_array(), vert.get_seg_array()
    except Exception as error:  # noqa: BLE001 - reported per case (an empty mask, say)
      out[f"{name}/error"] = np.asarray(f"{type(error).__name__}: {error}")
  return out


def standin_classes(classes: np.ndarray) -> np.ndarray:
  """The stand-in instance network of tests/inference/test_phase2_vs_spineps.py, which imports it from here so
  that both pipelines run one network: in one cutout of input classes 0..9, the vertebral bodies are the
  6-connected pieces of class 9, ordered by the middle of their row span (ties: first voxel in C order); the
  piece with the voxel nearest the cutout's centre voxel (ties: first in C order) is the centre vertebra (2),
  the pieces before and after it are above (1) and below (3), and every vertebra voxel (classes 1..9) goes to
  the piece whose row span's middle is nearest its row (ties: the upper). Integer arithmetic only."""
  from scipy import ndimage

  classes = np.asarray(classes)
  out = np.zeros(classes.shape, np.uint8)
  body, count = ndimage.label(classes == 9, ndimage.generate_binary_structure(3, 1))
  if count == 0:
    return out
  flat = body.ravel()
  where = np.flatnonzero(flat)
  ids = flat[where].astype(np.int64)
  first = np.full(count + 1, flat.size, np.int64)
  np.minimum.at(first, ids, where)
  coords = np.stack(np.unravel_index(where, classes.shape), axis=1)
  low = np.full(count + 1, classes.shape[1], np.int64)
  high = np.full(count + 1, -1, np.int64)
  np.minimum.at(low, ids, coords[:, 1])
  np.maximum.at(high, ids, coords[:, 1])
  middle2 = low + high  # twice the middle row
  nearest = int(ids[np.argmin(((coords - np.array(classes.shape) // 2) ** 2).sum(axis=1))])
  order = sorted(range(1, count + 1), key=lambda c: (int(middle2[c]), int(first[c])))
  rank = order.index(nearest)
  middles = np.array([middle2[c] for c in order], np.int64)
  row_rank = np.argmin(np.abs(2 * np.arange(classes.shape[1])[:, None] - middles[None, :]), axis=1)
  vertebra = classes > 0
  for value, r in ((1, rank - 1), (2, rank), (3, rank + 1)):
    if 0 <= r < count:
      out[vertebra & (row_rank == r)[None, :, None]] = value
  return out


def phase2_instances(zooms: dict[str, list[float]], cutout_sizes: dict[str, list[int]],
                     corpus_size_cleaning: float = 100, vert_size_threshold: float = 250, batch_size: int = 4,
                     proc_detect_and_solve_merged_corpi: bool = True, **masks: np.ndarray) -> dict[str, np.ndarray]:
  """SPINEPS' phase 2 up to the raw instance mask: phase_instance.predict_instance_mask itself on each P, I, R
  mask of zooms[NAME] mm, with a SegmentationModelUnet3D whose network is `standin_classes` (SPINEPS' own
  one-hot input and argmax around it) and whose inference config has resolution_range zooms[NAME] (so nothing is
  resampled), cutout_size cutout_sizes[NAME], the two thresholds and the default mapping. get_corpus_coms,
  nii_calc_crop_around_centerpoint and NII.compute_crop are wrapped to record what they return. One `import
  spineps` for all masks.

  Returns per NAME: NAME/instances (absent where SPINEPS returns None), NAME/errcode, NAME/coms (n, 3: what
  get_corpus_coms returned, bottom to top), NAME/centres (n, 3: each cutout's centre, after the step onto a
  vertebra, as the cutout truncates it), NAME/boxes (n, 3, 2: each cutout's slices), all in the cropped volume's
  voxels, and NAME/crop (3, 2); NAME/error where SPINEPS raised."""
  import pathlib
  import types

  import torch
  from spineps import phase_instance
  from spineps.seg_model import SegmentationModelUnet3D
  from spineps.seg_pipeline import NoOpDebugSink
  from spineps.utils.seg_modelconfig import Segmentation_Inference_Config
  from TPTBox import NII

  def network(batch):  # (N, channels, P, I, R) one-hot -> (N, 4, P, I, R) scores
    classes = np.stack([standin_classes(c) for c in batch.argmax(1).cpu().numpy()]).astype(np.int64)
    return torch.nn.functional.one_hot(torch.from_numpy(classes), 4).permute(0, 4, 1, 2, 3).float()

  class StandInModel(SegmentationModelUnet3D):
    def load(self, folds=None):  # noqa: ARG002
      self.device = torch.device("cpu")
      self.predictor = types.SimpleNamespace(network=types.SimpleNamespace(channels=10), forward=network)
      return self

  record: dict = {}
  real = (phase_instance.get_corpus_coms, phase_instance.nii_calc_crop_around_centerpoint, NII.compute_crop)

  def get_corpus_coms(*args, **kwargs):
    record["coms"] = coms = real[0](*args, **kwargs)
    return coms

  def crop_around(poi, *args, **kwargs):
    result = real[1](poi, *args, **kwargs)
    record.setdefault("cuts", []).append(([int(p) for p in poi], [(s.start, s.stop) for s in result[1]]))
    return result

  def compute_crop(self, *args, **kwargs):
    record["crop"] = crop = real[2](self, *args, **kwargs)
    return crop

  out = {}
  phase_instance.get_corpus_coms, phase_instance.nii_calc_crop_around_centerpoint = get_corpus_coms, crop_around
  NII.compute_crop = compute_crop
  try:
    for name, mask in masks.items():
      record.clear()
      p, i, r = (float(z) for z in zooms[name])
      affine = np.array([[0, 0, r, 0], [-p, 0, 0, 0], [0, -i, 0, 0], [0, 0, 0, 1]], np.float64)  # P, I, R in RAS+
      config = Segmentation_Inference_Config(
          logger=None, log_name="StandIn", modality="SEG", acquisition="sag", modeltype="unet",
          model_expected_orientation=("P", "I", "R"), available_folds=1, inference_augmentation=False,
          resolution_range=[p, i, r], default_step_size=0.5, labels={1: 1, 2: 2, 3: 3}, expected_inputs=["seg"],
          cutout_size=tuple(int(s) for s in cutout_sizes[name]), corpus_size_cleaning=corpus_size_cleaning,
          vert_size_threshold=vert_size_threshold)
      model = StandInModel(pathlib.Path(__file__).parent, config, use_cpu=True, default_allow_tqdm=False).load()
      try:
        vert, errcode = phase_instance.predict_instance_mask(
            NII.from_numpy(np.asarray(mask), affine, seg=True), model, debug_data=NoOpDebugSink(),
            proc_inst_batch_size=batch_size, proc_detect_and_solve_merged_corpi=proc_detect_and_solve_merged_corpi)
      except Exception as error:  # noqa: BLE001 - reported per mask
        out[f"{name}/error"] = np.asarray(f"{type(error).__name__}: {error}")
        continue
      out[f"{name}/errcode"] = np.asarray(str(errcode))
      if vert is not None:
        out[f"{name}/instances"] = vert.get_seg_array()
      out[f"{name}/coms"] = np.asarray(record.get("coms") or np.zeros((0, 3)), np.float64).reshape(-1, 3)
      cuts = record.get("cuts", [])
      out[f"{name}/centres"] = np.asarray([c for c, _ in cuts], np.int64).reshape(-1, 3)
      out[f"{name}/boxes"] = np.asarray([b for _, b in cuts], np.int64).reshape(-1, 3, 2)
      if "crop" in record:
        out[f"{name}/crop"] = np.asarray([(s.start, s.stop) for s in record["crop"]], np.int64)
  finally:
    phase_instance.get_corpus_coms, phase_instance.nii_calc_crop_around_centerpoint, NII.compute_crop = real
  return out


def split_fused_bodies(**bodies: np.ndarray) -> dict[str, np.ndarray]:
  """SPINEPS' split of one fused body as get_corpus_coms does it (phase_instance.py:425-436): the body as
  `corpus_cc.extract_label(id).get_array()` hands it over (id 1 of a P, I, R uint16 NII of 1 mm), then
  get_separating_components(segvert, connectivity=3), get_plane_split(..., corpus_nii, ...) and split_by_plane.

  Returns NAME (0; 1 above the plane, 2 below) and NAME/dtype (segvert's), or NAME/error: the exception
  that get_corpus_coms catches (it then keeps the body whole)."""
  from spineps.phase_instance import get_plane_split, get_separating_components, split_by_plane
  from TPTBox import NII

  affine = np.array([[0, 0, 1, 0], [-1, 0, 0, 0], [0, -1, 0, 0], [0, 0, 0, 1]], np.float64)  # P, I, R in RAS+
  out = {}
  for name, body in bodies.items():
    corpus = NII.from_numpy((np.asarray(body) != 0).astype(np.uint16), affine, seg=True)
    segvert = corpus.extract_label(1, inplace=False).get_array()
    out[f"{name}/dtype"] = np.asarray(str(segvert.dtype))
    try:
      spart, tpart, spart_dil, tpart_dil, _ = get_separating_components(segvert, connectivity=3)
      plane = get_plane_split(segvert, corpus, spart, tpart, spart_dil, tpart_dil)
      out[name] = np.asarray(split_by_plane(segvert, plane)).astype(np.uint8)
    except Exception as error:  # noqa: BLE001 - get_corpus_coms catches every exception here
      out[f"{name}/error"] = np.asarray(f"{type(error).__name__}: {error}")
  return out


def n4_bias(image: np.ndarray, affine: np.ndarray) -> dict[str, np.ndarray]:
  """SPINEPS' own N4 (utils/proc_functions.py `n4_bias` with its defaults: threshold 60, spline_param 100,
  through TPTBox's `NII.n4_bias_field_correction` and ANTsPy), as phase_pre.py:117 calls it on the crop.

  Returns corrected (in the image's dtype, as TPTBox casts it back) and mask (the threshold box)."""
  from spineps.utils.proc_functions import n4_bias as spineps_n4_bias
  from TPTBox import NII
  corrected, mask = spineps_n4_bias(NII.from_numpy(np.asarray(image), np.asarray(affine, np.float64)))
  return {"corrected": corrected.get_array(), "mask": mask.get_array()}


def network_input(image: np.ndarray, affine: np.ndarray, voxel_spacing: list[float], n4: bool = False,
                  axcodes: list[str] = ("P", "I", "R")) -> dict[str, np.ndarray]:
  """The array SPINEPS' semantic nnU-Net receives, made by SPINEPS' and TPTBox's own steps:
  phase_pre.py `preprocess_input` (pad 4, normalise, crop, N4 when `n4`, normalise, uncrop; seg_run.py:575),
  seg_model.py:218-221 `reorient_` and `rescale_` (voxel_spacing standing in for the model's recommended
  zoom), inference_api.py:333-341 `run_inference`'s float16 array (axes reversed) and spacing, and
  nnU-Net's `DefaultPreprocessor.run_case_npy` (default_preprocessor.py) on plans that, like SPINEPS'
  models, z-score one channel without a mask, with transpose_forward [0, 1, 2] and the spacing the image
  already has (so its resampling is a no-op).

  Returns data ((1, X, Y, Z) float16 in nnU-Net's axis order), bbox ((3, 2) the non-zero crop on that
  order), padded/padded_affine (preprocess_input's output) and model/model_affine (the rescaled grid)."""
  from spineps.phase_pre import preprocess_input
  from TPTBox import NII
  from TPTBox.segmentation.nnUnet_utils.default_preprocessor import DefaultPreprocessor
  from TPTBox.segmentation.nnUnet_utils.plans_handler import PlansManager
  nii, _ = preprocess_input(NII.from_numpy(np.asarray(image), np.asarray(affine, np.float64)), debug_data={},
                            proc_do_n4_bias_correction=n4)
  out = {"padded": nii.get_array(), "padded_affine": np.asarray(nii.affine)}
  nii.reorient_(tuple(axcodes), verbose=False)
  nii.rescale_(tuple(voxel_spacing), verbose=False)
  out.update(model=nii.get_array(), model_affine=np.asarray(nii.affine))
  a = nii.get_array().astype(np.float16)
  img = np.transpose(a, axes=a.ndim - 1 - np.arange(a.ndim))[np.newaxis, :]
  props = {"spacing": nii.zoom[::-1]}
  resampling = {"resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None}}
  plans = PlansManager({"transpose_forward": [0, 1, 2], "foreground_intensity_properties_per_channel": {"0": {}},
                        "configurations": {"3d_fullres": {"spacing": [float(s) for s in props["spacing"]],
                                                          "normalization_schemes": ["ZScoreNormalization"],
                                                          "use_mask_for_norm": [False], **resampling}}})
  data, _ = DefaultPreprocessor(verbose=False).run_case_npy(img, None, props, plans, plans.get_configuration("3d_fullres"),
                                                            {})
  return {**out, "data": data, "bbox": np.asarray(props["bbox_used_for_cropping"])}


def importance_map(patch_size: list[int]) -> np.ndarray:
  """TPTBox's `compute_gaussian` as predictor.py `_allocate` calls it (sigma 1/8, scale 1000, float16, CPU)."""
  import torch
  from TPTBox.segmentation.nnUnet_utils.sliding_window_prediction import compute_gaussian
  return compute_gaussian(tuple(patch_size), sigma_scale=1.0 / 8, value_scaling_factor=1000,
                          device=torch.device("cpu")).numpy()


def semantic_logits(data: np.ndarray, folder: str, step_size: float | None = None) -> dict[str, np.ndarray]:
  """SPINEPS' semantic network on an already preprocessed array, as seg_model.py:442 loads it
  (`load_inf_model` with the folder's inference_config: step size, folds, mirroring; on the CPU) and
  predictor.py `predict_logits_from_preprocessed_data` runs it: the folds' sliding windows with the
  float16 Gaussian map and float16 accumulation, averaged over folds.

  `data` is (1, X, Y, Z) in nnU-Net's axis order (worker.network_input's `data`). Returns logits
  (classes, X, Y, Z) float32 (from the predictor's float16) and labels, their argmax."""
  import torch
  from spineps.get_models import get_actual_model
  model = get_actual_model(folder, use_cpu=True).load()
  predictor = model.predictor
  if step_size is not None:
    predictor.tile_step_size = step_size
  predictor.allow_tqdm = False
  logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(np.asarray(data)))
  logits = logits.float().numpy()
  return {"logits": logits, "labels": logits.argmax(0).astype(np.uint8)}


def timed_samples(scans: list[str], semantic: str, instance: str, n4: bool = True) -> dict[str, np.ndarray]:
  """`spineps sample -i SCAN -ms SEMANTIC -mi INSTANCE -ml none --cpu --no-crop [--no-n4]` for each scan in one
  process (entrypoint.py `run_sample`'s `segment_image` arguments; models loaded once, as `spineps dataset` does),
  with the wall time of each of seg_run.py's steps. Returns startup_s (imports and model loading), and per scan
  i: i/total_s, i/errcode and i/<step>_s for preprocess (preprocess_input: N4 and normalisation),
  semantic (predict_semantic_mask: resampling, network, clean-up), instance (predict_instance_mask),
  postprocess (phase_postprocess_combined) and centroids (predict_centroids_from_both)."""
  import time
  start = time.perf_counter()
  from spineps import seg_run
  from spineps.get_models import get_actual_model
  from TPTBox import BIDS_FILE
  models = [get_actual_model(folder, use_cpu=True).load() for folder in (semantic, instance)]
  out = {"startup_s": np.asarray(time.perf_counter() - start)}
  steps = {"preprocess": "preprocess_input", "semantic": "predict_semantic_mask",
           "instance": "predict_instance_mask", "postprocess": "phase_postprocess_combined",
           "centroids": "predict_centroids_from_both"}
  spent: dict[str, float] = {}

  def timed(step, fn):
    def run(*args, **kwargs):
      begin = time.perf_counter()
      try:
        return fn(*args, **kwargs)
      finally:
        spent[step] = spent.get(step, 0.0) + time.perf_counter() - begin
    return run

  for step, name in steps.items():
    setattr(seg_run, name, timed(step, getattr(seg_run, name)))
  for i, scan in enumerate(scans):
    spent.clear()
    begin = time.perf_counter()
    _, errcode = seg_run.segment_image(
        img_ref=BIDS_FILE(scan, dataset=str(pathlib.Path(scan).parent), verbose=False), model_semantic=models[0],
        model_instance=models[1], model_labeling=None, derivative_name="derivatives_seg", save_softmax_logits=False,
        save_debug_data=False, save_modelres_mask=False, override_semantic=False, override_instance=False,
        override_postpair=False, override_ctd=False, proc_sem_crop_input=False, proc_sem_n4_bias_correction=n4,
        proc_lab_force_no_tl_anomaly=False, proc_inst_batch_size=4, proc_inst_amp=False, proc_sem_step_size=None,
        ignore_compatibility_issues=False, verbose=False)
    out[f"{i}/total_s"] = np.asarray(time.perf_counter() - begin)
    out[f"{i}/errcode"] = np.asarray(str(errcode))
    out.update({f"{i}/{step}_s": np.asarray(spent.get(step, 0.0)) for step in steps})
  return out


def output_paths(names: list[str]) -> dict[str, np.ndarray]:
  """SPINEPS' output paths for scans of these file names, as `spineps sample` makes them: entrypoint.py
  run_sample wraps the scan as BIDS_FILE(scan, dataset=<its folder>, verbose=True) and seg_run.py
  `output_paths_from_input` names the outputs. TPTBox learns unknown keys and formats while it reads a name,
  into module globals; each name starts from the state after import, as one `spineps sample` per scan does.

  Returns I/KEY (I: the name's place in `names`): out_spine, out_vert, out_ctd and out_snap, each relative to
  the scan's folder."""
  import contextlib
  import copy
  import io

  from spineps.seg_run import output_paths_from_input
  from TPTBox import BIDS_FILE
  from TPTBox.core import bids_constants

  keys, formats = copy.copy(bids_constants.entities_keys), list(bids_constants.formats_relaxed)
  folder = pathlib.Path("/scans")
  out = {}
  for i, name in enumerate(names):
    bids_constants.entities_keys.clear()
    bids_constants.entities_keys.update(keys)
    bids_constants.formats_relaxed[:] = formats
    with contextlib.redirect_stdout(io.StringIO()):  # TPTBox prints each naming rule a name breaks
      scan = BIDS_FILE(folder / name, dataset=folder, verbose=True)
      paths = output_paths_from_input(scan, "derivatives_seg", None, input_format=scan.format)
    for key in ("out_spine", "out_vert", "out_ctd", "out_snap"):
      out[f"{i}/{key}"] = np.asarray(str(paths[key].relative_to(folder)))
  return out


def poi_centroids(semantic: np.ndarray, instance: np.ndarray, image_path: str, ours: str) -> dict[str, np.ndarray]:
  """SPINEPS' centroid file for a scan's masks beside another centroid file (`ours`), both read by `POI.load`.

  SPINEPS' file as seg_run.py:712-719 makes it: seg_pipeline.predict_centroids_from_both(vert_nii_clean,
  seg_nii_clean, ...) on masks on the scan's grid (`input_nii_`, loaded from `image_path` as SPINEPS loads it),
  then `ctd.resample_from_to(input_nii_).save(out_ctd)` (which writes nothing when there are no points).

  Returns, for NAME in ref (SPINEPS') and ours: NAME/ids (n, 2: vertebra, subregion), NAME/points (n, 3),
  NAME/direction, NAME/zoom, NAME/origin, NAME/rotation, NAME/shape; ref/written (whether SPINEPS wrote a file)."""
  import tempfile

  from spineps.seg_pipeline import predict_centroids_from_both
  from TPTBox import NII, POI

  input_nii = NII.load(image_path, seg=False)

  def on_grid(array, dtype):
    return NII((np.asarray(array).astype(dtype), input_nii.affine, input_nii.header), seg=True)

  ctd = predict_centroids_from_both(on_grid(instance, np.uint16), on_grid(semantic, np.uint8),
                                    models=[None, None, None], parameter={})
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    ref = pathlib.Path(tmp) / "spineps_ctd.json"
    ctd.resample_from_to(input_nii).save(ref, verbose=False)
    out["ref/written"] = np.asarray(ref.exists())
    for name, path in (("ref", ref), ("ours", pathlib.Path(ours))):
      if not path.exists():
        continue
      poi = POI.load(path)
      items = sorted(poi.items())
      out[f"{name}/ids"] = np.array([(v, s) for v, s, _ in items], np.int64).reshape(-1, 2)
      out[f"{name}/points"] = np.array([p for _, _, p in items], np.float64).reshape(-1, 3)
      out[f"{name}/direction"] = np.asarray(poi.orientation)
      for field in ("zoom", "origin", "rotation", "shape"):
        out[f"{name}/{field}"] = np.asarray(getattr(poi, field), np.float64)
  return out


def level_targets(spines: list[list[int]]) -> dict[str, np.ndarray]:
  """read_labels' training columns (get_subject_info + get_vert_entry) for every vertebra of whole spines
  given as SPINEPS ids, no anomaly table: rows (spine, id, vert_exact, vert_exact2, group, region, rel, t13)."""
  from spineps.architectures import read_labels as rl
  rows = []
  for k, ids in enumerate(spines):
    info = rl.get_subject_info(k, {}, list(ids))
    for v in ids:
      _, entry = rl.get_vert_entry(v, info)
      rows.append([k, v, entry["vert_exact"].value, entry["vert_exact2"].value, entry["vert_group"].value,
                   entry["vert_region"].value, entry["vert_rel"].value, entry["vert_t13"].value])
  return {"rows": np.asarray(rows, np.int64)}


def labeling_patches(cases: dict[str, dict], **arrays: np.ndarray) -> dict[str, np.ndarray]:
  """SPINEPS' labelling phase (phase_labeling.perform_labeling_step, with run_model_for_vert_labeling and the
  classifier's run_all_seg_instances / run_given_seg_pos / run_given_center_pos / _run_array) on each case, with a
  VertLabelingClassifier built without weights: its predictor records each model input tensor and returns fixed
  logits, and find_vert_path_from_predictions is replaced by a stand-in that records the instance ids (the
  predictions' keys) and force_c2_instance and returns the identity path. Per case NAME: arrays NAME/image,
  NAME/affine, NAME/instance and optionally NAME/semantic; cases[NAME] holds zoom (the resolution_range),
  patch_size (cutout_size = final_size, the transform built as load() builds it), patch_rotation and
  disable_c1 (default True). Orientation P, I, R. One `import spineps` for all cases.

  Returns per NAME: patches (N, *patch_size) float32 in the order the classifier ran, ids (N,), centres (N, 3:
  each run_given_center_pos centre on the labelling grid), angles (N, NaN for none), grid_affine (that grid's,
  as run_all_seg_instances reoriented it), force_c2 (the instance id perform_labeling_step passed on, -1 for
  none), force_c2_instance (its position, -1 for none), seconds (the call's time) and, with a semantic mask,
  dens_ids / dens_mm3 (TPTBox volumes(in_mm3=True) of the corpus-masked instances on the dens, the lines of
  perform_labeling_step)."""
  import pathlib
  import time

  import torch
  from monai.transforms import CenterSpatialCropd, Compose, NormalizeIntensityd
  from spineps import phase_labeling
  from spineps.lab_model import VertLabelingClassifier
  from spineps.utils.seg_modelconfig import Segmentation_Inference_Config
  from TPTBox import NII, Location

  record: dict = {}

  class Recorder:
    def forward(self, model_input):
      record["patches"].append(model_input.detach().cpu().numpy()[0, 0].astype(np.float32))
      return {"VERT": torch.zeros((1, 24))}

    def softmax(self, logits):
      return torch.softmax(logits, dim=1)

  def path(predictions, force_c2_instance=None, **kwargs):  # noqa: ARG001 - the rest is the path's business
    record["ids"] = [int(k) for k in predictions]
    record["force_c2_instance"] = -1 if force_c2_instance is None else int(force_c2_instance)
    fpath = list(range(1, len(predictions) + 1))
    return 0.0, fpath, fpath, [], [], {}

  real_run, real_path = phase_labeling.run_model_for_vert_labeling, phase_labeling.find_vert_path_from_predictions

  def run_model(*args, force_c2=None, **kwargs):
    record["force_c2"] = -1 if force_c2 is None else int(force_c2)
    return real_run(*args, force_c2=force_c2, **kwargs)

  def classifier(zoom, size, patch_rotation):
    config = Segmentation_Inference_Config(
        logger=None, log_name="StandIn", modality="T2w", acquisition="sag", modeltype="classifier",
        model_expected_orientation=("P", "I", "R"), available_folds=1, inference_augmentation=False,
        resolution_range=[float(z) for z in zoom], default_step_size=0.5, labels={}, expected_inputs=["img"])
    model = VertLabelingClassifier(pathlib.Path(__file__).parent, config, use_cpu=True, default_allow_tqdm=False)
    model.predictor, model.cutout_size, model.final_size = Recorder(), size, size
    model.patch_rotation = bool(patch_rotation)
    model.transform = Compose([NormalizeIntensityd(keys=["img"], nonzero=True, channel_wise=False),
                               CenterSpatialCropd(keys=["img", "seg"], roi_size=size)])
    real_seg_instances, real_center_pos = model.run_all_seg_instances, model.run_given_center_pos

    def run_all_seg_instances(img, seg):
      record["grid_affine"] = np.asarray(img.reorient().affine)
      return real_seg_instances(img, seg)

    def run_given_center_pos(img, seg, center_pos, angle=None):
      record["centres"].append([int(c) for c in center_pos])
      record["angles"].append(np.nan if angle is None else float(angle))
      return real_center_pos(img, seg, center_pos, angle=angle)

    model.run_all_seg_instances, model.run_given_center_pos = run_all_seg_instances, run_given_center_pos
    return model

  out = {}
  phase_labeling.run_model_for_vert_labeling, phase_labeling.find_vert_path_from_predictions = run_model, path
  try:
    for name, case in cases.items():
      record.clear()
      record.update(patches=[], centres=[], angles=[])
      size = tuple(int(s) for s in case["patch_size"])
      model = classifier(case["zoom"], size, case.get("patch_rotation", False))
      affine = np.asarray(arrays[f"{name}/affine"], np.float64)
      img = NII.from_numpy(np.asarray(arrays[f"{name}/image"]), affine)
      vert = NII.from_numpy(np.asarray(arrays[f"{name}/instance"]), affine, seg=True)
      semantic = arrays.get(f"{name}/semantic")
      subreg = None if semantic is None else NII.from_numpy(np.asarray(semantic), affine, seg=True)
      if subreg is not None:  # before the step, which relabels `vert` in place
        corpus = subreg.extract_label((Location.Vertebra_Corpus, Location.Vertebra_Corpus_border,
                                       Location.Dens_axis))
        volumes = ((vert * corpus) * subreg.extract_label(Location.Dens_axis.value)).volumes(in_mm3=True)
        out[f"{name}/dens_ids"] = np.asarray(list(volumes), np.int64)
        out[f"{name}/dens_mm3"] = np.asarray(list(volumes.values()), np.float64)
      start = time.perf_counter()
      phase_labeling.perform_labeling_step(model, img, vert, subreg, disable_c1=case.get("disable_c1", True))
      out[f"{name}/seconds"] = np.asarray(time.perf_counter() - start)
      out[f"{name}/patches"] = np.asarray(record["patches"], np.float32).reshape(-1, *size)
      out[f"{name}/ids"] = np.asarray(record.get("ids", []), np.int64)
      out[f"{name}/centres"] = np.asarray(record["centres"], np.int64).reshape(-1, 3)
      out[f"{name}/angles"] = np.asarray(record["angles"], np.float64)
      out[f"{name}/grid_affine"] = record.get("grid_affine", np.eye(4))
      out[f"{name}/force_c2"] = np.asarray(record.get("force_c2", -1))
      out[f"{name}/force_c2_instance"] = np.asarray(record.get("force_c2_instance", -1))
  finally:
    phase_labeling.run_model_for_vert_labeling, phase_labeling.find_vert_path_from_predictions = real_run, real_path
  return out


def level_paths(cases: list[dict], **arrays: np.ndarray) -> dict[str, np.ndarray]:
  """SPINEPS' level path for a batch of cases in one call (importing spineps costs seconds).

  Case i is {"solver": kwargs, "exact": bool}: `find_most_probably_sequence(arrays["i/cost"],
  region_rel_cost=arrays["i/rel"], vertt13_cost=arrays["i/t13"], **kwargs)` (either matrix may be absent;
  punish_skip_class's JSON keys back to ints), then `fpath_post_processing(path, exact_classes=exact)`; or
  {"predictions": kwargs}: `find_vert_path_from_predictions(predictions, **kwargs)` on predictions
  {v: {"soft": {HEAD: arrays["i/head/HEAD"][v]}}} (each head a (vertebrae, classes) array in its own dtype).
  Returns i/cost, i/path, i/ids, i/seconds (SPINEPS' time), for predictions also i/costs (the cost matrix);
  i/error with the exception's text instead where SPINEPS raised."""
  import time

  from spineps.phase_labeling import find_vert_path_from_predictions, fpath_post_processing
  from spineps.utils.find_min_cost_path import find_most_probably_sequence

  out = {}
  for i, case in enumerate(cases):
    start = time.perf_counter()
    try:
      if "solver" in case:
        kwargs = dict(case["solver"])
        if isinstance(kwargs.get("punish_skip_class"), dict):
          kwargs["punish_skip_class"] = {int(k): v for k, v in kwargs["punish_skip_class"].items()}
        cost, path, _ = find_most_probably_sequence(arrays[f"{i}/cost"], region_rel_cost=arrays.get(f"{i}/rel"),
                                                    vertt13_cost=arrays.get(f"{i}/t13"), **kwargs)
        out[f"{i}/ids"] = np.asarray(fpath_post_processing(path, exact_classes=case.get("exact", False)), np.int64)
      else:
        prefix = f"{i}/head/"
        heads = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
        n = len(next(iter(heads.values())))
        predictions = {v: {"soft": {h: a[v] for h, a in heads.items()}} for v in range(n)}
        cost, path, ids, matrix, _, _ = find_vert_path_from_predictions(predictions, **case["predictions"])
        out[f"{i}/ids"] = np.asarray(ids, np.int64)
        out[f"{i}/costs"] = np.asarray(matrix, np.float64)
    except Exception as error:  # noqa: BLE001 - the caller compares failures too
      out[f"{i}/error"] = np.asarray(f"{type(error).__name__}: {error}")
      continue
    out[f"{i}/seconds"] = np.asarray(time.perf_counter() - start)
    out[f"{i}/cost"] = np.asarray(float(cost))
    out[f"{i}/path"] = np.asarray(path, np.int64)
  return out


def randomise_weights(model, seed: int = 0, biases: bool = True):
  """`model` in eval mode with random BatchNorm statistics and affines and (when `biases`) random Linear biases,
  so that a swapped or dropped tensor shows. The labelling folders here and the tests' PyTorch-made models
  (tests/conversion) use this one recipe."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        n = module.num_features
        module.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
        module.running_var.copy_(0.5 + torch.rand(n, generator=gen))
        module.weight.copy_(0.5 + torch.rand(n, generator=gen))
        module.bias.copy_(0.1 * torch.randn(n, generator=gen))
      elif biases and isinstance(module, torch.nn.Linear):
        module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
  return model.eval()


def labeling_folders(x: np.ndarray, specs: dict[str, dict]) -> dict[str, np.ndarray]:
  """SPINEPS' labelling model folders as VertLabelingClassifier.load finds them, one per FOLDER in `specs`: a
  PLClassifier (pl_densenet.py) built from spec `heads` ([name, classes] in order), `backbone` (default
  DENSENET121) and `classification_linear` (default true), with random weights, BatchNorm statistics and affines
  and the Linear biases randomised (seed `seed`) so that a swapped or dropped tensor shows; `opt` is pl_densenet's
  ARGS_MODEL with `final_size` and `ds_name` set when the spec gives them. Lightning's own
  Trainer.save_checkpoint (weights_only, as ModelCheckpoint(save_weights_only=True) writes it) saves it as
  `epoch=7-val_f1=0.9312valf1-weights.ckpt` beside the spec's `inference_config`. One `import spineps` for all.

  Returns per folder index I (in `specs`' order): I/logits/NAME (the network on `x`, (B, 1, P, I, R), eval mode),
  I/seconds (that forward pass on the CPU) and I/checkpoint (the file)."""
  import json
  import time

  import pytorch_lightning as pl
  import torch
  from spineps.architectures.pl_densenet import ARGS_MODEL, PLClassifier

  out = {}
  for i, (folder, spec) in enumerate(specs.items()):
    seed = int(spec.get("seed", 0))
    torch.manual_seed(seed)
    groups = {str(name): int(n) for name, n in spec["heads"]}
    opt = ARGS_MODEL(backbone=spec.get("backbone", "DENSENET121"),
                     classification_linear=bool(spec.get("classification_linear", True)),
                     num_classes=sum(groups.values()), n_channel_p_group=list(groups.values()))
    if spec.get("final_size") is not None:
      opt.final_size = tuple(int(n) for n in spec["final_size"])
    if spec.get("ds_name") is not None:
      opt.ds_name = spec["ds_name"]
    model = randomise_weights(PLClassifier(opt, groups), seed)
    root = pathlib.Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    (root / "inference_config.json").write_text(json.dumps(spec.get("inference_config", {})))
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(model)
    path = root / "epoch=7-val_f1=0.9312valf1-weights.ckpt"
    trainer.save_checkpoint(path, weights_only=True)
    begin = time.perf_counter()
    with torch.inference_mode():
      logits = model(torch.from_numpy(np.asarray(x, np.float32)))
    out[f"{i}/seconds"] = np.asarray(time.perf_counter() - begin)
    out[f"{i}/checkpoint"] = np.asarray(str(path))
    out.update({f"{i}/logits/{k}": v.numpy() for k, v in logits.items()})
  return out


def labeling_logits(x: np.ndarray, folders: list[str], zoom: list[float]) -> dict[str, np.ndarray]:
  """SPINEPS' own labelling model loader on each folder (`VertLabelingClassifier(folder, use_cpu=True).load()`, as
  get_models builds it) and its network on `x` ((B, 1, P, I, R)), as _run_array calls it.

  Returns per folder index I: I/logits/NAME, I/heads (the predictor's head order), I/final_size, I/cutout_size,
  I/patch_rotation, I/orientation (inference_config's model_expected_orientation), I/recommended_zoom
  (calc_recommended_resampling_zoom of `zoom`: the spacing phase_labeling rescales a scan of that spacing to) and
  I/class (the restored predictor's class)."""
  import torch
  from spineps.lab_model import VertLabelingClassifier

  out = {}
  for i, folder in enumerate(folders):
    model = VertLabelingClassifier(folder, use_cpu=True).load()
    with torch.inference_mode():
      logits = model.predictor.forward(torch.from_numpy(np.asarray(x, np.float32)))
    out.update({f"{i}/logits/{k}": v.numpy() for k, v in logits.items()})
    out.update({f"{i}/heads": np.asarray(list(logits)), f"{i}/final_size": np.asarray(model.final_size),
                f"{i}/cutout_size": np.asarray(model.cutout_size), f"{i}/patch_rotation": np.asarray(model.patch_rotation),
                f"{i}/orientation": np.asarray(model.inference_config.model_expected_orientation),
                f"{i}/recommended_zoom": np.asarray(model.calc_recommended_resampling_zoom(tuple(zoom)), np.float64),
                f"{i}/class": np.asarray(f"{type(model.predictor).__module__}.{type(model.predictor).__name__}")})
  return out


def nnunet_predict_timed(data: np.ndarray, folder: str, repeats: int = 1, use_mirroring: bool = True,
                         step_size: float = 0.5) -> dict[str, np.ndarray]:
  """nnU-Net v2's own `nnUNetPredictor` (nnunetv2.inference.predict_from_raw_data, on the CPU) loaded from an
  nnU-Net results folder, then `predict_logits_from_preprocessed_data(data)` timed `repeats` times after one
  untimed call (bench/run_all.py's peer of our sliding window). `data` is (1, X, Y, Z) in nnU-Net's axis order.

  Returns seconds (repeats,), load_s and the last logits' shape."""
  import time

  import torch
  from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
  start = time.perf_counter()
  predictor = nnUNetPredictor(tile_step_size=step_size, use_gaussian=True, use_mirroring=use_mirroring,
                              perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                              verbose_preprocessing=False, allow_tqdm=False)
  predictor.initialize_from_trained_model_folder(folder, use_folds=(0,), checkpoint_name="checkpoint_final.pth")
  load = time.perf_counter() - start
  x = torch.from_numpy(np.asarray(data, np.float32))
  logits = predictor.predict_logits_from_preprocessed_data(x)
  seconds = []
  for _ in range(repeats):
    begin = time.perf_counter()
    logits = predictor.predict_logits_from_preprocessed_data(x)
    seconds.append(time.perf_counter() - begin)
  return {"seconds": np.asarray(seconds), "load_s": np.asarray(load), "shape": np.asarray(logits.shape),
          "mirror_axes": np.asarray(predictor.allowed_mirroring_axes or (), np.int64)}


def instance_phase_timed(semantic: np.ndarray, folder: str, zoom: list[float], repeats: int = 1,
                         batch_size: int = 4) -> dict[str, np.ndarray]:
  """SPINEPS' phase 2, `phase_instance.predict_instance_mask`, with the instance model of `folder` as SPINEPS
  loads it (`get_actual_model(folder, use_cpu=True)`), on a P, I, R semantic mask of `zoom` mm, timed `repeats`
  times after one untimed call (bench/run_all.py's peer of our instance phase).

  Returns seconds (repeats,), load_s, errcode and instances (the last mask, absent where SPINEPS gives None)."""
  import time

  from spineps import phase_instance
  from spineps.get_models import get_actual_model
  from spineps.seg_pipeline import NoOpDebugSink
  from TPTBox import NII

  start = time.perf_counter()
  model = get_actual_model(folder, use_cpu=True).load()
  load = time.perf_counter() - start
  p, i, r = (float(z) for z in zoom)
  affine = np.array([[0, 0, r, 0], [-p, 0, 0, 0], [0, -i, 0, 0], [0, 0, 0, 1]], np.float64)  # P, I, R in RAS+

  def once():
    return phase_instance.predict_instance_mask(NII.from_numpy(np.asarray(semantic), affine, seg=True), model,
                                                debug_data=NoOpDebugSink(), proc_inst_batch_size=batch_size,
                                                proc_detect_and_solve_merged_corpi=True)
  vert, errcode = once()
  seconds = []
  for _ in range(repeats):
    begin = time.perf_counter()
    vert, errcode = once()
    seconds.append(time.perf_counter() - begin)
  out = {"seconds": np.asarray(seconds), "load_s": np.asarray(load), "errcode": np.asarray(str(errcode))}
  if vert is not None:
    out["instances"] = vert.get_seg_array()
  return out


# --- The harness. ---------------------------------------------------------------------------------------------


def resolve(name: str):
  """The callable that a dotted name in spineps, TPTBox or this worker names."""
  root, _, rest = name.partition(".")
  if root not in ROOTS or not rest:
    raise ValueError(f"{name!r}: the worker calls functions in {ROOTS} only (such as 'worker.rescale')")
  if root == "worker":
    return getattr(sys.modules[__name__], rest)
  parts = name.split(".")
  for cut in range(len(parts) - 1, 0, -1):  # the longest importable module prefix, then attributes
    module = ".".join(parts[:cut])
    try:
      obj = importlib.import_module(module)
    except ModuleNotFoundError as error:
      if error.name == module:  # an attribute, not a module: try the shorter prefix
        continue
      raise  # a module that the named one imports is missing
    for attr in parts[cut:]:
      obj = getattr(obj, attr)
    return obj
  raise ValueError(f"cannot resolve {name!r}")


def to_arrays(result) -> dict[str, np.ndarray]:
  """A function's result as named arrays: a dict keeps its keys, a tuple becomes out0, out1, ..., anything
  else is out; a dict or tuple inside one is flattened with "/" (out0/3: key 3 of the first result); an NII
  becomes its array plus KEY_affine."""
  if isinstance(result, dict):
    items = [(str(k), v) for k, v in result.items()]
  elif isinstance(result, tuple):
    items = [(f"out{i}", v) for i, v in enumerate(result)]
  else:
    items = [("out", result)]
  arrays = {}
  while items:
    key, value = items.pop(0)
    if isinstance(value, dict):
      items.extend((f"{key}/{k}", v) for k, v in value.items())
    elif isinstance(value, tuple):
      items.extend((f"{key}/{i}", v) for i, v in enumerate(value))
    elif hasattr(value, "get_array") and hasattr(value, "affine"):  # a TPTBox NII
      arrays[key] = value.get_array()
      arrays[f"{key}_affine"] = np.asarray(value.affine)
    else:
      arrays[key] = np.asarray(value)
      if arrays[key].dtype == object:
        raise TypeError(f"output {key!r} is not an array: {type(value).__name__}")
  return arrays


def main(workdir: str, name: str) -> int:
  work = pathlib.Path(workdir)
  try:
    with np.load(work / "in.npz", allow_pickle=False) as data:
      arrays = {key: data[key] for key in data.files}
    kwargs = json.loads((work / "kwargs.json").read_text())
    np.savez(work / "out.npz", **to_arrays(resolve(name)(**arrays, **kwargs)))
  except BaseException:  # noqa: BLE001 - every failure goes back to the caller
    (work / "error.txt").write_text(traceback.format_exc())
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main(*sys.argv[1:]))

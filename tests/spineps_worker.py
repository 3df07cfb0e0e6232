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

"""SPINEPS phases 1 and 2 together: a T2w scan -> semantic mask, numbered instances, centroids, picture.

Where each step runs:
1. Phase 1 (`semantic.segment_array`) in the semantic checkpoint's model space; its mask comes back
   to the input grid as `predict semantic` writes it.
2. That input-grid mask goes to the instance checkpoint's model space (`config.data.preprocess`:
   orientation, spacing and grid, nearest neighbour), exactly as the instance network's training volumes
   did, and `instance.segment_instances` runs there with `config.inference` (cutout size, thresholds).
   Models converted from SPINEPS (both on its grid) start from phase 1's mask on its model grid
   instead and come back through it, as SPINEPS' seg_run.py does.
3. The instances come back to the input grid by nearest neighbour, and `instance.label_spine` runs
   again there, on the input grid reoriented to PIR (no resampling) with the input-grid semantic
   mask. The instance grid is usually coarser than the scan (a 1 mm endplate can vanish there, a
   vertebra's edge falls on the wrong voxel): in input space every vertebra voxel of the semantic
   mask gets exactly one instance, and discs and endplates are numbered from the mask as written.
   Numbering is positional in both runs, so the ids agree unless an instance vanishes. With a
   perfect network on a phantom (tests/inference/test_spine_pipeline.py), nearest neighbour alone
   gives vertebra Dice 0.80-0.89 against the reference on the input grid; relabelled there, 0.96-1.0.
The semantic mask is written as phase 1 made it; phase 2 only reads it, except in the instance config's
'spineps' post-processing mode, which cleans both masks together as SPINEPS does (`joint_postprocess`).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any, Callable

import ml_collections
import numpy as np

from spine_jax.data import nifti
from spine_jax.data import spatial
from spine_jax.engine import mesh as mesh_lib
from spine_jax.engine import predict as predict_lib
from spine_jax.inference import batch
from spine_jax.inference import restore
from spine_jax.inference import semantic as semantic_lib
from spine_jax.inference import spineps_outputs
from spine_jax.inference.phase2 import common as phase2_common
from spine_jax.inference.phase2 import joint_postprocess
from spine_jax.inference.phase2 import labelling
from spine_jax.inference.phase2 import pipeline as phase2
from spine_jax.inference.phase3 import naming
from spine_jax.reports import pictures

OUTPUT_SUFFIXES = batch.OUTPUT_SUFFIXES
REFERENCE_SUFFIXES = ("_seg-vert_msk.nii.gz", "_seg-vert_msk.nii")
# Phase 2's warnings are returned (printed and stored per scan by the command); its logger repeats them.
PHASE2_LOGGER = phase2_common.logger.name


@dataclasses.dataclass(frozen=True)
class Model:
  """A restored checkpoint with its training config and the jitted function inference calls (made once,
  so every scan reuses one compiled program)."""
  state: Any
  config: ml_collections.ConfigDict
  mesh: Any
  fn: Callable
  checkpoint: str


def load_spine_models(semantic_checkpoint, instance_checkpoint, mesh=None) -> tuple[Model, Model]:
  """(semantic model, instance model) from two training work directories or checkpoint folders, on one mesh."""
  mesh = mesh or mesh_lib.make_mesh()
  state, config, mesh = restore.load_for_inference(semantic_checkpoint, "semantic", mesh)
  sem = Model(state, config, mesh, predict_lib.semantic_logits_fn(state, mesh), str(semantic_checkpoint))
  state, config, mesh = restore.load_for_inference(instance_checkpoint, "instance", mesh)
  inst = Model(state, config, mesh, predict_lib.instance_predict_fn(state, mesh), str(instance_checkpoint))
  return sem, inst


def load_labeling_model(checkpoint, mesh=None) -> Model:
  """The labelling network (phase 3) from a training work directory, checkpoint folder or converted bundle."""
  state, config, mesh = restore.load_for_inference(checkpoint, "labeling", mesh or mesh_lib.make_mesh())
  naming.spec_of(config)  # heads and patch settings the path can read, or one clear error now
  return Model(state, config, mesh, predict_lib.classifier_predict_fn(state, mesh), str(checkpoint))


def parse_first_vertebra(value) -> int | None:
  """A --first_vertebra value (level name like 'T10', or SPINEPS id like '17') as an id; None stays None."""
  if value is None or value == "":
    return None
  text = str(value).strip()
  return labelling.first_vertebra_id(int(text) if text.isdigit() else text)


def phase2_config(instance_model: Model, first_vertebra=None) -> ml_collections.ConfigDict:
  """The instance checkpoint's `config.inference`, with the numbering start overridden when given."""
  cfg = ml_collections.ConfigDict(instance_model.config.inference.to_dict())
  if first_vertebra is not None:
    cfg.first_vertebra = parse_first_vertebra(first_vertebra)
  return cfg


def _counting(predict_fn: Callable, report: Callable[[int], None]) -> Callable:
  """`predict_fn` that also reports how many cutouts it has seen. A real cutout is one-hot at every
  voxel, batch padding is all zero, so one voxel per cutout tells them apart."""
  done = [0]

  def predict(batch):
    done[0] += int(np.asarray(batch)[:, 0, 0, 0].any(-1).sum())
    report(done[0])
    return predict_fn(batch)
  return predict


def _dedupe(messages) -> list[str]:
  return list(dict.fromkeys(messages))


def instances_to_input_grid(model_instances: np.ndarray, space: spatial.ModelSpace,
                            semantic_space: spatial.ModelSpace | None = None) -> np.ndarray:
  """Phase 2's instances from the instance grid (`space`) onto the scan's grid, by nearest neighbour.

  Without `semantic_space`, `space` was made from the input grid and undoes itself. With it, `space` was made
  from the semantic model's grid: on SPINEPS' grid the mask goes from the instance grid straight to the scan's
  grid in one pass, as seg_run.py:670 `whole_vert_nii.resample_from_to(input_nii_)` does (a second pass through
  the semantic grid moved 28% of the vertebra voxels of a 1.65 mm scan); otherwise back through that grid.
  """
  if semantic_space is None:
    return spatial.from_model_space(model_instances, space, is_mask=True)
  if space.grid == spatial.SPINEPS_GRID:
    return spatial.resample_affine(model_instances, space.model_affine,
                                   spatial.tptbox_grid_affine(semantic_space.input_affine), semantic_space.input_shape,
                                   order=0)
  return spatial.from_model_space(spatial.from_model_space(model_instances, space, is_mask=True), semantic_space,
                                  is_mask=True)


def instances_in_input_space(semantic: np.ndarray, affine: np.ndarray, instance_model: Model, cfg=None, *,
                             name="scan", predict_fn=None, semantic_space: spatial.ModelSpace | None = None,
                             model_semantic: np.ndarray | None = None, return_semantic: bool = False,
                             seconds: dict | None = None) -> tuple:
  """Phase 2 on an input-grid semantic mask: (instance mask with SPINEPS ids on the same grid (int16), messages),
  or with `return_semantic` (instances, semantic mask as post-processed (uint8), messages).

  `cfg` is phase 2's settings (default `phase2_config(instance_model)`); `predict_fn` replaces the
  model's network (progress counting, or a test's perfect network). With phase 1's mask on its model
  grid (`model_semantic`, in `semantic_space`), phase 2 starts from that instead, as SPINEPS does:
  instances come back through the semantic model's grid to the input grid. `cfg.postprocess_mode`
  'spineps' hands the raw instances (`phase2.instance_mask`, as SPINEPS' instance phase) to SPINEPS'
  joint post-processing (`joint_postprocess`), which also rewrites the semantic mask; 'spine_jax'
  relabels the model-space result with `label_spine` and leaves the semantic mask as it came.
  `seconds`, when given, receives the wall time of phase 2 (instance) and of the relabelling (postprocess).
  """
  seconds = {} if seconds is None else seconds
  start = time.perf_counter()
  cfg = cfg if cfg is not None else phase2_config(instance_model)
  mode = cfg.get("postprocess_mode", phase2_common.SPINE_JAX_MODE)
  if mode not in phase2_common.PHASE2_MODES:
    raise ValueError(f"inference.postprocess_mode {mode!r}: expected one of {phase2_common.PHASE2_MODES}")
  spineps_mode = mode == phase2_common.SPINEPS_MODE
  prep = instance_model.config.data.preprocess
  source, source_affine = ((semantic, affine) if model_semantic is None
                           else (model_semantic, semantic_space.model_affine))
  model_mask, space = spatial.mask_to_model_space(source, source_affine, axcodes=tuple(prep.axcodes),
                                                  spacing=tuple(prep.spacing), max_voxels=prep.max_voxels,
                                                  grid=spatial.grid_of(prep), name=name)
  run = phase2.instance_mask if spineps_mode else phase2.segment_instances
  model_instances, messages = run(model_mask, predict_fn or instance_model.fn, cfg, spacing=space.model_spacing)
  coarse = instances_to_input_grid(model_instances, space, semantic_space if model_semantic is not None else None)
  seconds["instance"], start = time.perf_counter() - start, time.perf_counter()
  if spineps_mode:  # seg_run.py:656-693: both masks resampled to the input grid, then cleaned together there
    semantic, out, more = joint_postprocess.postprocess_combined(semantic, coarse, affine,
                                                                 first_vertebra=cfg.first_vertebra)
  else:
    # Only the vertebrae travel: the sacrum, discs and endplates are remade from the input-grid semantic mask.
    coarse = np.where((coarse < phase2_common.DISC_OFFSET) & (coarse != phase2_common.SACRUM_ID), coarse, 0)
    sem_pir, _, reorientation = nifti.reorient(semantic, affine, spatial.PIR)
    coarse_pir, _, _ = nifti.reorient(coarse, affine, spatial.PIR)
    labelled, more = labelling.label_spine(
        coarse_pir, sem_pir, first_vertebra=cfg.first_vertebra, endplate_owner=cfg.endplate_owner,
        reassign_articular=bool(cfg.reassign_articular), assign_missing=bool(cfg.assign_missing))
    out = nifti.undo_reorientation(labelled, reorientation).astype(np.int16)
  messages = _dedupe(messages + [f"on the input grid: {m}" for m in more])
  seconds["postprocess"] = time.perf_counter() - start
  return (out, semantic, messages) if return_semantic else (out, messages)


def segment_spine(image: np.ndarray, affine: np.ndarray, semantic_model: Model, instance_model: Model, *,
                  first_vertebra=None, name="scan", progress: Callable | None = None,
                  labeling_model: Model | None = None) -> dict:
  """Phases 1 and 2 on an image in memory: {semantic, instance, centroids, messages, seconds}.

  `semantic` (uint8 SPINEPS ids) and `instance` (int16: vertebrae 1-28, discs 100 + X, endplates
  200 + X) lie on the image's own grid (shape of `image`, `affine`); `centroids` is
  `instance.centroids` (world mm); `messages` are phase 2's warnings (no vertebral body, a single
  vertebra, fused bodies ...). `first_vertebra` (id or level name) overrides the instance config's
  numbering start. `progress(stage, done, total)` hears of sliding windows ('windows', done, total)
  and cutouts ('cutouts', done, None). `seconds` is the wall time of each step (preprocess,
  semantic_network, semantic_cleanup, instance, postprocess, labeling, centroids). With `labeling_model`
  (phase 3) the vertebrae are named by the labelling network and the level path instead of by position, and
  `labeling` reports how (`naming.Naming.report`: per vertebra its level and the heads' probabilities).
  """
  affine = np.asarray(affine, np.float64)
  seconds: dict[str, float] = {}
  windows = (lambda d, t: progress("windows", d, t)) if progress else None
  sem = semantic_lib.segment_array(semantic_model.state, semantic_model.config, semantic_model.mesh, image, affine,
                                   name=name, logits_fn=semantic_model.fn, progress=windows, seconds=seconds)
  predict = _counting(instance_model.fn, lambda d: progress("cutouts", d, None)) if progress else None
  cfg = phase2_config(instance_model, first_vertebra)
  # SPINEPS' models (both on its grid) run phase 2 on phase 1's model-resolution mask, as seg_run.py does.
  at_model_resolution = all(spatial.grid_of(m.config.data.preprocess) == spatial.SPINEPS_GRID
                            for m in (semantic_model, instance_model))
  instances, semantic, messages = instances_in_input_space(
      sem.mask, affine, instance_model, cfg, name=name, predict_fn=predict,
      semantic_space=sem.volume.model_space if at_model_resolution else None,
      model_semantic=sem.model_mask if at_model_resolution else None, return_semantic=True, seconds=seconds)
  if blank := semantic_lib.blank_image_message(image):
    messages = [blank, *messages]
  start = time.perf_counter()
  if labeling_model is not None:
    named = naming.name_vertebrae(image, affine, instances, semantic, labeling_model.fn,
                                  naming.spec_of(labeling_model.config))
    instances = naming.relabel(instances, named.mapping)
    messages = [*messages, *(f"labelling: {m}" for m in named.messages)]
    labeling_report = named.report()
  else:
    labeling_report = {"method": f"positions: the top vertebra is {int(cfg.first_vertebra)} "
                                 "(--first_vertebra, or the instance model's default)"}
  seconds["labeling"], start = time.perf_counter() - start, time.perf_counter()
  centroids = phase2.centroids(instances, semantic, affine)
  seconds["centroids"] = time.perf_counter() - start
  return {"semantic": semantic, "instance": instances, "centroids": centroids, "messages": messages,
          "labeling": labeling_report, "seconds": {k: round(v, 3) for k, v in seconds.items()}}


# ---------------------------------------------------------------------------------------------
# Files


def output_paths(out_dir, stem: str, output_format: str = "spine_jax") -> dict[str, pathlib.Path]:
  """The four outputs of a scan, side by side in `out_dir`: semantic, instance, centroids, snapshot
  (`batch.output_paths`: our names, or SPINEPS' in the 'spineps' output format)."""
  return batch.output_paths(out_dir, stem, output_format)


def outputs_exist(paths: dict) -> bool:
  return all(pathlib.Path(p).exists() for p in paths.values())


def snapshot_png(image: np.ndarray, affine: np.ndarray, result: dict) -> bytes:
  """Mid-sagittal quick look (PNG bytes) of the scan on its own voxels (reoriented to PIR), both masks coloured."""
  views = [nifti.reorient(a, affine, spatial.PIR)[0] for a in (image, result["semantic"], result["instance"])]
  keys = pictures.spine_instance_colour_keys(views[2])
  figure = pictures.sagittal_snapshot_figure(views[0], [views[1], keys], ["T2w", "semantic", "instances"])
  return pictures.figure_png_bytes(figure)


def centroids_json(result: dict, meta: dict | None = None, output_format: str = "spine_jax",
                   affine: np.ndarray | None = None) -> str:
  """`<name>_seg-spine_ctd.json`: `meta` (input, checkpoints ...), phase 2's messages, then the centroids
  (world mm); in the 'spineps' output format SPINEPS' own file, TPTBox's POI of the masks on the grid of
  `affine` (voxel indices, `spineps_outputs.poi_json`), with `meta` and the messages among its header's fields."""
  info = {**(meta or {}), "messages": result["messages"]}
  if "labeling" in result:
    info["labeling"] = result["labeling"]
  if batch.check_output_format(output_format) == "spineps":
    return spineps_outputs.poi_json(result["semantic"], result["instance"], affine,
                                    {"source": "spine_jax predict spine", **info})
  return json.dumps({**info, **result["centroids"]}, indent=2) + "\n"


def write_outputs(result: dict, image: np.ndarray, affine: np.ndarray, paths: dict, *, header=None,
                  meta: dict | None = None, description: str | None = None, output_format: str = "spine_jax") -> None:
  """Write the four outputs, each atomically; if any write fails, the ones already written are removed,
  so a scan has all its outputs or none (and a resumed run redoes it). `description` goes to the masks'
  NIfTI headers (`batch.nifti_description`: the input they were made from); `output_format` picks the
  centroid file's format (`centroids_json`)."""
  text, png = centroids_json(result, meta, output_format, affine), snapshot_png(image, affine, result)
  steps = (
      ("semantic", lambda p: nifti.atomic_save_nifti(result["semantic"], affine, p, header=header, dtype="uint8",
                                                     description=description)),
      ("instance", lambda p: nifti.atomic_save_nifti(result["instance"], affine, p, header=header, dtype="int16",
                                                     description=description)),
      ("centroids", lambda p: nifti.atomic_write_text(p, text)),
      ("snapshot", lambda p: nifti.atomic_write_bytes(p, png)))
  written = []
  try:
    for key, save in steps:
      save(paths[key])
      written.append(pathlib.Path(paths[key]))
  except BaseException:
    for path in written:
      path.unlink(missing_ok=True)
    raise


def segment_file(semantic_model: Model, instance_model: Model, path, paths: dict, *, first_vertebra=None,
                 progress=None, input_digest: str | None = None, output_format: str = "spine_jax",
                 labeling_model: Model | None = None) -> dict:
  """Phases 1 and 2 on a NIfTI file, its four outputs written to `paths` (`output_paths`, in `output_format`);
  returns the result. `input_digest` (`batch.file_digest` of the file) is recorded in the outputs."""
  image, affine, header = semantic_lib.load_scan(path, semantic_model.config)
  result = segment_spine(image, affine, semantic_model, instance_model, first_vertebra=first_vertebra,
                         name=str(path), progress=progress, labeling_model=labeling_model)
  meta = {"input": str(path), "semantic_checkpoint": semantic_model.checkpoint,
          "instance_checkpoint": instance_model.checkpoint,
          "first_vertebra": int(phase2_config(instance_model, first_vertebra).first_vertebra)}
  if labeling_model is not None:
    meta["labeling_checkpoint"] = labeling_model.checkpoint
  if input_digest:
    meta["input_sha256"] = input_digest
  meta["seconds"] = result["seconds"]
  write_outputs(result, image, affine, paths, header=header, meta=meta, output_format=output_format,
                description=batch.nifti_description(input_digest) if input_digest else None)
  return result


def index_references(ref_dir) -> dict[str, list[tuple[pathlib.PurePath, pathlib.Path]]]:
  """{file name: [(folder relative to ref_dir, path), ...]} of every instance mask (`*_seg-vert_msk.nii[.gz]`)
  under `ref_dir`, searched once. Names repeat across subjects' folders, so each keeps its folder."""
  root = pathlib.Path(ref_dir)
  found: dict[str, list] = {}
  for path in sorted(root.rglob("*_seg-vert_msk.nii*")):
    if path.is_file() and path.name.endswith(REFERENCE_SUFFIXES):
      found.setdefault(path.name, []).append((path.parent.relative_to(root), path))
  return found


def find_reference(references: dict, stem: str, folder=None, exclude=()) -> pathlib.Path | None:
  """A scan's reference instance mask from `index_references`: `<stem>_seg-vert_msk.nii[.gz]`, or the same
  with the stem's last BIDS suffix dropped (sub-01_T2w -> sub-01_seg-vert_msk.nii.gz), as derivatives
  are often named. Of several with that name, the one in `folder` (the scan's folder relative to its
  input root); a name found in several other folders matches none. Paths in `exclude` (our own
  outputs, when the folders are one) never count."""
  head, _, last = stem.rpartition("_")
  stems = [stem] + ([head] if head and "-" not in last else [])
  excluded = {pathlib.Path(p).resolve() for p in exclude}
  for name in (s + suffix for s in stems for suffix in REFERENCE_SUFFIXES):
    candidates = [(where, path) for where, path in references.get(name, ()) if path.resolve() not in excluded]
    if folder is not None:
      here = [path for where, path in candidates if where == pathlib.PurePath(folder)]
      if here:
        return here[0]
    if len(candidates) == 1:
      return candidates[0][1]
  return None

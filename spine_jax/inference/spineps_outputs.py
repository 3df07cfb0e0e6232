"""`predict spine --output_format=spineps`: SPINEPS' own output names and its centroid file (TPTBox's POI format).

A SPINEPS user's tools find SPINEPS' derivatives by name and read its centroids with `TPTBox.POI.load`, so
this format reproduces both from SPINEPS 2.1.3 / TPTBox 1.1.0 without importing them:

- Names: seg_run.py `output_paths_from_input` -> `BIDS_FILE.get_changed_path` (TPTBox core/bids_files.py).
  The input's entities are kept, `mod-<its last name part>` and `seg-spine`/`seg-vert` are added, and the
  entities are sorted into TPTBox's order: `sub-X_ses-1_acq-sag_T2w.nii.gz` ->
  `sub-X_ses-1_acq-sag_mod-T2w_seg-spine_msk.nii.gz`. A value that breaks a BIDS rule (`run-a`) makes
  SPINEPS name in non-strict mode, where a name not starting with 'sub' becomes the subject id.
- Centroids: seg_pipeline.py `predict_centroids_from_both`: per vertebra (instance ids below 100), the centre
  of its corpus voxels (semantic 49 or 50) as TPTBox's `calc_poi_from_subreg_vert` finds it, subregion 50,
  in voxel indices of the masks' (the input's) grid, rounded to 2 decimals inside TPTBox's crop; the sacrum
  (26) gets the centre of all its voxels, unrounded. The header gives that grid (orientation, zoom, origin,
  rotation, shape) as `POI.save` does after seg_run.py's `resample_from_to(input_nii_)`.

tests/inference/test_spineps_outputs.py checks both against SPINEPS' own functions.
"""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from spine_jax.data import nifti
from spine_jax.data import spine_labels

OUTPUT_FOLDER = "derivatives_seg"  # SPINEPS' --derivative-name default, beside the scan for `spineps sample`
# Our output keys -> (seg entity, TPTBox format, file type) of seg_run.py `_build_output_paths`.
NAME_PARTS = {"semantic": ("spine", "msk", "nii.gz"), "instance": ("vert", "msk", "nii.gz"),
              "centroids": ("spine", "ctd", "json"), "snapshot": ("spine", "snp", "png")}

# TPTBox 1.1.0 core/bids_constants.py: entity keys in file-name order, and the value rules of `validate_entities`.
ENTITY_ORDER = ("sub", "ses", "sequ", "acq", "task", "chunk", "hemi", "sample", "split", "ce", "trc", "stain", "rec",
                "proc", "mod", "recording", "res", "dir", "echo", "flip", "inv", "mt", "part", "space", "seg",
                "source", "ovl", "run", "label", "den", "version", "desc", "nameconflict")
_ALPHANUMERIC, _DECIMAL = ("task", "dir"), ("run", "echo", "flip", "inv", "nameconflict")
_CHOICES = {"mt": ("on", "off"), "hemi": ("L", "R")}

# spineps seg_pipeline.py: disc and endplate ids leave the instance mask before the centroids are taken.
_DROPPED_RANGES = ((spine_labels.DISC_OFFSET, spine_labels.DISC_OFFSET + 34),
                   (spine_labels.ENDPLATE_OFFSET, spine_labels.ENDPLATE_OFFSET + 34))
# TPTBox counts the corpus border (SPINEPS' written corpus) as the corpus.
CORPUS_IDS = (spine_labels.CORPUS, spine_labels.CORPUS_INNER)
CORPUS_SUBREGION = spine_labels.CORPUS_INNER
SACRUM_ID = spine_labels.SACRUM_INSTANCE
POI_DECIMALS = 2  # calc_poi_from_subreg_vert's default


# ---------------------------------------------------------------------------------------------
# Names


def parse_name(stem: str) -> tuple[str, dict[str, str], str]:
  """TPTBox's reading of a file name: (key before the first '.', {entity: value}, last '_' part).
  Parts without '-' are dropped; a repeated key keeps its first place and its last value."""
  key = stem.split(".", 1)[0]
  parts = key.split("_")
  entities = {}
  for part in parts[:-1]:
    if "-" in part:
      name, value = part.split("-", 1)
      entities[name] = value
  return key, entities, parts[-1]


def _valid(key: str, value: str) -> bool:
  """TPTBox's value rules (`validate_entities`); any failure makes SPINEPS name in non-strict mode."""
  key = key.lower()
  if key in _ALPHANUMERIC:
    return value.isalnum()
  if key in _DECIMAL:
    return value.isdecimal()
  return value in _CHOICES.get(key, (value,))


def _sorted_entities(entities: dict[str, str], order: list[str]) -> list[tuple[str, str]]:
  """TPTBox's order: known keys (and unknown ones in the order TPTBox first met them) by place, others last."""
  keys = list(entities)
  rank = {key: order.index(key) if key in order else keys.index(key) + len(order) for key in keys}
  return [(key, entities[key]) for key in sorted(keys, key=rank.__getitem__)]


def output_name(stem: str, seg: str, bids_format: str, file_type: str) -> str:
  """One SPINEPS output name for an input named `stem` (+ .nii / .nii.gz): `get_changed_path(bids_format,
  info={'seg': seg, 'mod': <input's format>})` as `spineps sample` calls it."""
  key, entities, modality = parse_name(stem)
  # TPTBox learns an unknown key (lower-cased) while reading the name; it then sorts by that place.
  order = list(ENTITY_ORDER)
  order += [k for k in dict.fromkeys(k.lower() for k in entities) if k not in order]
  info = {"seg": seg, "mod": modality}
  if not all(_valid(k, info.get(k, v)) for k, v in entities.items()) and not key.startswith("sub"):
    info["sub"] = key.replace("_", "-")  # non-strict mode: the whole name is the subject id
  final = {k: info.get(k, v) for k, v in entities.items()}
  final.update((k, v) for k, v in info.items() if k not in entities)
  return "".join(f"{k}-{v}_" for k, v in _sorted_entities(final, order)) + f"{bids_format}.{file_type}"


def output_names(stem: str) -> dict[str, str]:
  """The four outputs' SPINEPS names (semantic, instance, centroids, snapshot) for an input named `stem`."""
  return {key: output_name(stem, *parts) for key, parts in NAME_PARTS.items()}


# ---------------------------------------------------------------------------------------------
# Centroids


def _box(mask: np.ndarray) -> tuple[slice, ...] | None:
  """Bounding box (slices) of a mask's true voxels; None when there are none."""
  if not mask.any():
    return None
  return tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(mask))


def _widen(box: tuple[slice, ...], widths, shape) -> tuple[slice, ...]:
  """TPTBox `NII.compute_crop(maximum_size=...)`: each axis grown about its middle to at least `widths`."""
  out = []
  for b, width, size in zip(box, widths, shape):
    grow = width - (b.stop - b.start)
    start, stop = b.start, b.stop
    if width > 0 and grow > 0:
      start, stop = b.start - grow // 2, b.stop + (grow - grow // 2)
      if stop > size:
        start, stop = start - (stop - size), size
      if start < 0:
        start, stop = 0, stop - start
    out.append(slice(start, stop))
  return tuple(out)


def _frame_centres(frame: np.ndarray, corpus: np.ndarray) -> dict[int, np.ndarray]:
  """{vertebra id: mean index of its corpus voxels} in `frame`'s own indices: exact integer sums over one
  count, as TPTBox's cc3d statistics compute them, so that rounding sees the same numbers."""
  flat = np.flatnonzero(corpus & (frame > 0))
  labels = frame.ravel()[flat]
  sizes = np.bincount(labels)
  sums = np.stack([np.bincount(labels, weights=c, minlength=sizes.size)
                   for c in np.unravel_index(flat, frame.shape)], axis=-1)
  return {int(v): sums[v] / sizes[v] for v in np.flatnonzero(sizes)}


def poi_centroids(semantic: np.ndarray, instance: np.ndarray, decimals: int = POI_DECIMALS) -> dict[int, list[float]]:
  """{vertebra id: [i, j, k]}: the voxel-index centroids (subregion 50) SPINEPS writes for these masks."""
  semantic, instance = np.asarray(semantic), np.asarray(instance)
  vert = instance.astype(np.int64)
  for low, high in _DROPPED_RANGES:
    vert[(vert >= low) & (vert < high)] = 0
  out = {}
  vert_box, sem_box = _box(vert > 0), _box(semantic > 0)
  if vert_box is not None and sem_box is not None:  # else TPTBox returns no points
    outer = _widen(sem_box, [b.stop - b.start for b in vert_box], vert.shape)
    bone = np.where(vert[outer] < 100, vert[outer], 0)
    inner = _box(bone > 0)
    if inner is not None:
      frame = bone[inner]
      corpus = np.isin(semantic[outer][inner], CORPUS_IDS)
      for v, centre in _frame_centres(frame, corpus).items():
        out[v] = [round(float(c), decimals) + i.start + o.start for c, i, o in zip(centre, inner, outer)]
  if (instance == SACRUM_ID).any():  # seg_pipeline.py: scipy's center_of_mass of all S1 voxels, unrounded
    out[SACRUM_ID] = [float(np.mean(c)) for c in np.nonzero(instance == SACRUM_ID)]
  return dict(sorted(out.items()))


def poi_header(affine: np.ndarray, shape) -> dict:
  """The grid fields that `POI.save` writes for a POI on this grid, in its order (format 'POI'; the levels are
  'Any', as after seg_run.py's `resample_from_to`)."""
  affine = np.asarray(affine, np.float64)
  zoom = nifti.spacing_from_affine(affine)
  return {"direction": list(nib.orientations.aff2axcodes(affine)), "zoom": [round(float(z), 7) for z in zoom],
          "origin": [round(float(o), 7) for o in affine[:3, 3]], "rotation": (affine[:3, :3] / zoom).tolist(),
          "shape": [int(n) for n in shape], "format": "POI", "level_one_info": "Any", "level_two_info": "Any"}


def poi_json(semantic: np.ndarray, instance: np.ndarray, affine: np.ndarray, info: dict | None = None) -> str:
  """The centroid file of masks on one grid: [grid fields + `info`, {vertebra id: {'50': [i, j, k]}}].
  Without a vertebra the points are {}, which `POI.load` reads as an empty POI (SPINEPS writes no file then;
  a file here keeps every scan's outputs complete, so a resumed run knows it is done)."""
  header = poi_header(affine, np.shape(instance))
  header.update((k, v) for k, v in (info or {}).items() if k not in header)
  points = {str(v): {str(CORPUS_SUBREGION): c} for v, c in poi_centroids(semantic, instance).items()}
  return json.dumps([header, points], indent=4) + "\n"

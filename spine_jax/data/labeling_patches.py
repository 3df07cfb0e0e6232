"""SPINEPS 2.1.3's labelling-phase input: one intensity patch per vertebra instance, voxel for voxel.

The labelling network names each vertebra from a patch of the scan around it, so a converted SPINEPS
checkpoint must see the patches SPINEPS cuts, and a network trained here must be trained on them.
SPINEPS cuts them so (phase_labeling.py `perform_labeling_step`, `run_model_for_vert_labeling`;
lab_model.py `VertLabelingClassifier.run_all_seg_instances`, `run_given_seg_pos`, `run_given_center_pos`,
`_run_array`):
1. given the semantic mask, each instance is cut down to its corpus (49, 50) and the dens (51); each
   instance's overlap with the dens (mm³, input grid) names the instance forced to C2 (`dens_instance`);
2. image and instances reoriented to the model's orientation (PIR for the released models);
3. both cropped to the instances' bounding box plus int(128 mm / the finest spacing) voxels per side;
4. both rescaled to the model's zoom (TPTBox `rescale`: `spatial.to_model_space` on the 'spineps'
   grid, spline order 3 in the image's own dtype, nearest neighbour for the mask);
5. only vertebra ids 1..28 but 26 (sacrum) and 27 kept; the instances go in ascending id order
   (`NII.unique`), which the label path reads as top to bottom, as phase 2 numbers them;
6. reoriented to PIR (`run_all_seg_instances`, whatever the model's orientation); each instance's
   centre is start + size // 2 of its bounding box there;
7. a block of (cutout + 64, cutout + 64, cutout) voxels around the centre, zeros beyond the grid
   (TPTBox `np_calc_crop_around_centerpoint`, which cuts 2 * (size // 2): sizes must be even);
8. reoriented to (I, P, L); for `v4corpus` checkpoints (`rotate`) turned in the sagittal plane by the
   signed angle between I and the line through the neighbouring instances' centres of mass (scipy
   `rotate`, order 3, zeros outside, in the grid's dtype); the 32-voxel margins cut off; back to PIR;
9. MONAI `NormalizeIntensity(nonzero=True)`: float32, the non-zero voxels z-scored by their mean and
   population std (std 0 counts as 1), zeros kept; then `CenterSpatialCrop` to the patch size.
SPINEPS passes the scan cropped to the semantic mask's box plus int(1.5 mm / its finest spacing) voxels
(phase_post.py POSTPROCESS_CROP_MARGIN_MM) and only vertebra instances (discs, endplates and the sacrum come
after labelling).
"""
from __future__ import annotations

import dataclasses
import math

import nibabel as nib
import numpy as np
from scipy import ndimage

from spine_jax.data import nifti
from spine_jax.data import patches as patches_lib
from spine_jax.data import spatial
from spine_jax.data import spineps_preprocess
from spine_jax.data.spine_labels import CORPUS, CORPUS_INNER, DENS

# phase_post.py POSTPROCESS_CROP_MARGIN_MM: the joint post-processing, and the labelling inside it, see the scan
# cropped to the semantic mask's box plus int(this / the finest spacing) voxels.
SPINE_CROP_MARGIN_MM = 2 * min(spatial.REFERENCE_SPACING)  # 1.5 mm
LABELING_CROP_MARGIN_MM = 128.0  # phase_labeling.py: kept around the instances before rescaling
MIN_DENS_VOLUME_MM3 = 250.0  # a dens overlap above this makes its instance C2
ROTATION_MARGIN_VOXELS = 64  # lab_model.py extra_rotation_padding: added to the first two cutout axes
DEFAULT_PATCH_SIZE = (152, 168, 32)  # lab_model.py DEFAULT_CLASSIFIER_INPUT_SIZE (P, I, R voxels)
LABELED_IDS = tuple(i for i in range(1, 29) if i not in (26, 27))  # vertebrae the classifier sees
CORPUS_IDS = (CORPUS, CORPUS_INNER, DENS)
IPL = ('I', 'P', 'L')  # the orientation SPINEPS rotates patches in


@dataclasses.dataclass(frozen=True)
class PatchGeometry:
  """The labelling grid (steps 1-6) and where each vertebra's patch sits on it."""
  image: np.ndarray  # PIR, cropped and rescaled, in the input's dtype
  affine: np.ndarray  # voxel -> world of that grid
  vertebrae: np.ndarray  # instance ids on that grid, LABELED_IDS only (corpus-masked with a semantic mask)
  ids: tuple  # instance ids in SPINEPS' order (ascending)
  centres: np.ndarray  # (N, 3) int64 grid voxels
  angles_deg: np.ndarray | None  # (N,) sagittal alignment angles, None without rotation
  input_affine: np.ndarray
  dens_volumes_mm3: dict  # {instance id: dens overlap mm³}, empty without a semantic mask

  def centres_in_input(self) -> np.ndarray:
    """(N, 3) float64: the centres in the input's voxel coordinates (for reports)."""
    to_input = np.linalg.inv(self.input_affine) @ self.affine
    return nib.affines.apply_affine(to_input, self.centres.astype(np.float64)).reshape(-1, 3)


@dataclasses.dataclass(frozen=True)
class Patches:
  """The classifier's inputs, one per vertebra instance, in SPINEPS' order."""
  ids: tuple
  patches: np.ndarray  # (N, *patch_size) float32, P, I, R
  centres: np.ndarray  # (N, 3) float64 input voxels
  angles_deg: np.ndarray | None
  dens_volumes_mm3: dict


def check_size(size, name: str) -> tuple:
  """Three positive even voxel counts, or ValueError naming the field (odd sizes lose a voxel in SPINEPS' cut)."""
  out = tuple(int(s) for s in size)
  if len(out) != 3 or any(s <= 0 or s % 2 for s in out):
    raise ValueError(f'{name}: expected three positive even voxel counts, got {tuple(size)}')
  return out


def vertebra_instances(instances: np.ndarray) -> np.ndarray:
  """The instance ids the classifier sees (LABELED_IDS), 0 elsewhere: discs, endplates and the sacrum out."""
  instances = np.asarray(instances)
  return np.where(np.isin(instances, LABELED_IDS), instances, 0).astype(instances.dtype)


def corpus_instances(instances: np.ndarray, semantic: np.ndarray) -> np.ndarray:
  """Step 1: the instances where the semantic mask holds a corpus (49, 50) or the dens (51)."""
  instances = np.asarray(instances)
  return np.where(np.isin(semantic, CORPUS_IDS), instances, 0).astype(instances.dtype)


def dens_volumes_mm3(instances: np.ndarray, semantic: np.ndarray, affine: np.ndarray) -> dict[int, float]:
  """{instance id: mm³ of it on the dens} (TPTBox `volumes(in_mm3=True)`: voxels x the product of the
  7-decimal zoom), ascending ids, only ids with such voxels."""
  on_dens = np.asarray(instances)[np.asarray(semantic) == DENS]
  ids, counts = np.unique(on_dens[on_dens != 0], return_counts=True)
  voxel = math.prod(spatial.tptbox_zoom(nifti.spacing_from_affine(affine)))
  return {int(i): float(c * voxel) for i, c in zip(ids, counts)}


def dens_instance(volumes_mm3: dict, min_volume_mm3: float = MIN_DENS_VOLUME_MM3) -> int | None:
  """The instance SPINEPS forces to C2: the largest dens overlap (the lowest id among equals) when above
  `min_volume_mm3`; it applies only where that id is among the patches' ids (and C1 is not disabled)."""
  if not volumes_mm3:
    return None
  label, volume = max(sorted(volumes_mm3.items()), key=lambda item: item[1])
  return int(label) if volume > min_volume_mm3 else None


def _box_with_margin(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
  """TPTBox `np_bbox_binary(mask, px_dist=margin)`: the box of the non-zero voxels grown by `margin`, clipped."""
  box = spineps_preprocess.foreground_box(mask, 'instance mask')
  return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, mask.shape))


def _reorient_axes(array: np.ndarray, from_axcodes, to_axcodes) -> np.ndarray:
  """An array's axes permuted and flipped from one orientation to another (TPTBox `reorient` of a patch)."""
  transform = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(tuple(from_axcodes)),
                                              nib.orientations.axcodes2ornt(tuple(to_axcodes)))
  return np.ascontiguousarray(nib.orientations.apply_orientation(array, transform))


def box_centres(mask: np.ndarray, ids) -> np.ndarray:
  """(N, 3) int64: start + size // 2 of each id's bounding box (`run_given_seg_pos`)."""
  objects = ndimage.find_objects(np.asarray(mask, np.int64))
  return np.asarray([[s.start + (s.stop - s.start) // 2 for s in objects[i - 1]] for i in ids],
                    np.int64).reshape(-1, 3)


def _centres_of_mass(mask: np.ndarray, ids) -> np.ndarray:
  """(N, 3) float64 mean voxel index of each id (cc3d's centroids, as TPTBox `center_of_masses`)."""
  flat = np.flatnonzero(mask)
  values = mask.ravel()[flat].astype(np.int64)
  counts = np.bincount(values)
  coords = np.unravel_index(flat, mask.shape)
  sums = np.stack([np.bincount(values, weights=c, minlength=counts.size) for c in coords], -1)
  return np.asarray([sums[i] / counts[i] for i in ids], np.float64).reshape(-1, 3)


def _signed_angle(v1, v2) -> float:
  """lab_model.py `angle_between(v1, v2)`: radians, signed by (v1 x v2) . (1, 1, 1) (0 counts as +)."""
  v1, v2 = np.asarray(v1, np.float64), np.asarray(v2, np.float64)
  cosine = np.dot(v1 / np.linalg.norm(v1), v2 / np.linalg.norm(v2))
  sign = np.sign(np.cross(v1, v2).dot((1, 1, 1)))
  return float((1.0 if sign == 0 else sign) * np.arccos(np.clip(cosine, -1.0, 1.0)))


def alignment_angles(mask_pir: np.ndarray, ids) -> np.ndarray:
  """(N,) degrees each patch turns by (`run_all_seg_instances` with patch rotation): the angle between I and
  the line from the centre of mass above to the one below (the instance's own at either end), in (I, P, L).
  A lone instance gets 0: SPINEPS' zero-length line gives a NaN angle, and scipy turns the patch to all zeros."""
  if len(ids) < 2:
    return np.zeros(len(ids))
  coms = _centres_of_mass(_reorient_axes(mask_pir, spatial.PIR, IPL), ids)
  order = sorted(range(len(ids)), key=lambda k: coms[k][0])
  angles = []
  for k in range(len(ids)):
    pos = order.index(k)
    above = coms[order[pos - 1]] if pos > 0 else coms[k]
    below = coms[order[pos + 1]] if pos < len(ids) - 1 else coms[k]
    angles.append(math.degrees(_signed_angle(below - above, (1, 0, 0))))
  return np.asarray(angles, np.float64)


def _check_grid(image, instances, semantic, name) -> None:
  shapes = {'image': image.shape, 'instances': instances.shape}
  if semantic is not None:
    shapes['semantic'] = np.shape(semantic)
  if len(set(shapes.values())) != 1:
    raise ValueError(f'{name}: image, instance and semantic masks differ in shape: {shapes}')


def patch_geometry(image: np.ndarray, affine: np.ndarray, instances: np.ndarray, semantic: np.ndarray | None = None,
                   *, zoom, orientation=spatial.PIR, crop_margin_mm: float = LABELING_CROP_MARGIN_MM,
                   rotate: bool = False, name='input volume') -> PatchGeometry:
  """Steps 1-6 (module docstring): the labelling grid, the instances' ids, centres and angles.

  `zoom` is the model's spacing along `orientation`'s axes (SPINEPS' `calc_recommended_resampling_zoom` of
  the reoriented scan's zoom). An instance mask with no voxel left (after the corpus masking) gives no ids."""
  image, instances = np.asarray(image), np.asarray(instances)
  affine = np.asarray(affine, np.float64)
  _check_grid(image, instances, semantic, name)
  dens = {}
  if semantic is not None:
    instances = corpus_instances(instances, semantic)
    dens = dens_volumes_mm3(instances, semantic, affine)
  reoriented, reoriented_affine, _ = nifti.reorient(image, affine, orientation)
  masks = nifti.reorient(instances, affine, orientation)[0]
  if not masks.any():
    empty = np.zeros((0, 3), np.int64)
    return PatchGeometry(reoriented, reoriented_affine, np.zeros_like(masks), (), empty,
                         np.zeros(0) if rotate else None, affine, dens)
  margin = int(crop_margin_mm / min(spatial.tptbox_zoom(nifti.spacing_from_affine(reoriented_affine))))
  box = _box_with_margin(masks, margin)
  grid, space = spatial.to_model_space(reoriented[box], spineps_preprocess.crop_affine(reoriented_affine, box),
                                       axcodes=orientation, spacing=zoom, grid=spatial.SPINEPS_GRID,
                                       keep_dtype=True, name=name)
  vertebrae = vertebra_instances(spatial.apply_model_space(masks[box], space, is_mask=True))
  grid, grid_affine, _ = nifti.reorient(grid, space.model_affine, spatial.PIR)
  vertebrae = nifti.reorient(vertebrae, space.model_affine, spatial.PIR)[0]
  ids = tuple(int(i) for i in np.unique(vertebrae) if i)
  angles = alignment_angles(vertebrae, ids) if rotate else None
  return PatchGeometry(grid, grid_affine, vertebrae, ids, box_centres(vertebrae, ids), angles, affine, dens)


def cutout(grid_image: np.ndarray, centre, cutout_size, angle_deg: float | None = None) -> np.ndarray:
  """Steps 7-8: the raw (cutout_size) PIR block around `centre`, turned by `angle_deg` in the sagittal
  plane when given and non-zero, in the grid's dtype (an integer scan rounds after the rotation, as there)."""
  cutout_size = check_size(cutout_size, 'cutout_size')
  size = np.asarray([cutout_size[0] + ROTATION_MARGIN_VOXELS, cutout_size[1] + ROTATION_MARGIN_VOXELS,
                     cutout_size[2]])
  block = patches_lib.crop_box(grid_image, np.asarray(centre, np.int64) - size // 2, size, grid_image.dtype)
  ipl = _reorient_axes(block, spatial.PIR, IPL)
  if angle_deg is not None and angle_deg != 0:
    ipl = ndimage.rotate(ipl, float(angle_deg), reshape=False, order=3, mode='constant', cval=0)
  m = ROTATION_MARGIN_VOXELS // 2
  return _reorient_axes(ipl[m:-m, m:-m, :], IPL, spatial.PIR)


def normalise_nonzero(patch: np.ndarray) -> np.ndarray:
  """MONAI `NormalizeIntensity(nonzero=True, channel_wise=False)`: float32; non-zero voxels minus their mean
  over their population std (1 where 0), zeros left 0."""
  out = np.array(patch, np.float32)
  nonzero = out != 0
  if not nonzero.any():
    return out
  values = out[nonzero]
  mean = np.float32(values.mean(dtype=np.float64))
  std = np.float32(values.std(dtype=np.float64))
  out[nonzero] = (values - mean) / (std if std != 0 else np.float32(1))
  return out


def centre_crop(patch: np.ndarray, size) -> np.ndarray:
  """MONAI `CenterSpatialCrop`: start max(n // 2 - s // 2, 0) per axis (an axis shorter than s is kept whole)."""
  box = tuple(slice(max(n // 2 - s // 2, 0), max(n // 2 - s // 2, 0) + s) for n, s in zip(patch.shape, size))
  return np.ascontiguousarray(patch[box])


def model_input(block: np.ndarray, patch_size) -> np.ndarray:
  """Step 9: a raw cutout -> the network's input, float32 of `patch_size` (normalised before the crop)."""
  return centre_crop(normalise_nonzero(block), patch_size)


def spine_crop(semantic: np.ndarray, affine: np.ndarray) -> tuple[slice, ...] | None:
  """The box SPINEPS' joint post-processing crops the scan to (phase_post.py:119): the semantic mask's bounding
  box grown by int(SPINE_CROP_MARGIN_MM / the finest spacing, TPTBox's zoom to 7 decimals) voxels; None when
  the mask is empty."""
  boxes = ndimage.find_objects((np.asarray(semantic) > 0).astype(np.int8))
  if not boxes:
    return None
  margin = int(SPINE_CROP_MARGIN_MM / float(min(spatial.tptbox_zoom(nifti.spacing_from_affine(affine)))))
  return tuple(slice(max(0, b.start - margin), min(n, b.stop + margin)) for b, n in zip(boxes[0], semantic.shape))


def cut_patches(image: np.ndarray, affine: np.ndarray, instances: np.ndarray, semantic: np.ndarray | None = None, *,
                zoom, patch_size=DEFAULT_PATCH_SIZE, orientation=spatial.PIR,
                crop_margin_mm: float = LABELING_CROP_MARGIN_MM, rotate: bool = False, cutout_size=None,
                name='input volume') -> Patches:
  """The labelling network's input for a scan and its vertebra instances, as SPINEPS makes it.

  `cutout_size` (default `patch_size`, which SPINEPS' `load` sets both to) is the block normalised before
  the centre crop to `patch_size`; `rotate` turns patches along the spine (`v4corpus` checkpoints)."""
  patch_size = check_size(patch_size, 'patch_size')
  cutout_size = patch_size if cutout_size is None else check_size(cutout_size, 'cutout_size')
  if any(c < p for c, p in zip(cutout_size, patch_size)):
    raise ValueError(f'cutout_size {cutout_size} is smaller than patch_size {patch_size} along an axis')
  geometry = patch_geometry(image, affine, instances, semantic, zoom=zoom, orientation=orientation,
                            crop_margin_mm=crop_margin_mm, rotate=rotate, name=name)
  angles = geometry.angles_deg
  out = np.zeros((len(geometry.ids), *patch_size), np.float32)
  for k, centre in enumerate(geometry.centres):
    out[k] = model_input(cutout(geometry.image, centre, cutout_size, None if angles is None else angles[k]),
                         patch_size)
  return Patches(geometry.ids, out, geometry.centres_in_input(), angles, geometry.dens_volumes_mm3)

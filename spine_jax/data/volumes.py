"""MRI volumes for segmentation: phantoms or users' NIfTI scans, taken to model space once.

Training and evaluation keep every volume of a split in memory in model space (PIR, reference
spacing, normalised intensities, class indices), so patches are cut without touching files again.
The same `prepare_scan` runs at inference, so a model sees identical preprocessing everywhere.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing

import numpy as np

from spine_jax.data import bias_field
from spine_jax.data import manifest as manifest_lib
from spine_jax.data import nifti
from spine_jax.data import patches
from spine_jax.data import spatial
from spine_jax.data import spine_labels
from spine_jax.data import spineps_preprocess
from spine_jax.data.phantoms import mri as mri_phantoms


@dataclasses.dataclass
class Volume:
  """One scan in model space."""
  name: str
  image: np.ndarray  # (X, Y, Z) float32, normalised
  labels: np.ndarray | None  # (X, Y, Z) uint8 class indices
  spacing: np.ndarray  # (3,) mm of the model grid
  model_space: spatial.ModelSpace
  instance: np.ndarray | None = None  # (X, Y, Z) SPINEPS instance ids in model space
  class_locations: dict | None = None
  # The box of the model grid the network sees ('spineps' normalisation: nnU-Net's non-zero crop; the
  # prediction is background outside it); None: the whole grid.
  network_box: tuple | None = None

  def as_record(self) -> dict:
    """What the patch sampler reads."""
    return {"image": self.image, "labels": self.labels, "spacing": self.spacing,
            "class_locations": self.class_locations}


def prepare_scan(image, affine, prep_cfg, *, semantic=None, instance=None, name="scan",
                 max_locations_per_class: int = 0, seed: int = 0) -> Volume:
  """Reorient, resample and normalise a scan (and its masks) as the model expects.

  `prep_cfg.bias_field` and `prep_cfg.normalisation` (data/spineps_preprocess.py) add SPINEPS' steps on
  the input grid and its padding, dtype and nnU-Net normalisation. With `max_locations_per_class`, also
  samples voxel positions of each class (for foreground oversampling of training patches).
  """
  target = tuple(prep_cfg.spacing)
  spineps_mode = spineps_preprocess.normalisation_of(prep_cfg) == spineps_preprocess.SPINEPS
  if spineps_preprocess.runs_on_input_grid(prep_cfg):
    image = spineps_preprocess.prepare_input(image, affine, bias=bias_field.bias_field_of(prep_cfg), name=name,
                                             max_voxels=prep_cfg.max_voxels,
                                             n4_backend=bias_field.n4_backend_of(prep_cfg))
  x, space = spatial.to_model_space(image, affine, axcodes=tuple(prep_cfg.axcodes), spacing=target,
                                    order=prep_cfg.image_order, max_voxels=prep_cfg.max_voxels,
                                    grid=spatial.grid_of(prep_cfg), input_pad=spineps_preprocess.input_pad_of(prep_cfg),
                                    keep_dtype=spineps_mode, name=name)
  box = None
  if spineps_mode:
    x, box = spineps_preprocess.network_input(x, name)
  else:
    x = spatial.normalise_mri(x, max_value=prep_cfg.max_intensity, standardise=True).astype(np.float32)
  labels = inst = locations = None
  if semantic is not None:
    spine_labels.check_ids(semantic, name)  # before resampling, which could drop a stray voxel
    seg = spatial.apply_model_space(semantic, space, is_mask=True)
    labels = spine_labels.ids_to_indices(seg, name=name)
    if max_locations_per_class:
      locations = patches.class_locations(labels, max_locations_per_class, seed)
  if instance is not None:
    inst = spatial.apply_model_space(instance, space, is_mask=True)
  return Volume(name, x, labels, np.asarray(space.model_spacing, np.float32), space, inst, locations, box)


def _max_locations(cfg) -> int:
  """Voxels located per class for patch sampling; 0 for tasks without patches (the instance task)."""
  return cfg.patch.max_per_class if "patch" in cfg else 0


def _phantom_volume(args) -> Volume:
  cfg, split, index = args
  v = mri_phantoms.make_volume(cfg.phantom, split, index)
  return prepare_scan(v["image"], v["affine"], cfg.preprocess, semantic=v["semantic"], instance=v["instance"],
                      name=f"phantom_{split}_{index:04d}", max_locations_per_class=_max_locations(cfg), seed=index)


def _scan_volume(args) -> Volume:
  cfg, record, index = args
  image, affine, header = nifti.load_nifti(record.image)
  if spineps_preprocess.runs_on_input_grid(cfg.preprocess):
    image = spineps_preprocess.stored_dtype(image, header)
  semantic, sem_affine, _ = nifti.load_mask(record.semantic)
  nifti.check_same_grid(record.image, affine, image.shape, record.semantic, sem_affine, semantic.shape)
  instance = None
  if record.instance is not None:
    instance, inst_affine, _ = nifti.load_mask(record.instance)
    nifti.check_same_grid(record.image, affine, image.shape, record.instance, inst_affine, instance.shape)
  return prepare_scan(image, affine, cfg.preprocess, semantic=semantic, instance=instance,
                      name=str(record.image), max_locations_per_class=_max_locations(cfg), seed=index)


def load_split(data_cfg, split: str, num_workers: int = 2) -> list[Volume]:
  """Every volume of a split, phantom (default) or from the manifest, prepared in parallel."""
  if data_cfg.source == "phantom":
    n = data_cfg.phantom.num_train_volumes if split == "train" else data_cfg.phantom.num_test_volumes
    jobs, fn = [(data_cfg, split, i) for i in range(n)], _phantom_volume
  elif data_cfg.source == "manifest":
    if not data_cfg.manifest:
      raise ValueError("config.data.manifest: empty, but config.data.source is 'manifest'")
    path = data_cfg.test_manifest if (split == "test" and data_cfg.get("test_manifest")) else data_cfg.manifest
    records = manifest_lib.read_scan_manifest(path, split=None if path == data_cfg.get("test_manifest") else split)
    jobs, fn = [(data_cfg, r, i) for i, r in enumerate(records)], _scan_volume
  else:
    raise ValueError(f"config.data.source: unknown source {data_cfg.source!r} (phantom, manifest)")
  if num_workers <= 1 or len(jobs) <= 1:
    return [fn(j) for j in jobs]
  # spawn, not fork: the parent has JAX's threads running.
  with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn")) as pool:
    return list(pool.map(fn, jobs))

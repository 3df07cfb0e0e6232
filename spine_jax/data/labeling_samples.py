"""Training samples for the labelling network: SPINEPS' vertebra patches (data/labeling_patches.py) cut from
volumes whose levels are known, with augmentation; one sample per vertebra.

Each volume becomes a record once, at start-up: the labelling grid (corpus masking, crop, rescale, PIR)
with each vertebra's centre and alignment angle, and per vertebra its level id, whether it lies wholly in
the field, and the patient's anatomy (last thoracic and last lumbar ids), which the targets need. A sample
cuts the patch as inference does after moving the centre by a few voxels and turning it a little in the
sagittal plane; gamma and noise change the raw intensities before SPINEPS' normalisation and a contrast
factor the normalised ones, so voxels beyond the scan stay 0 as at inference. Without a generator (or with
augmentation off) a sample is exactly the patch `labeling_patches.cut_patches` gives.
"""
from __future__ import annotations

import ml_collections
import numpy as np

from spine_jax.data import labeling_patches as lp
from spine_jax.data import level_classes
from spine_jax.data import levels as levels_lib
from spine_jax.data import spatial
from spine_jax.data import spineps_preprocess
from spine_jax.data.phantoms import mri as mri_phantoms


def default_sampler_config() -> ml_collections.ConfigDict:
  """SPINEPS' patch (152 x 168 x 32 voxels P, I, R, corpus-masked instances, no rotation: the released t2w
  checkpoint) at the reference spacing, and the augmentation."""
  return ml_collections.ConfigDict(dict(
      patch_size=lp.DEFAULT_PATCH_SIZE,
      zoom=spatial.REFERENCE_SPACING,  # mm along P, I, R: the checkpoint's resolution_range
      crop_margin_mm=lp.LABELING_CROP_MARGIN_MM,
      corpus_masked=True,  # SPINEPS always passes the semantic mask
      rotate=False,  # `v4corpus` checkpoints: patches turned along the spine
      augment=ml_collections.ConfigDict(dict(
          enabled=True,
          centre_jitter_voxels=(4, 4, 1),  # P, I, R: uniform integers in +-these
          p_rotation=0.5, rotation_deg=8.0,  # added to the alignment angle, uniform in +-this
          p_gamma=0.3, gamma_range=(0.7, 1.5),
          p_noise=0.3, noise_std=(0.0, 0.05),  # Gaussian, relative to the non-zero voxels' std
          p_scale=0.3, scale_range=(0.9, 1.1),  # contrast of the normalised patch
      )),
  ))


def volume_record(image: np.ndarray, affine: np.ndarray, instances: np.ndarray, semantic: np.ndarray | None, *,
                  fully_visible_ids, spine_ids, cfg, name: str = 'volume') -> dict:
  """What samples are cut from: the labelling grid and, per vertebra (SPINEPS' order), its centre, angle,
  level id (the instance ids are SPINEPS level ids), full visibility; and the patient's anatomy.

  `fully_visible_ids`: the vertebrae wholly inside the field; `spine_ids`: every vertebra of the patient's
  spine, in the field or not (Anatomy.of). The scan is cropped as phase 3 gets it (`labeling_patches.spine_crop`)."""
  if semantic is not None and (box := lp.spine_crop(semantic, affine)) is not None:  # the scan phase 3 sees
    image, instances, semantic = image[box], instances[box], semantic[box]
    affine = spineps_preprocess.crop_affine(affine, box)
  geometry = lp.patch_geometry(image, affine, lp.vertebra_instances(instances),
                               semantic if cfg.corpus_masked else None, zoom=tuple(cfg.zoom),
                               crop_margin_mm=cfg.crop_margin_mm, rotate=cfg.rotate, name=name)
  full = set(int(i) for i in fully_visible_ids)
  angles = geometry.angles_deg if geometry.angles_deg is not None else np.zeros(len(geometry.ids))
  return {'name': name, 'image': geometry.image, 'centres': geometry.centres, 'angles': angles,
          'levels': np.asarray(geometry.ids, np.int32),
          'fully_visible': np.asarray([i in full for i in geometry.ids], bool),
          'anatomy': level_classes.Anatomy.of(spine_ids)}


def phantom_record(volume: dict, cfg, name: str = 'phantom') -> dict:
  """`volume_record` of an MRI phantom (`phantoms.mri.make_spine`): its full_levels and whole spine."""
  full = [levels_lib.level_to_label(level, 'spineps') for level in volume['full_levels']]
  return volume_record(volume['image'], volume['affine'], volume['instance'], volume['semantic'],
                       fully_visible_ids=full, spine_ids=[v['id'] for v in volume['vertebrae']], cfg=cfg, name=name)


def phantom_records(phantom_cfg, split: str, cfg) -> list[dict]:
  """Records of every phantom of a split, in index order."""
  return [phantom_record(mri_phantoms.make_volume(phantom_cfg, split, i), cfg, name=f'{split}{i:03d}')
          for i in range(mri_phantoms.split_size(phantom_cfg, split))]


def jitter_centre(centre, rng: np.random.Generator, max_voxels) -> np.ndarray:
  """The centre moved by uniform integers in +-max_voxels per axis."""
  jitter = np.asarray(max_voxels, np.int64)
  return np.asarray(centre, np.int64) + rng.integers(-jitter, jitter + 1)


def gamma(block: np.ndarray, g: float) -> np.ndarray:
  """Gamma on the magnitudes scaled to [0, 1] and back: the peak and the zeros stay where they are."""
  x = np.asarray(block, np.float32)
  peak = float(np.abs(x).max())
  if peak == 0:
    return x
  return (np.sign(x) * peak * np.power(np.abs(x) / peak, g)).astype(np.float32)


def add_noise(block: np.ndarray, relative_std: float, rng: np.random.Generator) -> np.ndarray:
  """Gaussian noise of `relative_std` x the non-zero voxels' std on those voxels only."""
  x = np.array(block, np.float32)
  nonzero = x != 0
  if relative_std <= 0 or not nonzero.any():
    return x
  std = relative_std * float(x[nonzero].std())
  x[nonzero] += rng.normal(0.0, std, int(nonzero.sum())).astype(np.float32)
  return x


def _augmented_block(record: dict, k: int, rng: np.random.Generator, cfg) -> np.ndarray:
  """The raw cutout with the centre, angle and raw-intensity draws."""
  aug = cfg.augment
  centre = jitter_centre(record['centres'][k], rng, aug.centre_jitter_voxels)
  angle = float(record['angles'][k])
  if rng.random() < aug.p_rotation:
    angle += rng.uniform(-aug.rotation_deg, aug.rotation_deg)
  block = lp.cutout(record['image'], centre, cfg.patch_size, angle).astype(np.float32)
  if rng.random() < aug.p_gamma:
    block = gamma(block, rng.uniform(*aug.gamma_range))
  if rng.random() < aug.p_noise:
    block = add_noise(block, rng.uniform(*aug.noise_std), rng)
  return block


def sample_vertebra(record: dict, k: int, rng: np.random.Generator | None, cfg, heads) -> dict:
  """Vertebra k of a record: {patch (patch_size) float32, targets {head: int32}, fully_visible int32,
  level int32}. `heads` are (name, classes) pairs (level_classes.check_heads)."""
  patch_size = lp.check_size(cfg.patch_size, 'patch_size')
  use_aug = rng is not None and cfg.augment.get('enabled', True)
  if use_aug:
    patch = lp.model_input(_augmented_block(record, k, rng, cfg), patch_size)
    if rng.random() < cfg.augment.p_scale:
      patch *= np.float32(rng.uniform(*cfg.augment.scale_range))
  else:
    patch = lp.model_input(lp.cutout(record['image'], record['centres'][k], patch_size, record['angles'][k]),
                           patch_size)
  level, visible = int(record['levels'][k]), bool(record['fully_visible'][k])
  targets = level_classes.targets(level, record['anatomy'], visible, heads)
  return {'patch': np.ascontiguousarray(patch, np.float32),
          'targets': {name: np.int32(v) for name, v in targets.items()},
          'fully_visible': np.int32(visible), 'level': np.int32(level)}


class LabelingSource:
  """Random access to every (volume, vertebra) pair: one element per vertebra patch."""

  def __init__(self, records: list[dict]):
    self._records = records
    self._pairs = [(r, k) for r, rec in enumerate(records) for k in range(len(rec['levels']))]
    if not self._pairs:
      raise ValueError('no vertebra to cut a labelling patch from in the data set')

  def __len__(self) -> int:
    return len(self._pairs)

  def __getitem__(self, index: int) -> dict:
    r, k = self._pairs[index]
    return {'record': self._records[r], 'vertebra': k}


def labeling_transform(cfg, heads):
  """grain random_map function: {record, vertebra} -> `sample_vertebra`'s dict."""
  heads = level_classes.check_heads(heads)

  def fn(element, rng):
    return sample_vertebra(element['record'], element['vertebra'], rng, cfg, heads)
  return fn

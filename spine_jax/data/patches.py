"""3D training patches for the semantic U-Net: nnU-Net's foreground oversampling and augmentation.

Volumes are in model space (PIR: axis 0 posterior, 1 inferior, 2 right = the sagittal slice axis)
with anisotropic spacing; images are z-scored float32, labels hold class indices 0..K-1. Every
function takes a `np.random.Generator`, so a grain `random_map` makes the stream reproducible.

Geometry convention: patch voxel o (0-based) sits at offset o - p // 2 from the patch centre, and
samples volume voxel `centre + A (o - p // 2) + displacement`. Without a spatial transform A is the
identity and the patch is exactly `volume[centre - p // 2 : centre - p // 2 + p]`, zero-padded.
A = diag(1/spacing) · scale · R · diag(spacing): rotation happens in mm, so a sphere stays a sphere
on an anisotropic grid. All spatial transforms share ONE resampling pass (linear for the image,
nearest for the labels). Samples beyond the volume read 0 in both: the label of background and,
for a z-scored image, the mean intensity, as nnU-Net pads its normalised data (and as the exact
slicing path does, so both paths agree at the border).
"""
from __future__ import annotations

import ml_collections
import numpy as np
import scipy.ndimage as ndi

from spine_jax.data.spatial import REFERENCE_SPACING

DEFAULT_MAX_PER_CLASS = 10_000


def default_patch_config() -> ml_collections.ConfigDict:
  """Patch size (P, I, R), foreground oversampling, and nnU-Net v2's default augmentation."""
  return ml_collections.ConfigDict(dict(
      patch_size=(96, 128, 32),
      foreground_fraction=0.33,  # nnU-Net's oversample_foreground_percent
      # Class of a foreground patch: 'volume' uniform over the volume's classes (nnU-Net);
      # 'dataset' weights each class by 1 / (training volumes holding it), so in the volumes that
      # have a class found in few (the sacrum in partial-spine fields) it is centred on more often.
      class_sampling="volume",
      class_weight_power=1.0,  # 'dataset': weights 1 / (volumes holding the class) ** power
      max_per_class=DEFAULT_MAX_PER_CLASS,  # voxels kept per class when locating classes
      augment=default_augment_config(),
  ))


def default_augment_config() -> ml_collections.ConfigDict:
  """Per-transform probabilities and ranges. Out-of-plane rotation is kept small: the slices are
  1.65 mm thick, and a scanner tilts the sagittal plane far less than the spine curves within it."""
  return ml_collections.ConfigDict(dict(
      enabled=True,
      # Spatial (one resampling pass). rotation_deg: one (lo, hi) for all axes or one per axis
      # (P, I, R); rotation about R (axis 2) is the in-plane, sagittal one.
      p_rotation=0.2, rotation_deg=((-5.0, 5.0), (-5.0, 5.0), (-15.0, 15.0)),
      p_scale=0.2, scale_range=(0.8, 1.25),  # > 1 samples a larger region: anatomy looks smaller
      # Elastic: off as in nnU-Net v2; magnitude is the largest displacement, kept below the
      # smoothing scale so the deformation never folds.
      p_elastic=0.0, elastic_sigma_mm=(10.0, 15.0), elastic_magnitude_mm=(1.0, 4.0),
      # Mirroring; flipping axis 2 also swaps left/right classes through lr_swap.
      mirror_axes=(2,), p_mirror=0.5,
      # Intensity (image only), in nnU-Net v2's order. nnU-Net also applies blur and low resolution
      # to each channel with p 0.5, so its one-channel rates are half of p_blur and p_lowres here.
      p_noise=0.1, noise_variance=(0.0, 0.1),
      p_blur=0.2, blur_sigma=(0.5, 1.0),  # voxels, drawn per axis
      p_brightness=0.15, brightness_range=(0.75, 1.25),
      p_contrast=0.15, contrast_range=(0.75, 1.25),
      p_lowres=0.25, lowres_zoom=(0.5, 1.0),
      p_gamma_invert=0.1, p_gamma=0.3, gamma_range=(0.7, 1.5),
  ))


# ----------------------------------------------------------------------------- patch centres


def class_locations(labels: np.ndarray, max_per_class: int = DEFAULT_MAX_PER_CLASS,
                    rng=0) -> dict[int, np.ndarray]:
  """{class > 0: (N, 3) int32 voxel coordinates}, at most max_per_class per class (a random subset).

  Computed once per volume: a scan of the whole label map per patch would cost more than the patch.
  """
  rng = np.random.default_rng(rng)
  flat = np.ravel(labels)
  idx = np.flatnonzero(flat)
  vals = flat[idx]
  order = np.argsort(vals, kind="stable")
  idx, vals = idx[order], vals[order]
  classes, starts = np.unique(vals, return_index=True)
  ends = np.append(starts[1:], len(vals))
  out = {}
  for c, a, b in zip(classes, starts, ends):
    sel = idx[a:b]
    if len(sel) > max_per_class:
      sel = np.sort(rng.choice(sel, max_per_class, replace=False))
    out[int(c)] = np.stack(np.unravel_index(sel, np.shape(labels)), axis=1).astype(np.int32)
  return out


_class_locations = class_locations  # reachable where a parameter of that name shadows it


def centre_bounds(shape, patch_size) -> tuple[np.ndarray, np.ndarray]:
  """Lowest and highest centre that keeps the patch inside the volume, per axis. An axis shorter
  than the patch has a single centre, the one that pads both sides evenly."""
  shape, p = np.asarray(shape), np.asarray(patch_size)
  lo = np.where(shape >= p, p // 2, p // 2 - (p - shape) // 2)
  hi = np.where(shape >= p, shape - p + p // 2, lo)
  return lo, hi


def choose_patch_centre(labels: np.ndarray, patch_size, rng: np.random.Generator, foreground: bool,
                        class_locations: dict | None = None, class_weights: dict | None = None) -> np.ndarray:
  """nnU-Net's sampling: a foreground patch centres on a random voxel of a random class present
  (uniform over classes, so small structures are seen as often as large ones; or in proportion to
  `class_weights` {class: weight}, see `dataset_class_weights`), shifted only as far as needed to
  keep the patch inside the volume; otherwise the patch is uniformly placed. A volume without
  foreground gives a uniform patch. Returns (3,) int64."""
  lo, hi = centre_bounds(np.shape(labels), patch_size)
  if foreground:
    locs = class_locations
    if locs is None:
      locs = _class_locations(labels, DEFAULT_MAX_PER_CLASS, rng)
    present = [c for c in sorted(locs) if c > 0 and len(locs[c])]
    if present:
      if class_weights:
        w = np.array([float(class_weights.get(c, 0.0)) for c in present])
        pick = rng.choice(len(present), p=w / w.sum()) if w.sum() > 0 else rng.integers(len(present))
      else:
        pick = rng.integers(len(present))
      voxels = locs[present[pick]]
      voxel = voxels[rng.integers(len(voxels))]
      return np.clip(np.asarray(voxel, np.int64), lo, hi)
  return rng.integers(lo, hi + 1).astype(np.int64)


# ----------------------------------------------------------------------------- spatial


def rotation_matrix(angles_rad) -> np.ndarray:
  """R = R2 · R1 · R0, Rk rotating about axis k (in the plane of the other two, right-handed in
  axis order: about axis 2, +90° takes axis 0 to axis 1)."""
  m = np.eye(3)
  for k, a in enumerate(angles_rad):
    i, j = [x for x in range(3) if x != k]
    r = np.eye(3)
    r[i, i] = r[j, j] = np.cos(a)
    r[j, i], r[i, j] = np.sin(a), -np.sin(a)
    m = r @ m
  return m


def _per_axis(ranges) -> np.ndarray:
  r = np.asarray(ranges, np.float64)
  return np.tile(r, (3, 1)) if r.shape == (2,) else r.reshape(3, 2)


def draw_affine(rng: np.random.Generator, aug, spacing) -> np.ndarray | None:
  """Voxel-space matrix A (patch offset -> volume offset), or None when neither rotation nor
  scaling is drawn. Built in mm: diag(1/s) · scale · R · diag(s)."""
  m, drawn = np.eye(3), False
  if rng.random() < aug.p_rotation:
    angles = np.deg2rad([rng.uniform(lo, hi) for lo, hi in _per_axis(aug.rotation_deg)])
    m, drawn = rotation_matrix(angles), True
  if rng.random() < aug.p_scale:
    m, drawn = m * rng.uniform(*aug.scale_range), True
  if not drawn:
    return None
  s = np.asarray(spacing, np.float64)
  return m * s[None, :] / s[:, None]


def _resize_nearest(x: np.ndarray, shape) -> np.ndarray:
  """Centre-aligned nearest-neighbour resize (align_corners=False)."""
  idx = [np.minimum(((np.arange(m) + 0.5) * n / m).astype(np.int64), n - 1) for n, m in zip(x.shape, shape)]
  return x[np.ix_(*idx)]


def _resize_linear(x: np.ndarray, shape) -> np.ndarray:
  """Centre-aligned separable linear resize (align_corners=False, edge values repeat)."""
  for axis, (n, m) in enumerate(zip(x.shape, shape)):
    if n == m:
      continue
    pos = np.clip((np.arange(m) + 0.5) * n / m - 0.5, 0, n - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    w = (pos - lo).astype(x.dtype).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
    x = np.take(x, lo, axis=axis) * (1 - w) + np.take(x, hi, axis=axis) * w
  return x


def elastic_displacement(shape, spacing, rng: np.random.Generator, sigma_mm, magnitude_mm) -> np.ndarray:
  """(3, *shape) float32 smooth random displacement in volume voxels, at most magnitude mm per axis.

  White noise on a coarse grid (about sigma/4 apart) smoothed there and interpolated up: the same
  field as smoothing at full resolution, at a small fraction of the cost.
  """
  spacing = np.asarray(spacing, np.float64)
  sigma_vox = rng.uniform(*sigma_mm) / spacing
  magnitude = rng.uniform(*magnitude_mm)
  coarse = tuple(int(max(2, np.ceil(n / max(1.0, s / 4)))) for n, s in zip(shape, sigma_vox))
  sigma_coarse = sigma_vox * np.asarray(coarse) / np.asarray(shape)
  disp = np.empty((3,) + tuple(shape), np.float32)
  for k in range(3):
    f = ndi.gaussian_filter(rng.standard_normal(coarse), sigma_coarse, mode="reflect")
    f *= magnitude / spacing[k] / (np.abs(f).max() + 1e-12)
    disp[k] = _resize_linear(f.astype(np.float32), shape)
  return disp


def crop_box(x: np.ndarray, start, size, dtype) -> np.ndarray:
  """x[start : start + size] with zeros beyond the volume (exact, no interpolation)."""
  out = np.zeros(tuple(size), dtype)
  src, dst = [], []
  for s, p, n in zip(start, size, x.shape):
    a, b = max(s, 0), min(s + p, n)
    if b <= a:
      return out
    src.append(slice(a, b))
    dst.append(slice(a - s, b - s))
  out[tuple(dst)] = x[tuple(src)]
  return out


def sampling_coords(centre, patch_size, affine, displacement) -> np.ndarray:
  """(3, *patch) volume coordinates sampled by each patch voxel."""
  offs = [(np.arange(p) - p // 2).reshape([-1 if a == k else 1 for a in range(3)]) for k, p in enumerate(patch_size)]
  a = np.eye(3) if affine is None else affine
  coords = np.empty((3,) + tuple(patch_size), np.float64)
  for k in range(3):
    coords[k] = centre[k] + a[k, 0] * offs[0] + a[k, 1] * offs[1] + a[k, 2] * offs[2]
  if displacement is not None:
    coords += displacement
  return coords


def _resample(image: np.ndarray, labels: np.ndarray, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Image linearly and labels by nearest neighbour (round half up) at `coords`, zero outside.

  Both read a zero-padded crop of the region the coordinates span: every sample then lies inside
  it, so no boundary mode is needed (scipy's grid-constant is a third slower), the labels are a
  plain gather, and the reads stay local in memory.
  """
  flat = coords.reshape(3, -1)
  lo = np.floor(flat.min(axis=1)).astype(np.int64)
  size = np.floor(flat.max(axis=1)).astype(np.int64) + 2 - lo
  local = coords - lo.reshape(3, 1, 1, 1)
  img = ndi.map_coordinates(crop_box(image, lo, size, np.float32), local, output=np.float32, order=1,
                            mode="nearest", prefilter=False)
  local += 0.5
  idx = np.floor(local, out=local).astype(np.intp)
  flat_idx = (idx[0] * size[1] + idx[1]) * size[2] + idx[2]
  lab = crop_box(labels, lo, size, np.asarray(labels).dtype).ravel().take(flat_idx).astype(np.int32)
  return img, lab


# ----------------------------------------------------------------------------- intensity


def _draw_factor(rng: np.random.Generator, lo: float, hi: float) -> float:
  """nnU-Net's draw for contrast and gamma: half the time below 1, half above, so a range like
  (0.7, 1.5) does not favour brightening just because its upper part is wider."""
  if lo < 1 and rng.random() < 0.5:
    return rng.uniform(lo, 1.0)
  return rng.uniform(max(lo, 1.0), hi)


def _gamma(x: np.ndarray, g: float, invert: bool) -> np.ndarray:
  """Gamma on the range-normalised image, then mean and std restored (nnU-Net's retain_stats)."""
  x = -x if invert else x
  mean, std = x.mean(), x.std()
  lo, span = x.min(), x.max() - x.min()
  y = np.power((x - lo) / (span + 1e-7), g) * span + lo
  y = (y - y.mean()) / (y.std() + 1e-7) * std + mean
  return -y if invert else y


def augment_intensity(image: np.ndarray, rng: np.random.Generator, aug) -> np.ndarray:
  """nnU-Net v2's intensity transforms, each with its own probability; returns a new float32 array."""
  x = np.array(image, np.float32)
  if rng.random() < aug.p_noise:
    x += rng.normal(0.0, np.sqrt(rng.uniform(*aug.noise_variance)), x.shape).astype(np.float32)
  if rng.random() < aug.p_blur:
    x = ndi.gaussian_filter(x, [rng.uniform(*aug.blur_sigma) for _ in range(3)], mode="nearest")
  if rng.random() < aug.p_brightness:
    x *= np.float32(rng.uniform(*aug.brightness_range))
  if rng.random() < aug.p_contrast:
    lo, hi, mean = x.min(), x.max(), x.mean()
    x = np.clip((x - mean) * np.float32(_draw_factor(rng, *aug.contrast_range)) + mean, lo, hi)
  if rng.random() < aug.p_lowres:
    zoom = rng.uniform(*aug.lowres_zoom)
    small = tuple(max(1, int(round(n * zoom))) for n in x.shape)
    x = _resize_linear(_resize_nearest(x, small), x.shape)
  if rng.random() < aug.p_gamma_invert:
    x = _gamma(x, _draw_factor(rng, *aug.gamma_range), invert=True)
  if rng.random() < aug.p_gamma:
    x = _gamma(x, _draw_factor(rng, *aug.gamma_range), invert=False)
  return np.ascontiguousarray(x, dtype=np.float32)


# ----------------------------------------------------------------------------- patches


def extract_patch(image: np.ndarray, labels: np.ndarray, centre, patch_size, spacing, rng: np.random.Generator,
                  aug_cfg=None, lr_swap: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Patch at `centre` with augmentation: spatial (one resampling pass, or exact slicing when none
  is drawn), then mirroring (axis 2 also maps labels through lr_swap), then intensity on the image.

  aug_cfg None or not `enabled` gives the plain patch. Returns (float32, int32) arrays of patch_size.
  """
  centre = np.asarray(centre, np.int64)
  patch_size = tuple(int(p) for p in patch_size)
  use_aug = aug_cfg is not None and aug_cfg.get("enabled", True)
  affine = displacement = None
  if use_aug:
    affine = draw_affine(rng, aug_cfg, spacing)
    if rng.random() < aug_cfg.p_elastic:
      displacement = elastic_displacement(patch_size, spacing, rng, aug_cfg.elastic_sigma_mm,
                                          aug_cfg.elastic_magnitude_mm)
  if affine is None and displacement is None:
    start = centre - np.asarray(patch_size) // 2
    img = crop_box(image, start, patch_size, np.float32)
    lab = crop_box(labels, start, patch_size, np.int32)
  else:
    img, lab = _resample(image, labels, sampling_coords(centre, patch_size, affine, displacement))
  if use_aug:
    for axis in aug_cfg.mirror_axes:
      if rng.random() < aug_cfg.p_mirror:
        img, lab = np.flip(img, axis), np.flip(lab, axis)
        if axis == 2 and lr_swap is not None:
          lab = np.asarray(lr_swap, np.int32)[lab]
    img = augment_intensity(img, rng, aug_cfg)
  return np.ascontiguousarray(img, np.float32), np.ascontiguousarray(lab, np.int32)


def dataset_class_weights(records, power: float = 1.0) -> dict[int, float]:
  """{class: 1 / (number of records whose `class_locations` hold it) ** power}. Drawn with these
  weights within a volume, a class found in few volumes gets more of those volumes' foreground
  patches (a class in a quarter of the volumes, beside one in all, power 1: 1/5 of all foreground
  patches instead of 1/8)."""
  counts: dict[int, int] = {}
  for record in records:
    for c, locs in record["class_locations"].items():
      if c > 0 and len(locs):
        counts[c] = counts.get(c, 0) + 1
  return {c: float(n) ** -float(power) for c, n in counts.items()}


def sample_training_patch(volume: dict, rng: np.random.Generator, cfg, lr_swap: np.ndarray | None = None,
                          class_weights: dict | None = None) -> dict:
  """One training element from a volume record {image, labels, spacing?, class_locations?}:
  foreground with probability cfg.foreground_fraction, then centre (class drawn with
  `class_weights` if given), extraction, augmentation.
  Returns {image: (px, py, pz, 1) float32, labels: (px, py, pz) int32}."""
  labels = volume["labels"]
  foreground = rng.random() < cfg.foreground_fraction
  locs = volume.get("class_locations")
  if foreground and locs is None:
    locs = class_locations(labels, cfg.get("max_per_class", DEFAULT_MAX_PER_CLASS), rng)
  centre = choose_patch_centre(labels, cfg.patch_size, rng, foreground, locs, class_weights)
  spacing = volume.get("spacing")
  spacing = REFERENCE_SPACING if spacing is None else spacing
  image, labels = extract_patch(volume["image"], labels, centre, cfg.patch_size, spacing, rng, cfg.augment, lr_swap)
  return {"image": image[..., None], "labels": labels}


def patch_transform(cfg, lr_swap: np.ndarray | None = None, records=None):
  """`sample_training_patch` as a grain random_map function: fn(volume, rng) -> element. With
  cfg.class_sampling 'dataset', the class weights come from `records` (the training volumes)."""
  mode = cfg.get("class_sampling", "volume")
  if mode not in ("volume", "dataset"):
    raise ValueError(f"patch.class_sampling must be 'volume' or 'dataset', got {mode!r}")
  if mode == "dataset" and records is None:
    raise ValueError("patch.class_sampling='dataset' needs the training records to count classes")
  weights = dataset_class_weights(records, cfg.get("class_weight_power", 1.0)) if mode == "dataset" else None

  def fn(volume, rng):
    return sample_training_patch(volume, rng, cfg, lr_swap, weights)
  return fn

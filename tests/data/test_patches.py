"""3D training patches of data/patches.py: sampling, geometry, augmentation."""
import grain
import numpy as np
import pytest
import scipy.ndimage as ndi

from spine_jax.data import patches

SPACING = (0.75, 0.75, 1.65)


def augment_only(**overrides):
  """Augmentation with every probability 0 except those given."""
  aug = patches.default_augment_config()
  for key in list(aug):
    if key.startswith("p_"):
      aug[key] = 0.0
  aug.update(overrides)
  return aug


def blocks_volume(shape=(48, 56, 24), block=(12, 12, 6), num_classes=6, seed=0):
  """Labels in constant blocks (so interpolation matters only at block faces) and a random image."""
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, num_classes, [-(-n // b) for n, b in zip(shape, block)])
  labels = np.kron(coarse, np.ones(block, np.int64))[: shape[0], : shape[1], : shape[2]].astype(np.uint8)
  return rng.standard_normal(shape).astype(np.float32), labels


def contains_offset(starts, size, voxel):
  return np.all((starts <= voxel) & (voxel < starts + size), axis=-1)


# ----------------------------------------------------------------------------- config


def test_default_config_holds_nnunet_defaults():
  cfg = patches.default_patch_config()
  assert tuple(cfg.patch_size) == (96, 128, 32)
  assert cfg.foreground_fraction == pytest.approx(0.33)
  aug = cfg.augment
  assert aug.p_rotation == 0.2 and aug.p_scale == 0.2 and aug.p_elastic == 0.0
  assert tuple(aug.mirror_axes) == (2,) and aug.p_mirror == 0.5
  assert tuple(aug.scale_range) == (0.8, 1.25) and tuple(aug.gamma_range) == (0.7, 1.5)
  # In-plane (about R) rotation is the wide one.
  np.testing.assert_array_equal(patches._per_axis(aug.rotation_deg), [[-5, 5], [-5, 5], [-15, 15]])
  np.testing.assert_array_equal(patches._per_axis((-15, 15)), [[-15, 15]] * 3)


# ----------------------------------------------------------------------------- plain extraction


@pytest.mark.parametrize("aug", [None, augment_only(mirror_axes=())])
def test_unaugmented_patch_is_slicing_with_zero_padding(aug):
  image, labels = blocks_volume()
  rng = np.random.default_rng(0)
  img, lab = patches.extract_patch(image, labels, (20, 30, 12), (16, 20, 8), SPACING, rng, aug)
  np.testing.assert_array_equal(img, image[12:28, 20:40, 8:16])
  np.testing.assert_array_equal(lab, labels[12:28, 20:40, 8:16])
  assert img.dtype == np.float32 and lab.dtype == np.int32
  # Near the corner: what lies outside the volume reads 0 in both.
  img, lab = patches.extract_patch(image, labels, (2, 54, 1), (16, 20, 8), SPACING, rng, aug)
  np.testing.assert_array_equal(img[6:, :12, 3:], image[:10, 44:, :5])
  np.testing.assert_array_equal(lab[6:, :12, 3:], labels[:10, 44:, :5])
  assert not img[:6].any() and not img[:, 12:].any() and not img[:, :, :3].any()
  assert not lab[:6].any() and not lab[:, 12:].any() and not lab[:, :, :3].any()


def test_identity_resampling_matches_slicing_including_padding():
  image, labels = blocks_volume()
  coords = patches.sampling_coords(np.array([2, 54, 1]), (16, 20, 8), np.eye(3), None)
  img, lab = patches._resample(image, labels, coords)
  ref_img, ref_lab = patches.extract_patch(image, labels, (2, 54, 1), (16, 20, 8), SPACING, None)
  np.testing.assert_array_equal(img, ref_img)
  np.testing.assert_array_equal(lab, ref_lab)


@pytest.mark.parametrize("overrides", [dict(p_rotation=1.0, p_scale=1.0), dict(p_elastic=1.0),
                                       dict(p_rotation=1.0, p_scale=1.0, p_elastic=1.0)])
def test_spatial_transforms_keep_image_and_labels_aligned(overrides):
  _, labels = blocks_volume(num_classes=8)
  image = labels.astype(np.float32)  # the image is its own label map
  aug = augment_only(mirror_axes=(), rotation_deg=(-30, 30), **overrides)
  for seed in range(6):
    img, lab = patches.extract_patch(image, labels, (24, 28, 12), (32, 40, 16), SPACING,
                                     np.random.default_rng(seed), aug)
    assert not np.array_equal(lab, labels[8:40, 8:48, 4:20])  # a transform was applied
    # Linear and nearest sampling differ only where a sample blends different labels: never where
    # the label patch is constant over a voxel's whole neighbourhood (the patch border excluded).
    mismatch = np.rint(img) != lab
    interior = ndi.minimum_filter(lab, 3, mode="constant", cval=-1) == ndi.maximum_filter(lab, 3)
    assert interior.mean() > 0.15 and not mismatch[interior].any()
    assert mismatch.mean() < 0.2


# ----------------------------------------------------------------------------- centres


def test_class_locations_subsample_and_point_at_their_class():
  _, labels = blocks_volume(num_classes=4)
  locs = patches.class_locations(labels, max_per_class=500, rng=0)
  assert set(locs) == set(np.unique(labels)) - {0}
  for c, xyz in locs.items():
    assert xyz.shape == (min(500, int((labels == c).sum())), 3) and xyz.dtype == np.int32
    assert np.all(labels[tuple(xyz.T)] == c)
    assert len(np.unique(xyz, axis=0)) == len(xyz)
  again = patches.class_locations(labels, max_per_class=500, rng=0)
  assert all(np.array_equal(locs[c], again[c]) for c in locs)


def test_every_patch_contains_foreground_when_fraction_is_one():
  labels = np.zeros((80, 80, 30), np.uint8)
  labels[5:8, 70:73, 2:4] = 1
  labels[60:62, 10:12, 25:27] = 2
  volume = {"image": np.zeros(labels.shape, np.float32), "labels": labels, "spacing": SPACING,
            "class_locations": patches.class_locations(labels)}
  cfg = patches.default_patch_config()
  cfg.patch_size, cfg.foreground_fraction, cfg.augment.enabled = (16, 16, 8), 1.0, False
  rng = np.random.default_rng(0)
  for _ in range(200):
    assert patches.sample_training_patch(volume, rng, cfg)["labels"].any()


def test_tiny_class_is_sampled_as_often_as_the_large_ones():
  shape, size = np.array([120, 120, 30]), np.array([16, 16, 8])
  labels = np.zeros(shape, np.uint8)
  labels[:40] = 1  # large
  labels[80:90, 80:90, 10:20] = 3  # medium
  tiny = np.array([110, 10, 25])
  labels[tuple(tiny)] = 2
  locs = patches.class_locations(labels)
  rng = np.random.default_rng(1)
  n = 1200
  centres = np.array([patches.choose_patch_centre(labels, size, rng, True, locs) for _ in range(n)])
  share = contains_offset(centres - size // 2, size, tiny).mean()
  assert abs(share - 1 / 3) < 0.05
  # Foreground patches stay inside the volume.
  starts = centres - size // 2
  assert np.all(starts >= 0) and np.all(starts + size <= shape)


def test_dataset_class_weights_balance_a_class_found_in_few_volumes():
  # Class 2 is in 1 of 4 volumes. Uniform per volume it gets 1/2 of that volume's foreground
  # patches (1/8 overall); weighted 1 : 1/4 against class 1 there, 4/5 of them (1/5 overall).
  common = np.zeros((20, 20, 4), np.uint8)
  common[:10] = 1
  rare = common.copy()
  rare[15:, 15:] = 2
  records = [{"labels": lab, "class_locations": patches.class_locations(lab)} for lab in (common, common, common, rare)]
  weights = patches.dataset_class_weights(records)
  assert weights == {1: 0.25, 2: 1.0}
  assert patches.dataset_class_weights(records, 2.0) == {1: 0.0625, 2: 1.0}
  rng = np.random.default_rng(0)
  for w, expected in ((None, 1 / 8), (weights, 1 / 5)):
    picks = [patches.choose_patch_centre(r["labels"], (4, 4, 4), rng, True, r["class_locations"], w)
             for r in records for _ in range(600)]
    share = np.mean([records[i // 600]["labels"][tuple(c)] == 2 for i, c in enumerate(picks)])
    assert abs(share - expected) < 0.04
  cfg = patches.default_patch_config()
  cfg.class_sampling = "dataset"
  with pytest.raises(ValueError, match="needs the training records"):
    patches.patch_transform(cfg)
  cfg.class_sampling = "global"
  with pytest.raises(ValueError, match="'volume' or 'dataset'"):
    patches.patch_transform(cfg, records=records)


def test_random_centres_are_uniform_and_fraction_zero_ignores_foreground():
  shape, size = np.array([60, 50, 20]), np.array([16, 20, 8])
  labels = np.zeros(shape, np.uint8)
  tiny = np.array([5, 45, 18])
  labels[tuple(tiny)] = 1
  rng = np.random.default_rng(2)
  n = 3000
  starts = np.array([patches.choose_patch_centre(labels, size, rng, False) for _ in range(n)]) - size // 2
  for axis in range(3):
    counts = np.bincount(starts[:, axis], minlength=shape[axis] - size[axis] + 1)
    assert len(counts) == shape[axis] - size[axis] + 1  # never beyond the volume
    expected = n / len(counts)
    assert counts.min() > 0.6 * expected and counts.max() < 1.4 * expected
  # A patch contains the tiny voxel only as often as uniform placement predicts.
  possible = [np.arange(0, n_ - p + 1) for n_, p in zip(shape, size)]
  grid = np.stack(np.meshgrid(*possible, indexing="ij"), -1).reshape(-1, 3)
  expected = contains_offset(grid, size, tiny).mean()
  volume = {"image": np.zeros(shape, np.float32), "labels": labels,
            "class_locations": patches.class_locations(labels)}
  cfg = patches.default_patch_config()
  cfg.patch_size, cfg.foreground_fraction, cfg.augment.enabled = tuple(size), 0.0, False
  share = np.mean([patches.sample_training_patch(volume, rng, cfg)["labels"].any() for _ in range(1000)])
  assert abs(share - expected) < 0.03 and expected < 0.1


def test_volume_smaller_than_the_patch_is_centred_and_padded():
  labels = np.ones((10, 40, 5), np.uint8)
  rng = np.random.default_rng(0)
  for foreground in (False, True):
    centre = patches.choose_patch_centre(labels, (16, 20, 8), rng, foreground)
    assert centre[0] == 8 - 3 and centre[2] == 4 - 1  # pads 3 + 3 and 1 + 2
    _, lab = patches.extract_patch(labels.astype(np.float32), labels, centre, (16, 20, 8), SPACING, rng)
    assert lab.sum() == 10 * 20 * 5
    assert lab[3:13, :, 1:6].all()


# ----------------------------------------------------------------------------- mirroring


def lr_volume():
  """Class 3 = a left-only structure (low R), class 1 = midline; LUT swaps 3 <-> 4."""
  labels = np.zeros((20, 24, 16), np.uint8)
  labels[4:16, 4:20, 7:9] = 1
  labels[6:10, 8:12, 1:4] = 3
  lut = np.array([0, 1, 2, 4, 3, 5])
  return labels.astype(np.float32), labels, lut


def test_mirroring_the_lr_axis_swaps_left_and_right_classes():
  image, labels, lut = lr_volume()
  centre, size = (10, 12, 8), (20, 24, 16)
  aug = augment_only(mirror_axes=(2,), p_mirror=1.0)
  img, lab = patches.extract_patch(image, labels, centre, size, SPACING, np.random.default_rng(0), aug, lr_swap=lut)
  assert not (lab == 3).any()
  assert (lab == 4).sum() == (labels == 3).sum()
  assert (lab[6:10, 8:12, 12:15] == 4).all() and not (lab[..., :8] == 4).any()  # now a right one, on the right
  np.testing.assert_array_equal(lab, lut[labels[:, :, ::-1]])
  np.testing.assert_array_equal(img, image[:, :, ::-1])  # the image is flipped, not relabelled


def test_mirroring_other_axes_flips_without_swapping():
  image, labels, lut = lr_volume()
  aug = augment_only(mirror_axes=(0, 1), p_mirror=1.0)
  _, lab = patches.extract_patch(image, labels, (10, 12, 8), (20, 24, 16), SPACING, np.random.default_rng(0),
                                 aug, lr_swap=lut)
  np.testing.assert_array_equal(lab, labels[::-1, ::-1])


def test_default_mirroring_flips_about_half_the_time():
  image, labels, lut = lr_volume()
  aug = augment_only(mirror_axes=(2,), p_mirror=0.5)
  flipped = 0
  for seed in range(60):
    _, lab = patches.extract_patch(image, labels, (10, 12, 8), (20, 24, 16), SPACING, np.random.default_rng(seed),
                                   aug, lr_swap=lut)
    if np.array_equal(lab, lut[labels[:, :, ::-1]]):
      flipped += 1
    else:
      np.testing.assert_array_equal(lab, labels)
  assert 15 < flipped < 45


# ----------------------------------------------------------------------------- rotation in mm


def fixed_rotation(degrees):
  return augment_only(mirror_axes=(), p_rotation=1.0, rotation_deg=tuple((a, a) for a in degrees))


def test_rotating_a_sphere_in_mm_keeps_it_a_sphere():
  shape, radius = np.array([80, 80, 36]), 15.0
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
  mm = (grid - shape // 2) * SPACING
  labels = (np.linalg.norm(mm, axis=-1) <= radius).astype(np.uint8)
  image = labels.astype(np.float32)
  analytic = 4 / 3 * np.pi * radius**3
  voxel_mm3 = np.prod(SPACING)
  assert labels.sum() * voxel_mm3 == pytest.approx(analytic, rel=0.02)
  _, lab = patches.extract_patch(image, labels, shape // 2, tuple(shape), SPACING, np.random.default_rng(0),
                                 fixed_rotation((20, 30, 40)))
  assert lab.sum() * voxel_mm3 == pytest.approx(analytic, rel=0.03)
  points = (np.argwhere(lab) - shape // 2) * SPACING
  centred = points - points.mean(0)
  eig = np.linalg.eigvalsh(centred.T @ centred / len(points))
  assert eig.max() / eig.min() < 1.05  # a voxel-space rotation would give an ellipsoid here
  assert np.abs(points.mean(0)).max() < 0.5


def marker_position(labels, shape, degrees, centre):
  """Offset of the marker's centroid from the patch centre, checked to agree in image and labels."""
  img, lab = patches.extract_patch(labels.astype(np.float32), labels, centre, shape, SPACING,
                                   np.random.default_rng(0), fixed_rotation(degrees))
  position = np.argwhere(lab).mean(0)
  np.testing.assert_allclose(np.average(np.indices(shape).reshape(3, -1), axis=1, weights=img.ravel()), position,
                             atol=0.5)
  return position - np.asarray(shape) // 2


def test_ninety_degree_rotations_move_a_marker_as_documented():
  shape = (40, 40, 20)
  centre = np.array([20, 20, 10])
  labels = np.zeros(shape, np.uint8)
  labels[tuple(centre + [10, 0, 0])] = 1
  # In-plane, about R: patch offset o samples volume offset R·o, so volume +10 P shows at -10 I.
  np.testing.assert_allclose(marker_position(labels, shape, (0, 0, 90), centre), [0, -10, 0], atol=1e-6)
  # Out of plane, about P: 5 voxels along R are 8.25 mm, i.e. 11 voxels along I.
  labels[:] = 0
  labels[tuple(centre + [0, 0, 5])] = 1
  np.testing.assert_allclose(marker_position(labels, shape, (90, 0, 0), centre), [0, 11, 0], atol=1e-6)


def test_scaling_above_one_shows_a_larger_region():
  labels = np.zeros((40, 40, 20), np.uint8)
  labels[20, 30, 10] = 1
  aug = augment_only(mirror_axes=(), p_scale=1.0, scale_range=(2.0, 2.0))
  _, lab = patches.extract_patch(labels.astype(np.float32), labels, (20, 20, 10), (40, 40, 20), SPACING,
                                 np.random.default_rng(0), aug)
  np.testing.assert_allclose(np.argwhere(lab).mean(0), [20, 25, 10])


def test_elastic_displacement_is_smooth_and_bounded():
  shape = (32, 40, 16)
  disp = patches.elastic_displacement(shape, SPACING, np.random.default_rng(0), (10.0, 10.0), (3.0, 3.0))
  assert disp.shape == (3,) + shape and disp.dtype == np.float32
  bound = 3.0 / np.asarray(SPACING)
  assert np.all(np.abs(disp).max(axis=(1, 2, 3)) <= bound + 1e-5)
  assert np.all(np.abs(disp).max(axis=(1, 2, 3)) > 0.5 * bound)
  assert np.abs(np.diff(disp, axis=1)).max() < 0.5  # neighbouring voxels move together


# ----------------------------------------------------------------------------- intensity, determinism


def all_on():
  aug = patches.default_augment_config()
  for key in list(aug):
    if key.startswith("p_"):
      aug[key] = 1.0
  return aug


def test_intensity_transforms_change_the_image_only():
  image, labels = blocks_volume()
  aug = all_on()
  aug.p_rotation = aug.p_scale = aug.p_elastic = 0.0
  aug.mirror_axes = ()
  img, lab = patches.extract_patch(image, labels, (24, 28, 12), (32, 40, 16), SPACING, np.random.default_rng(0), aug)
  np.testing.assert_array_equal(lab, labels[8:40, 8:48, 4:20])
  assert img.dtype == np.float32 and np.isfinite(img).all()
  assert not np.allclose(img, image[8:40, 8:48, 4:20])


def test_contrast_keeps_the_range_and_gamma_keeps_mean_and_std():
  x = np.random.default_rng(0).standard_normal((16, 16, 8)).astype(np.float32)
  for seed in range(5):
    y = patches.augment_intensity(x, np.random.default_rng(seed), augment_only(p_contrast=1.0))
    assert y.min() >= x.min() and y.max() <= x.max() and not np.array_equal(x, y)
    for key in ("p_gamma", "p_gamma_invert"):
      y = patches.augment_intensity(x, np.random.default_rng(seed), augment_only(**{key: 1.0}))
      assert y.mean() == pytest.approx(x.mean(), abs=1e-4) and y.std() == pytest.approx(x.std(), rel=1e-4)
  lowres = patches.augment_intensity(x, np.random.default_rng(0), augment_only(p_lowres=1.0, lowres_zoom=(0.5, 0.5)))
  assert lowres.shape == x.shape and lowres.dtype == np.float32 and not np.array_equal(lowres, x)


def test_same_seed_same_patch():
  image, labels = blocks_volume()
  volume = {"image": image, "labels": labels, "spacing": SPACING, "class_locations": patches.class_locations(labels)}
  cfg = patches.default_patch_config()
  cfg.patch_size = (24, 32, 12)
  cfg.augment = all_on()
  lut = np.array([0, 1, 3, 2, 5, 4])
  a = patches.sample_training_patch(volume, np.random.default_rng(7), cfg, lut)
  b = patches.sample_training_patch(volume, np.random.default_rng(7), cfg, lut)
  c = patches.sample_training_patch(volume, np.random.default_rng(8), cfg, lut)
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["labels"], b["labels"])
  assert not np.array_equal(a["image"], c["image"])
  assert a["image"].shape == (24, 32, 12, 1) and a["image"].dtype == np.float32
  assert a["labels"].shape == (24, 32, 12) and a["labels"].dtype == np.int32


def test_grain_random_map_is_reproducible():
  image, labels = blocks_volume()
  volume = {"image": image, "labels": labels, "spacing": SPACING, "class_locations": patches.class_locations(labels)}
  cfg = patches.default_patch_config()
  cfg.patch_size = (16, 16, 8)
  ds = grain.MapDataset.source([volume]).repeat(6).random_map(patches.patch_transform(cfg), seed=3)
  first, again = [ds[i] for i in range(6)], [ds[i] for i in range(6)]
  for x, y in zip(first, again):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["labels"], y["labels"])
  assert len({x["image"].tobytes() for x in first}) == 6

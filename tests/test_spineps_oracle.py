"""The SPINEPS oracle harness (tests/spineps_oracle.py) works: arrays go to SPINEPS 2.1.3's environment and
back unchanged, errors come back as RuntimeError, the TPTBox test MRI and NII.rescale answer as TPTBox does.
Skips when the environment is absent (bash scripts/spineps_env.sh makes it)."""
import time

import numpy as np
import pytest

from tests import spineps_oracle

# Ids that SPINEPS' semantic masks use (spine_jax.data.spine_labels names them): sacrum 26, vertebra
# subregions 41-49, spinal cord 60, spinal canal 61, endplate 62, disc 100.
SPINEPS_SEMANTIC_IDS = {26, *range(41, 50), 60, 61, 62, 100}


@pytest.fixture(scope="module", autouse=True)
def oracle():
  reason = spineps_oracle.available()
  if reason:
    pytest.skip(reason)


def test_round_trip_keeps_arrays_bit_for_bit():
  rng = np.random.default_rng(0)
  arrays = {"f32": rng.normal(size=(3, 4, 5)).astype(np.float32), "u8": rng.integers(0, 255, (7,), np.uint8),
            "i64": np.arange(-3, 3, dtype=np.int64).reshape(2, 3), "f64": np.array(np.pi), "b": np.array([True, False])}
  start = time.perf_counter()
  out = spineps_oracle.call("worker.echo", arrays, scale=[1.5, 2])
  print(f"one oracle call (worker.echo, numpy only): {time.perf_counter() - start:.2f} s")
  assert set(out) == {*arrays, "scale"}
  for key, value in arrays.items():
    assert out[key].dtype == value.dtype and out[key].shape == value.shape
    np.testing.assert_array_equal(out[key], value)
  np.testing.assert_array_equal(out["scale"], [1.5, 2])


def test_library_functions_by_dotted_name():
  mask = np.zeros((7, 7, 7), np.uint8)
  mask[3, 3, 3] = 2
  mask[0, 0, 0] = 1
  volume = spineps_oracle.call("TPTBox.core.np_utils.np_volume", {"arr": mask})  # a dict result keeps its keys
  assert {k: v.item() for k, v in volume.items()} == {"1": 1, "2": 1}
  dilated = spineps_oracle.call("TPTBox.core.np_utils.np_dilate_msk", {"arr": mask}, label_ref=2, n_pixel=1,
                                connectivity=1)["out"]
  assert dilated.dtype == mask.dtype and dilated.shape == mask.shape
  assert np.count_nonzero(dilated == 2) == 7 and dilated[0, 0, 0] == 1  # a 6-neighbourhood cross, label 1 kept


def test_worker_errors_come_back_as_one_runtime_error():
  with pytest.raises(RuntimeError, match="(?s)worker.rescale failed.*Traceback.*TypeError.*no_such_argument"):
    spineps_oracle.call("worker.rescale", {"arr": np.zeros((2, 2, 2))}, no_such_argument=1)
  with pytest.raises(RuntimeError, match="functions in"):
    spineps_oracle.call("numpy.zeros", {})


def test_test_mri_is_a_t2w_with_spineps_masks():
  start = time.perf_counter()
  mri = spineps_oracle.call("worker.test_mri", {})
  print(f"one oracle call (worker.test_mri, TPTBox): {time.perf_counter() - start:.2f} s")
  image, affine, semantic, instance = mri["image"], mri["affine"], mri["semantic"], mri["instance"]
  assert image.ndim == 3 and affine.shape == (4, 4)
  assert semantic.shape == instance.shape == image.shape
  np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), mri["zoom"], rtol=1e-5)
  labels = set(np.unique(semantic).tolist()) - {0}
  print("test MRI:", image.shape, image.dtype, "zoom", mri["zoom"].tolist(), "semantic ids", sorted(labels),
        "instance ids", sorted(set(np.unique(instance).tolist()) - {0}))
  assert labels <= SPINEPS_SEMANTIC_IDS, labels - SPINEPS_SEMANTIC_IDS
  # What tptbox 1.1.0 ships: a 68x52x67 crop at 1.5 mm around C5-C7 (the file's label-6), PIR.
  assert image.shape == (68, 52, 67) and mri["label"].item() == 6
  assert labels == {*range(41, 50), 60, 61, 62, 100}
  assert set(np.unique(instance).tolist()) - {0} == {5, 6, 7, 105, 106, 205, 206, 207}


@pytest.mark.parametrize("seg", [False, True])
def test_rescale_returns_tptbox_shape_and_grid(seg):
  rng = np.random.default_rng(1)
  shape, zoom, target = (10, 12, 7), (1.0, 0.8, 2.5), (0.9, 1.0, 1.0)
  arr = rng.integers(0, 5, shape).astype(np.uint8) if seg else rng.normal(size=shape).astype(np.float32)
  affine = np.diag([*zoom, 1.0])
  affine[:3, 3] = [4.0, -2.0, 7.5]
  out = spineps_oracle.call("worker.rescale", {"arr": arr, "affine": affine}, voxel_spacing=list(target), seg=seg)
  # TPTBox: new shape = rint(shape * zoom / spacing); voxel (0, 0, 0) keeps its world position.
  expected = tuple(int(v) for v in np.rint(np.multiply(shape, zoom) / target))
  assert out["array"].shape == expected
  assert out["array"].dtype == arr.dtype
  np.testing.assert_allclose(np.linalg.norm(out["affine"][:3, :3], axis=0), target)
  np.testing.assert_allclose(out["affine"][:3, 3], affine[:3, 3])
  if seg:  # order 0: labels only, no new values
    assert set(np.unique(out["array"]).tolist()) <= set(np.unique(arr).tolist())

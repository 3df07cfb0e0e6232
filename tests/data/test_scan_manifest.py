"""Segmentation manifests (image, semantic[, instance][, split]) and their model-space volumes."""
import numpy as np
import pytest

from configs import semantic as semantic_config
from spine_jax.data import manifest
from spine_jax.data import spine_labels
from spine_jax.data import volumes
from spine_jax.data.phantoms import mri


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  out = tmp_path_factory.mktemp("mri")
  cfg = mri.default_mri_phantom_config()
  return out, mri.write_mri_phantom_nifti(out, 2, seed=5, axcodes=("L", "P", "S"), cfg=cfg)


def test_manifest_volumes_match_the_phantom_arrays(written):
  out, info = written
  records = manifest.read_scan_manifest(info["manifest"])
  assert len(records) == 2 and records[0].instance is not None
  config = semantic_config.get_config("smoke")
  config.data.source = "manifest"
  config.data.manifest = str(info["manifest"])
  vols = volumes.load_split(config.data, "train", num_workers=1)
  assert len(vols) == 2
  for vol in vols:
    assert vol.image.dtype == np.float32 and abs(float(vol.image.mean())) < 1e-3  # z-scored
    assert set(np.unique(vol.labels)) <= set(range(spine_labels.NUM_CLASSES))
    assert vol.class_locations and all(v.shape[1] == 3 for v in vol.class_locations.values())
    assert vol.model_space.axcodes == ("P", "I", "R")


@pytest.mark.parametrize("text, message", [
    ("image,split\na.nii.gz,train\n", "missing column"),
    ("image,semantic\n", "empty manifest"),
    ("image,semantic\nmissing.nii.gz,missing_seg.nii.gz\n", "row 1 .*'image'.*file not found"),
])
def test_bad_scan_manifests_are_named(tmp_path, text, message):
  path = tmp_path / "scans.csv"
  path.write_text(text)
  with pytest.raises(manifest.ManifestError, match=message):
    manifest.read_scan_manifest(path)


def test_unknown_labels_name_the_mask(written, tmp_path):
  out, info = written
  import nibabel as nib
  rec = manifest.read_scan_manifest(info["manifest"])[0]
  img = nib.load(str(rec.semantic))
  data = np.asarray(img.dataobj).copy()
  data[0, 0, 0] = 7
  bad = tmp_path / "bad_seg.nii.gz"
  nib.save(nib.Nifti1Image(data, img.affine), str(bad))
  (tmp_path / "scans.csv").write_text(f"image,semantic\n{rec.image},{bad}\n")
  config = semantic_config.get_config("smoke")
  config.data.source, config.data.manifest = "manifest", str(tmp_path / "scans.csv")
  with pytest.raises(spine_labels.LabelError, match=r"labels \[7\]"):
    volumes.load_split(config.data, "train", num_workers=1)

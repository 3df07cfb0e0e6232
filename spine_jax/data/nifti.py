"""NIfTI files for the CT and MRI code: strict loading, reorientation and back, atomic writes.

Every fault in an input file is a NiftiError whose message names the file and the fault, so a
user with hundreds of scans finds the bad one at once. Every file this project writes goes
through the atomic writers here: a crash or a full disk never leaves a half-written result.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import shutil
import tempfile

import nibabel as nib
import numpy as np

RAS = ('R', 'A', 'S')

# Read once: files from mkstemp are private (0600); results should get the user's usual mode.
_UMASK = os.umask(0)
os.umask(_UMASK)


class NiftiError(ValueError):
  """A NIfTI file is missing, unreadable or unusable; the message names the file and the fault, on one line."""

  def __init__(self, message: str):
    super().__init__(" ".join(str(message).split()))  # nibabel's and zlib's own messages may span lines


def spacing_from_affine(affine: np.ndarray) -> np.ndarray:
  """Voxel size (mm) along each array axis: the lengths of the affine's columns."""
  return np.sqrt(np.square(np.asarray(affine, np.float64)[:3, :3]).sum(axis=0))


def _one_line(matrix) -> str:
  """A matrix as one line of text (error messages are one line each)."""
  return str(np.round(np.asarray(matrix, np.float64), 4).tolist())


def check_affine(path, affine: np.ndarray) -> None:
  """Raise NiftiError naming `path` unless `affine` is a finite, non-singular 4x4 with positive spacing."""
  if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
    raise NiftiError(f'{path}: affine is not a finite 4x4 matrix: {_one_line(affine)}')
  spacing = spacing_from_affine(affine)
  if np.any(spacing <= 0) or not np.all(np.isfinite(spacing)):
    raise NiftiError(f'{path}: voxel spacing {spacing.tolist()} mm (from the affine) must be positive')
  # Collinear axes: the volume of the voxel is tiny compared with the product of its sides.
  if abs(np.linalg.det(affine[:3, :3])) < 1e-6 * np.prod(spacing):
    raise NiftiError(f'{path}: singular affine (voxel axes are not independent): {_one_line(affine)}')


def _read(path, dtype) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
  path = pathlib.Path(path)
  if not path.exists():
    raise NiftiError(f'{path}: file not found')
  if not path.is_file():
    raise NiftiError(f'{path}: not a regular file')
  try:
    with nib.imageglobals.LoggingOutputSuppressor():  # its header fixes are ours to report, as errors
      img = nib.load(str(path))
    if not isinstance(img, nib.spatialimages.SpatialImage):
      raise TypeError(f'{type(img).__name__} is not a spatial image')
    _check_claimed_size(path, img)
    array = np.asarray(img.dataobj, dtype=dtype)
  except NiftiError:
    raise
  except MemoryError as e:
    raise NiftiError(f'{path}: its {tuple(img.shape)} voxels do not fit in this machine\'s free memory') from e
  except Exception as e:  # nibabel, gzip and zlib raise many types for one fault: a bad file.
    raise NiftiError(f'{path}: unreadable, corrupt or truncated image file ({type(e).__name__}: {e})') from e
  while array.ndim > 3 and array.shape[-1] == 1:  # (X, Y, Z, 1) as some converters write 3D scans.
    array = array[..., 0]
  if array.ndim != 3:
    raise NiftiError(f'{path}: expected a 3D volume, got shape {array.shape}')
  affine = np.asarray(img.affine, np.float64)
  _check_header_zooms(path, img)
  check_affine(path, affine)
  return array, affine, img.header


# Deflate expands at most 1032:1, so a .gz file of n bytes holds at most about 1032 n bytes.
_MAX_GZIP_RATIO = 1032


def _check_claimed_size(path, img) -> None:
  """Refuse a header whose shape needs more voxel bytes than the file can hold (before allocating them)."""
  shape = tuple(int(n) for n in img.shape)
  needed = int(np.prod(shape, dtype=np.float64)) * np.dtype(img.get_data_dtype()).itemsize
  size = path.stat().st_size
  compressed = path.name.lower().endswith('.gz')
  room = size * _MAX_GZIP_RATIO if compressed else size - int(getattr(img.dataobj, 'offset', 0))
  if needed > room:
    raise NiftiError(f'{path}: header claims shape {shape} ({needed / 2**20:,.1f} MiB of voxels), more than '
                     f'the {size:,}-byte file {"can hold" if compressed else "holds"}: truncated or a corrupt header')


def _check_header_zooms(path, img) -> None:
  """Reject zero, negative or NaN voxel sizes in the raw header when the affine is built from them.

  Without an sform the affine comes from pixdim, which nibabel silently 'fixes' (0 -> 1) on
  load: the scan would then be read with a made-up geometry.
  """
  if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)) or int(img.header['sform_code']) > 0:
    return
  try:
    with nib.openers.ImageOpener(str(path)) as f:
      raw = type(img.header).from_fileobj(f, check=False)
  except Exception as e:  # the same file just loaded; a failure here is still a bad file
    raise NiftiError(f'{path}: unreadable header ({type(e).__name__}: {e})') from e
  zooms = np.asarray(raw['pixdim'][1:4], np.float64)
  if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
    raise NiftiError(f'{path}: voxel spacing (header pixdim) {zooms.tolist()} mm must be positive')


def load_nifti(path) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
  """(float32 3D array with scaling applied, (4, 4) float64 affine, header) of an image file."""
  array, affine, header = _read(path, np.float32)
  if not np.all(np.isfinite(array)):
    bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
    raise NiftiError(f'{path}: {bad} NaN or infinite voxel value(s)')
  return array, affine, header


def load_mask(path) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
  """(int32 3D label array, affine, header); labels stored as floats must be whole numbers."""
  array, affine, header = _read(path, None)
  if not np.issubdtype(array.dtype, np.integer):
    if not np.all(np.isfinite(array)):
      raise NiftiError(f'{path}: label mask has NaN or infinite values')
    rounded = np.rint(array)
    if np.any(np.abs(array - rounded) > 1e-3):
      raise NiftiError(f'{path}: label mask has non-integer values (is it an image rather than a mask?)')
    array = rounded
  if array.size and array.min() < 0:
    raise NiftiError(f'{path}: label mask has negative values (down to {array.min():g}); is it an image rather '
                     f'than a mask?')
  if array.size and array.max() > np.iinfo(np.int32).max:
    raise NiftiError(f'{path}: label values outside the int32 range')
  return array.astype(np.int32), affine, header


def check_same_grid(image_path, image_affine, image_shape, mask_path, mask_affine, mask_shape,
                    atol: float = 1e-3) -> None:
  """Raise NiftiError naming both files unless the mask lies voxel for voxel on the image's grid."""
  image_shape, mask_shape = tuple(image_shape)[:3], tuple(mask_shape)[:3]
  if image_shape != mask_shape:
    raise NiftiError(f'mask {mask_path} has shape {mask_shape} but image {image_path} has shape {image_shape}')
  image_affine, mask_affine = np.asarray(image_affine, np.float64), np.asarray(mask_affine, np.float64)
  if not np.allclose(image_affine, mask_affine, rtol=0.0, atol=atol):
    diff = float(np.abs(image_affine - mask_affine).max())
    raise NiftiError(f'mask {mask_path} and image {image_path} have different affines (largest difference '
                     f'{diff:.4g} > {atol}): image {_one_line(image_affine)}, mask {_one_line(mask_affine)}')


@dataclasses.dataclass(frozen=True)
class Reorientation:
  """What undoes a reorientation exactly: the orientations before and after, the original grid."""
  start: np.ndarray  # (3, 2) nibabel orientation of the original array axes.
  end: np.ndarray  # (3, 2) orientation after reorienting.
  shape: tuple  # original spatial shape.
  affine: np.ndarray  # original affine.

  @property
  def identity(self) -> bool:
    return bool(np.array_equal(self.start, self.end))


def reorient(array: np.ndarray, affine: np.ndarray, axcodes=RAS) -> tuple[np.ndarray, np.ndarray, Reorientation]:
  """Permute/flip the first three axes to `axcodes` (e.g. RAS, PIR): (array, new affine, undo info).

  Only axis permutations and flips (no resampling), so the voxel values are untouched and
  `undo_reorientation` gives back the input exactly. Extra trailing axes (channels) follow along.
  """
  array = np.asarray(array)
  affine = np.asarray(affine, np.float64)
  start = nib.orientations.io_orientation(affine)
  end = nib.orientations.axcodes2ornt(tuple(axcodes))
  transform = nib.orientations.ornt_transform(start, end)
  out = np.ascontiguousarray(nib.orientations.apply_orientation(array, transform))
  new_affine = affine @ nib.orientations.inv_ornt_aff(transform, array.shape[:3])
  return out, new_affine, Reorientation(start, end, tuple(array.shape[:3]), affine.copy())


def undo_reorientation(array: np.ndarray, reorientation: Reorientation) -> np.ndarray:
  """An array on the reoriented grid back on the original one (the original affine is reorientation.affine)."""
  transform = nib.orientations.ornt_transform(reorientation.end, reorientation.start)
  out = np.ascontiguousarray(nib.orientations.apply_orientation(np.asarray(array), transform))
  if out.shape[:3] != reorientation.shape:
    raise ValueError(f'array of shape {np.shape(array)} does not come from a grid of shape {reorientation.shape}')
  return out


def to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, Reorientation]:
  """Closest canonical (RAS) orientation: axis 0 runs to the patient's Right, 1 Anterior, 2 Superior."""
  return reorient(array, affine, RAS)


def from_canonical(array: np.ndarray, reorientation: Reorientation) -> np.ndarray:
  """Inverse of `to_canonical`."""
  return undo_reorientation(array, reorientation)


@dataclasses.dataclass(frozen=True)
class ImageAndMask:
  """An image and its label mask, checked to share a grid, both reoriented to `axcodes`."""
  image: np.ndarray  # float32
  mask: np.ndarray  # int32
  affine: np.ndarray  # affine of the reoriented grid
  spacing: np.ndarray  # (3,) mm along the reoriented axes
  reorientation: Reorientation
  header: nib.Nifti1Header  # the image's header


def load_image_and_mask(image_path, mask_path, axcodes=RAS, atol: float = 1e-3) -> ImageAndMask:
  """Load a scan and its mask, check they share a grid, reorient both (RAS by default)."""
  image, image_affine, header = load_nifti(image_path)
  mask, mask_affine, _ = load_mask(mask_path)
  check_same_grid(image_path, image_affine, image.shape, mask_path, mask_affine, mask.shape, atol)
  image, affine, reo = reorient(image, image_affine, axcodes)
  mask, _, _ = reorient(mask, image_affine, axcodes)
  return ImageAndMask(image, mask, affine, spacing_from_affine(affine), reo, header)


NIFTI_SUFFIXES = ('.nii.gz', '.nii')  # longest first: what a file name ends in, lower case


def _nifti_suffix(path: pathlib.Path) -> str:
  name = path.name.lower()
  for suffix in NIFTI_SUFFIXES:
    if name.endswith(suffix):
      return suffix
  raise NiftiError(f'{path}: a NIfTI file name must end in .nii or .nii.gz')


@contextlib.contextmanager
def _atomic_target(path, suffix: str = ''):
  """Yield a temporary path beside `path`; on success fsync and rename it over `path`, else delete it."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix=f'.tmp{suffix}', dir=path.parent)
  os.close(fd)
  try:
    yield pathlib.Path(tmp)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_UMASK
    os.chmod(tmp, mode)
    with open(tmp, 'rb') as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def atomic_write_bytes(path, data: bytes) -> None:
  """Write `data` to `path` all at once: readers see the old file or the new one, never a part."""
  data = memoryview(data)
  with _atomic_target(path) as tmp:
    with open(tmp, 'wb') as f:
      f.write(data)


def atomic_write_text(path, text: str, encoding: str = 'utf-8') -> None:
  """Text version of `atomic_write_bytes` (no newline translation)."""
  atomic_write_bytes(path, text.encode(encoding))


def atomic_save_nifti(array: np.ndarray, affine: np.ndarray, path, header=None, dtype=None,
                      description: str | None = None) -> None:
  """Save a 3D (or 4D) array as .nii / .nii.gz atomically; `description` (at most 80 ASCII characters)
  goes to the header's `descrip`.

  The on-disk type is `dtype`, else the array's own (bool -> uint8, int64 -> the smallest type
  that holds the values), even when `header` comes from a file of another type: a float map
  written with a CT's int16 header would otherwise be silently quantised.
  """
  path = pathlib.Path(path)
  suffix = _nifti_suffix(path)
  array = np.asarray(array)
  if array.dtype == bool:
    array = array.astype(np.uint8)
  if dtype is None:
    dtype = 'compat' if array.dtype in (np.int64, np.uint64) else array.dtype
  header = header.copy() if header is not None else None
  img = nib.Nifti1Image(array, np.asarray(affine, np.float64), header=header, dtype=dtype)
  img.header.set_xyzt_units('mm', 'sec')
  if description is not None:
    img.header['descrip'] = description.encode('ascii')[:80]
  with _atomic_target(path, suffix) as tmp:
    nib.save(img, str(tmp))


def replace_directory(tmp: pathlib.Path, output: pathlib.Path) -> None:
  """Put the finished folder ``tmp`` at ``output`` by renames, moving an old ``output`` aside first and
  deleting it only after, so ``output`` is never half written."""
  tmp, output = pathlib.Path(tmp), pathlib.Path(output)
  if output.exists():
    old = pathlib.Path(tempfile.mkdtemp(prefix=f'.{output.name}.', suffix='.old', dir=output.parent))
    output.rename(old / output.name)
    tmp.rename(output)
    shutil.rmtree(old, ignore_errors=True)
  else:
    tmp.rename(output)

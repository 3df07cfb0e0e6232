"""Batch runs over users' folders: where each input's outputs go, decided for all inputs before any work.

Data sets are folders of folders whose file names repeat (`sub-01/anat/T2w.nii.gz`,
`sub-02/anat/T2w.nii.gz`). Each input keeps its folder relative to the input root under `--output`, as
BIDS derivatives do, so outputs never collide; inputs that would still share an output name (e.g. `a.nii`
and `a.nii.gz` side by side) stop the run before any work, named. Each output set records the SHA-256 of
the input it was made from, so "already done" means done for this input, and outputs made from another
input are never overwritten without `--overwrite`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import tempfile
from typing import Iterable

from spine_jax.data import nifti

# The outputs of a scan, SPINEPS' derivative names after the input's stem (`predict semantic` writes the
# semantic mask and snapshot, `predict spine` all four).
OUTPUT_SUFFIXES = {"semantic": "_seg-spine_msk.nii.gz", "instance": "_seg-vert_msk.nii.gz",
                   "centroids": "_seg-spine_ctd.json", "snapshot": "_seg-spine_snp.png"}
DIGEST_PREFIX = "spine_jax input sha256:"  # NIfTI `descrip` of a mask: 23 + 40 characters of its 80


class BatchError(ValueError):
  """Inputs or outputs that make the whole run impossible (clashing outputs, an output that is a file)."""


def scan_stem(path) -> str:
  """The input's name without .nii / .nii.gz (any case); outputs append BIDS-derivative suffixes to it."""
  name = pathlib.Path(path).name
  for suffix in nifti.NIFTI_SUFFIXES:
    if name.lower().endswith(suffix):
      return name[: -len(suffix)]
  return pathlib.Path(path).stem


def find_scans(path) -> list[pathlib.Path]:
  """A NIfTI file, or every NIfTI in a folder (recursively), skipping our own outputs (`*_seg-*`)."""
  path = pathlib.Path(path)
  if path.is_file():
    return [path]
  if not path.is_dir():
    raise BatchError(f"--input {path}: no such file or folder")
  scans = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(nifti.NIFTI_SUFFIXES)
                 and "_seg-" not in p.name)
  if not scans:
    raise BatchError(f"--input {path}: no .nii or .nii.gz files in this folder or below")
  return scans


def input_root(path) -> pathlib.Path | None:
  """The folder whose layout outputs keep: --input itself when it is a folder, else none."""
  path = pathlib.Path(path)
  return path if path.is_dir() else None


@dataclasses.dataclass(frozen=True)
class Job:
  """One input and where its outputs go: `out_dir / (stem + suffix)`, with `out_dir` = --output / `folder`
  (the input's folder relative to the input root; '.' for an input outside it, or without one)."""
  source: pathlib.Path
  out_dir: pathlib.Path
  stem: str
  folder: pathlib.PurePath = pathlib.PurePath()

  def path(self, suffix: str) -> pathlib.Path:
    return self.out_dir / f"{self.stem}{suffix}"


def check_name(name: str) -> str:
  """A user-given output name stem: a plain file name, so that outputs stay inside --output."""
  text = str(name)
  if not text.strip() or text in (".", "..") or "/" in text or "\\" in text or "\0" in text:
    raise BatchError(f"--name {name!r}: must be a plain file name (no folders, not '.' or '..'), so that outputs "
                     f"stay inside --output")
  return text


def check_output_dir(output, named=None) -> pathlib.Path:
  """--output as a folder that exists (created) and can be written, checked before any work; errors
  name `named` as the --output given (default the folder itself; an output file names the file)."""
  path = pathlib.Path(output)
  shown = f"--output {named if named is not None else path}"
  if path.exists() and not path.is_dir():
    raise BatchError(f"{shown}: is a file, not a folder")
  try:
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass  # a file can be created and removed there
  except OSError as e:
    raise BatchError(f"{shown}: cannot write there ({e.strerror or e})") from None
  return path


def plan_jobs(sources: Iterable[pathlib.Path], output, root=None, name: str | None = None) -> list[Job]:
  """A job per input. An input inside the folder `root` keeps its folder relative to `root` under
  `output`; any other input writes straight into `output`. `name` replaces the stem (one input only).
  Raises BatchError naming the inputs when two would write the same outputs."""
  sources = [pathlib.Path(s) for s in sources]
  output = pathlib.Path(output)
  if name is not None and len(sources) != 1:
    raise BatchError(f"--name is for one input; found {len(sources)}")
  base = pathlib.Path(root).resolve() if root is not None else None
  jobs = []
  for source in sources:
    folder = pathlib.PurePath()
    if base is not None and source.resolve().is_relative_to(base):
      folder = pathlib.PurePath(source.resolve().parent.relative_to(base))
    stem = check_name(name) if name is not None else scan_stem(source)
    jobs.append(Job(source, output / folder, stem, folder))
  seen: dict[tuple[str, str], Job] = {}
  clashes = []
  for job in jobs:
    key = (str(job.out_dir), job.stem.lower())  # case-insensitive file systems see one file
    if key in seen:
      clashes.append(f"{seen[key].source} and {job.source} -> {job.out_dir / job.stem}*")
    else:
      seen[key] = job
  if clashes:
    raise BatchError("inputs would write the same outputs, so nothing was done: " + "; ".join(clashes)
                     + " (rename one, or run them into different --output folders)")
  return jobs


def file_digest(path) -> str:
  """SHA-256 (hex) of a file's bytes: what an output set records of its input."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def nifti_description(digest: str) -> str:
  """The `descrip` header text of a mask made from the input with this digest."""
  return f"{DIGEST_PREFIX}{digest[:40]}"


def mask_input_digest(path) -> str | None:
  """The input digest a mask's header records: None when there is no such file, '' when the file
  records none (another tool's, or unreadable)."""
  import nibabel as nib
  path = pathlib.Path(path)
  if not path.exists():
    return None
  try:
    text = bytes(nib.load(str(path)).header["descrip"]).split(b"\0")[0].decode("ascii", "replace")
  except Exception:  # noqa: BLE001 - an unreadable file records nothing
    return ""
  return text[len(DIGEST_PREFIX):] if text.startswith(DIGEST_PREFIX) else ""


def output_state(paths: Iterable[pathlib.Path], recorded: str | None, digest: str) -> str:
  """What to do with an input's outputs, from the digest recorded in the one that carries it (None:
  that file is absent): 'done' (every output exists, made from this input), 'todo' (nothing there, or
  an incomplete set of this input's) or 'foreign' (made from another input or by another tool: replace
  only with --overwrite)."""
  if recorded is None:
    return "todo"
  if not recorded or not digest.startswith(recorded):
    return "foreign"
  return "done" if all(pathlib.Path(p).exists() for p in paths) else "todo"

"""Batch runs over users' folders: where each input's outputs go, decided for all inputs before any work.

Data sets are folders of folders whose file names repeat (`sub-01/anat/T2w.nii.gz`,
`sub-02/anat/T2w.nii.gz`). Each input keeps its folder relative to the input root under `--output`, as
BIDS derivatives do, so outputs never collide; inputs that would still share an output name (e.g. `a.nii`
and `a.nii.gz` side by side) stop the run before any work, named. Each output set records the SHA-256 of
the input it was made from, so "already done" means done for this input, and outputs made from another
input are never overwritten without `--overwrite`.

`predict spine --output_format=spineps` names a scan's outputs as SPINEPS does (`spineps_outputs`) and puts
them in a `derivatives_seg` folder inside the scan's mirrored folder, where `spineps sample` puts them beside
the scan: with --output the input folder itself, the paths are SPINEPS' own.
"""
from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import tempfile
from typing import Iterable

from spine_jax.data import nifti
from spine_jax.inference import spineps_outputs

# The outputs of a scan, SPINEPS' derivative names after the input's stem (`predict semantic` writes the
# semantic mask and snapshot, `predict spine` all four).
OUTPUT_SUFFIXES = {"semantic": "_seg-spine_msk.nii.gz", "instance": "_seg-vert_msk.nii.gz",
                   "centroids": "_seg-spine_ctd.json", "snapshot": "_seg-spine_snp.png"}
# --output_format: ours (the input's stem + OUTPUT_SUFFIXES, beside each other) or SPINEPS' names and folder.
OUTPUT_FORMATS = ("spine_jax", "spineps")
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


def check_output_format(output_format: str) -> str:
  """`output_format` when it is one of OUTPUT_FORMATS, else a BatchError naming the flag: for callers of the
  API (on the command line the flag's parser refuses other values first)."""
  if output_format not in OUTPUT_FORMATS:
    raise BatchError(f"--output_format {output_format!r}: expected one of {', '.join(OUTPUT_FORMATS)}")
  return output_format


def output_paths(out_dir, stem: str, output_format: str = "spine_jax") -> dict[str, pathlib.Path]:
  """The four outputs of `predict spine` for an input named `stem` (semantic, instance, centroids, snapshot)
  in `out_dir`: `stem` + OUTPUT_SUFFIXES, or SPINEPS' names (`spineps_outputs.output_names`)."""
  if check_output_format(output_format) == "spineps":
    return {key: pathlib.Path(out_dir) / name for key, name in spineps_outputs.output_names(stem).items()}
  return {key: pathlib.Path(out_dir) / f"{stem}{suffix}" for key, suffix in OUTPUT_SUFFIXES.items()}


@dataclasses.dataclass(frozen=True)
class Job:
  """One input and where its outputs go: `out_dir / (stem + suffix)`, with `out_dir` = --output / `folder`
  (the input's folder relative to the input root; '.' for an input outside it, or without one), and in
  the 'spineps' output format `out_dir` = --output / `folder` / derivatives_seg with SPINEPS' names."""
  source: pathlib.Path
  out_dir: pathlib.Path
  stem: str
  folder: pathlib.PurePath = pathlib.PurePath()
  output_format: str = "spine_jax"

  def path(self, suffix: str) -> pathlib.Path:
    return self.out_dir / f"{self.stem}{suffix}"

  def outputs(self) -> dict[str, pathlib.Path]:
    """`predict spine`'s four outputs of this input, in its output format."""
    return output_paths(self.out_dir, self.stem, self.output_format)

  def shown(self) -> str:
    """The outputs in one phrase, for messages."""
    return f"{self.path('')}*" if self.output_format == "spine_jax" else str(self.outputs()["semantic"])


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


def plan_jobs(sources: Iterable[pathlib.Path], output, root=None, name: str | None = None,
              output_format: str = "spine_jax") -> list[Job]:
  """A job per input. An input inside the folder `root` keeps its folder relative to `root` under
  `output`; any other input writes straight into `output` (in the 'spineps' output format, into that
  folder's derivatives_seg). `name` replaces the stem (one input only). Raises BatchError naming the
  inputs when two would write the same outputs."""
  check_output_format(output_format)
  subfolder = spineps_outputs.OUTPUT_FOLDER if output_format == "spineps" else ""
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
    jobs.append(Job(source, output / folder / subfolder, stem, folder, output_format))
  seen: dict[tuple[str, str], Job] = {}
  clashes = []
  for job in jobs:
    # One name for one set of outputs in either format; case-insensitive file systems see one file.
    key = (str(job.out_dir), job.outputs()["semantic"].name.lower())
    if key in seen:
      clashes.append(f"{seen[key].source} and {job.source} -> {job.shown()}")
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

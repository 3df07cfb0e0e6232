"""Users' own CT vertebrae: a CSV or JSON-lines manifest of NIfTI scans, label masks and classes.

One row per vertebra:
  image           CT NIfTI in HU (path relative to the manifest's folder, or absolute)
  mask            vertebra label NIfTI on the same grid
  label           the vertebra's value in the mask
  quality         normal | blastic | mixed | lytic (or 0-3)
  posterolateral  none | unilateral | bilateral (or 0-2)
  split           optional: train | val | test (rows without one are training rows)
  scheme          optional: spineps | totalsegmentator, to name the vertebra's level

Every fault is reported with the manifest, the row and the field, so a long manifest is fixed
in one pass; problems inside the NIfTI files raise nifti.NiftiError naming the file and the row.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import pathlib

import numpy as np

from spine_jax.data import levels as levels_lib
from spine_jax.data import nifti
from spine_jax.data import slices as slices_lib
from spine_jax.data.classes import POSTEROLATERAL_CLASSES, QUALITY_CLASSES

SPLITS = ('train', 'val', 'test')
REQUIRED = ('image', 'mask', 'label', 'quality', 'posterolateral')
OPTIONAL = ('split', 'scheme')


class ManifestError(ValueError):
  """A manifest is missing, empty or has a bad row; the message names the manifest, row and field."""


@dataclasses.dataclass(frozen=True)
class VertebraRecord:
  """One validated manifest row."""
  image: pathlib.Path
  mask: pathlib.Path
  label: int
  quality: int
  posterolateral: int
  split: str | None
  scheme: str | None
  level: str | None  # from scheme and label; None without a scheme
  row: int  # 1-based data row
  line: int  # line of the file where the row starts


def _format(path: pathlib.Path) -> str:
  suffix = path.suffix.lower()
  if suffix == '.csv':
    return 'csv'
  if suffix in ('.jsonl', '.ndjson', '.json'):
    return 'jsonl'
  raise ManifestError(f'{path}: unknown manifest format {suffix!r}; use .csv or .jsonl (JSON lines)')


def _raw_rows(path: pathlib.Path, required=REQUIRED) -> list[tuple[int, int, dict]]:
  """(row, line, fields) of every non-blank row; missing CSV columns are reported here."""
  try:
    text = path.read_text(encoding='utf-8-sig')
  except (OSError, UnicodeDecodeError) as e:
    raise ManifestError(f'{path}: cannot read the manifest ({e})') from e
  rows = []
  if _format(path) == 'csv':
    reader = csv.DictReader(io.StringIO(text, newline=''))
    header = [h.strip() for h in reader.fieldnames or []]
    if not header:
      raise ManifestError(f'{path}: empty manifest (no header and no rows)')
    missing = [c for c in required if c not in header]
    if missing:
      raise ManifestError(f'{path}: missing column(s) {", ".join(missing)}; the header has {", ".join(header)}')
    reader.fieldnames = header
    line = reader.line_num + 1
    for fields in reader:
      if None in fields:
        raise ManifestError(f'{path}, row {len(rows) + 1} (line {line}): more values than columns')
      rows.append((len(rows) + 1, line, {k: (v.strip() if isinstance(v, str) else v) for k, v in fields.items()}))
      line = reader.line_num + 1
    return rows
  for line, content in enumerate(text.splitlines(), start=1):
    if not content.strip():
      continue
    try:
      fields = json.loads(content)
    except json.JSONDecodeError as e:
      raise ManifestError(f'{path}, row {len(rows) + 1} (line {line}): not valid JSON ({e.msg})') from e
    if not isinstance(fields, dict):
      raise ManifestError(f'{path}, row {len(rows) + 1} (line {line}): expected a JSON object, got {content!r}')
    rows.append((len(rows) + 1, line, fields))
  return rows


def _class_index(value, names, where: str, field: str) -> int:
  """A class given by name (any case) or index."""
  if isinstance(value, bool) or value is None:
    raise ManifestError(f'{where}, field {field!r}: unknown class {value!r}; expected one of {", ".join(names)} '
                        f'or 0-{len(names) - 1}')
  text = str(value).strip().lower()
  if text in names:
    return names.index(text)
  if text.isdigit() and int(text) < len(names):
    return int(text)
  raise ManifestError(f'{where}, field {field!r}: unknown class {value!r}; expected one of {", ".join(names)} '
                      f'or 0-{len(names) - 1}')


def _label(value, where: str) -> int:
  try:
    number = float(value)
  except (TypeError, ValueError):
    number = float('nan')
  if isinstance(value, bool) or not np.isfinite(number) or number != int(number) or number < 1:
    raise ManifestError(f"{where}, field 'label': expected a positive whole number, got {value!r}")
  return int(number)


def _file(value, base: pathlib.Path, where: str, field: str) -> pathlib.Path:
  if not isinstance(value, str) or not value.strip():
    raise ManifestError(f'{where}, field {field!r}: expected a file path, got {value!r}')
  path = pathlib.Path(value.strip()).expanduser()
  path = path if path.is_absolute() else base / path
  if not path.is_file():
    raise ManifestError(f'{where}, field {field!r}: file not found: {path}')
  return path


def _optional(fields: dict, key: str):
  value = fields.get(key)
  return None if value is None or (isinstance(value, str) and not value.strip()) else value


def _record(path: pathlib.Path, row: int, line: int, fields: dict) -> VertebraRecord:
  where = f'{path}, row {row} (line {line})'
  for field in REQUIRED:
    if _optional(fields, field) is None:
      raise ManifestError(f'{where}, field {field!r}: missing value')
  base = path.parent
  label = _label(fields['label'], where)
  scheme = _optional(fields, 'scheme')
  level = None
  if scheme is not None:
    try:
      scheme = str(scheme).strip().lower()
      level = levels_lib.label_to_level(label, scheme)
    except levels_lib.LevelError as e:
      raise ManifestError(f"{where}, field 'scheme'/'label': {e}") from e
  split = _optional(fields, 'split')
  if split is not None:
    split = str(split).strip().lower()
    if split not in SPLITS:
      raise ManifestError(f"{where}, field 'split': unknown split {fields['split']!r}; expected one of "
                          f'{", ".join(SPLITS)}')
  return VertebraRecord(
      image=_file(fields['image'], base, where, 'image'), mask=_file(fields['mask'], base, where, 'mask'),
      label=label, quality=_class_index(fields['quality'], QUALITY_CLASSES, where, 'quality'),
      posterolateral=_class_index(fields['posterolateral'], POSTEROLATERAL_CLASSES, where, 'posterolateral'),
      split=split, scheme=scheme, level=level, row=row, line=line)


def read_manifest(path) -> list[VertebraRecord]:
  """Validated rows of a .csv or .jsonl manifest; ManifestError names the manifest, row and field."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ManifestError(f'{path}: manifest not found')
  rows = _raw_rows(path)
  if not rows:
    raise ManifestError(f'{path}: empty manifest (no rows)')
  records, seen = [], {}
  for row, line, fields in rows:
    record = _record(path, row, line, fields)
    key = (record.image.resolve(), record.mask.resolve(), record.label)
    if key in seen:
      raise ManifestError(f'{path}, row {row} (line {line}): the same vertebra (image, mask, label {record.label}) '
                          f'as row {seen[key]}')
    seen[key] = row
    records.append(record)
  return records


def write_manifest(path, rows: list[dict]) -> None:
  """Write rows (dicts with at least the REQUIRED keys) as .csv or .jsonl, atomically."""
  path = pathlib.Path(path)
  kind = _format(path)
  if kind == 'jsonl':
    nifti.atomic_write_text(path, ''.join(json.dumps(r, default=str) + '\n' for r in rows))
    return
  columns = list(REQUIRED) + [k for k in OPTIONAL if any(k in r for r in rows)]
  columns += sorted({k for r in rows for k in r} - set(columns))
  buffer = io.StringIO(newline='')
  writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator='\n')
  writer.writeheader()
  writer.writerows(rows)
  nifti.atomic_write_text(path, buffer.getvalue())


def _select(path, records, split):
  if split is None:
    return records
  split = str(split).lower()
  chosen = [r for r in records if (r.split or 'train') == split]
  if not chosen:
    present = sorted({r.split or 'train (no split given)' for r in records})
    raise ManifestError(f'{path}: no rows with split {split!r} (splits present: {", ".join(present)})')
  return chosen


def build_manifest_slices(manifest_path, slice_cfg, split: str | None = None) -> dict[str, np.ndarray]:
  """The slices of a manifest's vertebrae, as `build_phantom_slices` gives them for phantoms.

  Each scan and each mask is loaded once, checked to share a grid, reoriented to RAS and passed
  to `extract_vertebra_slices`; slices inherit their vertebra's labels. `split` keeps the rows of
  that split (rows without one count as 'train'). Arrays: image (N, S, S) float32; quality,
  posterolateral, vertebra, z_index (N,) int32 (z in RAS slice order); vert_quality,
  vert_posterolateral, vert_label (V,) int32; vert_level (V,) str ('' without a scheme);
  vert_image (V,) str.
  """
  path = pathlib.Path(manifest_path)
  records = _select(path, read_manifest(path), split)
  by_image: dict[pathlib.Path, list[int]] = {}
  for i, r in enumerate(records):
    by_image.setdefault(r.image, []).append(i)
  results: list = [None] * len(records)
  for image_path, indices in by_image.items():
    where = f'{path}, row {records[indices[0]].row}'
    try:
      image, image_affine, _ = nifti.load_nifti(image_path)
      volume, affine, _ = nifti.to_canonical(image, image_affine)
    except nifti.NiftiError as e:
      raise nifti.NiftiError(f'{where}: {e}') from e
    spacing = nifti.spacing_from_affine(affine)
    masks: dict[pathlib.Path, np.ndarray] = {}
    for i in indices:
      r = records[i]
      where = f'{path}, row {r.row}'
      if r.mask not in masks:
        try:
          mask, mask_affine, _ = nifti.load_mask(r.mask)
          nifti.check_same_grid(image_path, image_affine, image.shape, r.mask, mask_affine, mask.shape)
        except nifti.NiftiError as e:
          raise nifti.NiftiError(f'{where}: {e}') from e
        masks[r.mask] = nifti.to_canonical(mask, mask_affine)[0]
      try:
        results[i] = slices_lib.extract_vertebra_slices(volume, masks[r.mask], r.label, spacing, slice_cfg)
      except slices_lib.SliceError as e:
        raise ManifestError(f"{where}, field 'label': mask {r.mask}: {e}") from e
  data = {'image': np.concatenate([images for images, _ in results]).astype(np.float32)}
  counts = [z.size for _, z in results]
  data['quality'] = np.repeat([r.quality for r in records], counts).astype(np.int32)
  data['posterolateral'] = np.repeat([r.posterolateral for r in records], counts).astype(np.int32)
  data['vertebra'] = np.repeat(np.arange(len(records)), counts).astype(np.int32)
  data['z_index'] = np.concatenate([z for _, z in results]).astype(np.int32)
  data['vert_quality'] = np.array([r.quality for r in records], np.int32)
  data['vert_posterolateral'] = np.array([r.posterolateral for r in records], np.int32)
  data['vert_label'] = np.array([r.label for r in records], np.int32)
  data['vert_level'] = np.array([r.level or '' for r in records])
  data['vert_image'] = np.array([str(r.image) for r in records])
  return data


SCAN_REQUIRED = ('image', 'semantic')


@dataclasses.dataclass(frozen=True)
class ScanRecord:
  """One MRI scan of a segmentation manifest: image, SPINEPS semantic mask, optional instance mask."""
  image: pathlib.Path
  semantic: pathlib.Path
  instance: pathlib.Path | None
  split: str | None
  where: str  # manifest, row and line, for error messages


def read_scan_manifest(path, split: str | None = None) -> list[ScanRecord]:
  """A CSV / JSON-lines manifest with columns image, semantic, optional instance and split.

  Paths are relative to the manifest's folder or absolute; BIDS names or any others are fine.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise ManifestError(f'{path}: manifest not found')
  rows = _raw_rows(path, SCAN_REQUIRED)
  if not rows:
    raise ManifestError(f'{path}: empty manifest (no rows)')
  records = []
  for row, line, fields in rows:
    where = f'{path}, row {row} (line {line})'
    missing = [k for k in SCAN_REQUIRED if _optional(fields, k) is None]
    if missing:
      raise ManifestError(f'{where}: missing field(s) {", ".join(missing)}')
    instance = _optional(fields, 'instance')
    split_value = _optional(fields, 'split')
    if split_value is not None and str(split_value).lower() not in SPLITS:
      raise ManifestError(f"{where}, field 'split': unknown split {split_value!r}; expected one of {', '.join(SPLITS)}")
    records.append(ScanRecord(
        image=_file(fields['image'], path.parent, where, 'image'),
        semantic=_file(fields['semantic'], path.parent, where, 'semantic'),
        instance=None if instance is None else _file(instance, path.parent, where, 'instance'),
        split=None if split_value is None else str(split_value).lower(), where=where))
  return _select(path, records, split)

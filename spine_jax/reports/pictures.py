"""Confusion-matrix and training-curve pictures, written as PNG files atomically.

Figures are built with matplotlib's object API on an Agg canvas (no pyplot,
no display, no global figure state), rendered to bytes in memory and only
then written with `atomic_write_bytes` (a temporary file and `os.replace`),
so a reader never sees half a PNG and a crash leaves no partial file.
"""
import io
import json
import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from spine_jax.data.nifti import atomic_write_bytes


def _new_figure(width, height):
  """A figure on its own Agg canvas."""
  fig = Figure(figsize=(width, height), dpi=100)
  FigureCanvasAgg(fig)
  return fig


def figure_png_bytes(fig):
  """The figure rendered as PNG bytes."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', bbox_inches='tight')
  return buffer.getvalue()


def confusion_matrix_figure(cm, class_names, title):
  """Counts with their row percentages; colour by row fraction so rare classes show too."""
  cm = np.asarray(cm, np.int64)
  rows = cm.sum(axis=1, keepdims=True)
  fractions = np.divide(cm, rows, out=np.zeros(cm.shape, np.float64), where=rows > 0)
  size = 1.6 + 0.9 * len(class_names)
  fig = _new_figure(size + 1.2, size)
  ax = fig.add_subplot()
  image = ax.imshow(fractions, cmap='Blues', vmin=0.0, vmax=1.0)
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label='fraction of true class')
  ticks = np.arange(len(class_names))
  ax.set_xticks(ticks, labels=class_names, rotation=30, ha='right')
  ax.set_yticks(ticks, labels=class_names)
  ax.set_xlabel('predicted')
  ax.set_ylabel('true')
  ax.set_title(title)
  for (i, j), count in np.ndenumerate(cm):
    colour = 'white' if fractions[i, j] > 0.5 else 'black'
    ax.text(j, i, f'{count}\n{100 * fractions[i, j]:.1f}%', ha='center', va='center', color=colour, fontsize=8)
  return fig


def confusion_matrix_png(cm, class_names, title, path):
  """Write a confusion-matrix picture (rows truth, columns prediction) to path as PNG."""
  cm = np.asarray(cm)
  if cm.shape != (len(class_names), len(class_names)):
    raise ValueError(f'confusion matrix {cm.shape} does not match {len(class_names)} class names')
  atomic_write_bytes(path, figure_png_bytes(confusion_matrix_figure(cm, class_names, title)))


def _flatten(record, prefix=''):
  """Nested dict -> {'a/b': value} so {'train': {'loss': 1}} plots as 'train/loss'."""
  flat = {}
  for key, value in record.items():
    name = f'{prefix}{key}'
    if isinstance(value, dict):
      flat.update(_flatten(value, name + '/'))
    else:
      flat[name] = value
  return flat


def read_curves(jsonl_path, x_key='step'):
  """{metric: (xs, ys)} from a JSON-lines log, one object per line.

  x is the record's `x_key` when present, else the line's index. Only finite
  numbers (not booleans) become points. Lines that are not JSON objects are
  skipped, so a log still being written, with a partial last line, can be
  plotted.
  """
  curves = {}
  with open(jsonl_path, encoding='utf-8') as f:
    for index, line in enumerate(f):
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if not isinstance(record, dict):
        continue
      record = _flatten(record)
      x = record.get(x_key, index)
      for key, value in record.items():
        if key == x_key or isinstance(value, bool) or not isinstance(value, (int, float)):
          continue
        if math.isfinite(value):
          xs, ys = curves.setdefault(key, ([], []))
          xs.append(x)
          ys.append(value)
  return curves


def training_curves_figure(curves, title=None):
  """One small panel per metric, three to a row."""
  names = sorted(curves)
  ncols = min(3, len(names))
  nrows = math.ceil(len(names) / ncols)
  fig = _new_figure(4.0 * ncols, 2.8 * nrows)
  for i, name in enumerate(names):
    ax = fig.add_subplot(nrows, ncols, i + 1)
    xs, ys = curves[name]
    ax.plot(xs, ys, marker='.' if len(xs) < 50 else None, linewidth=1.2)
    ax.set_title(name, fontsize=9)
    ax.set_xlabel('step', fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig


def training_curves_png(jsonl_path, path, keys=None, title=None):
  """Write the numeric series of a JSON-lines training log to path as PNG.

  Args:
    jsonl_path: the log, one JSON object per line (nested objects flatten to
      'a/b' names).
    path: the PNG to write.
    keys: the metric names to plot; all numeric ones when None.
    title: an optional figure title.
  """
  curves = read_curves(jsonl_path)
  if keys is not None:
    missing = [k for k in keys if k not in curves]
    if missing:
      raise ValueError(f'no numeric series {missing} in {jsonl_path}; found {sorted(curves)}')
    curves = {k: curves[k] for k in keys}
  if not curves:
    raise ValueError(f'no numeric series to plot in {jsonl_path}')
  atomic_write_bytes(path, figure_png_bytes(training_curves_figure(curves, title)))


def _label_colours(mask: np.ndarray) -> np.ndarray:
  """RGBA per voxel: a fixed colour per label id (tab20, cycled), transparent background."""
  from matplotlib import colormaps
  table = colormaps['tab20'](np.arange(20))
  rgba = table[np.asarray(mask, np.int64) % 20].copy()
  rgba[..., 3] = np.where(mask > 0, 0.45, 0.0)
  return rgba


def sagittal_snapshot_figure(image, masks, titles):
  """Mid-sagittal slice of a PIR volume (axis 2 = R): the image alone, then overlaid with each mask."""
  mid = image.shape[2] // 2
  panels = 1 + len(masks)
  height = 5.0
  aspect = image.shape[1] / max(image.shape[0], 1)
  fig = _new_figure(height * panels / max(aspect, 0.3), height)
  grey = image[:, :, mid].T  # rows: inferior axis (top = head), columns: posterior axis
  lo, hi = np.percentile(grey, [1, 99])
  for i in range(panels):
    ax = fig.add_subplot(1, panels, i + 1)
    ax.imshow(grey, cmap='gray', vmin=lo, vmax=hi, aspect='auto', interpolation='nearest')
    if i:
      ax.imshow(_label_colours(masks[i - 1][:, :, mid].T), aspect='auto', interpolation='nearest')
    ax.set_title(titles[i], fontsize=9)
    ax.axis('off')
  return fig


def sagittal_snapshot_png(image, masks, titles, path):
  """A quick-look PNG of a PIR image and its masks, written atomically."""
  atomic_write_bytes(path, figure_png_bytes(sagittal_snapshot_figure(image, masks, titles)))


def spine_instance_colour_keys(mask: np.ndarray) -> np.ndarray:
  """SPINEPS instance ids -> keys for `_label_colours` (`sagittal_snapshot_figure`'s masks).

  Plain ids would colour disc 100 + X and endplate 200 + X as vertebra X (ids cycle through 20
  colours). tab20 pairs a dark and a light shade of 10 hues: vertebra X gets the dark shade of hue
  X mod 10 (neighbours differ), its disc and endplates the light shade of the same hue.
  """
  mask = np.asarray(mask, np.int64)
  vertebra = mask % 100
  keys = 20 + 2 * (vertebra % 10) + (mask >= 100)
  return np.where(mask > 0, keys, 0)

"""Confusion-matrix metrics and the slice-to-vertebra decisions of the CT classifier.

Metrics follow SPEC §2 (the authors' lab code): per class c, sensitivity =
TP_c / row c total and specificity = (entries outside row c and column c) /
(entries outside row c). A ratio whose denominator is 0 is NaN, never 0, so
an absent class cannot pass for a perfect or a failed one; `nan_to_none`
turns NaN into None for JSON.
"""
import math

import numpy as np

from spine_jax.data.classes import (POSTEROLATERAL_CLASSES, QUALITY_CLASSES, posterolateral_from_counts,
                                   quality_from_counts)



def confusion_matrix(y_true, y_pred, num_classes):
  """(C, C) int64 counts; rows are the truth, columns the prediction."""
  y_true = np.asarray(y_true, np.int64).ravel()
  y_pred = np.asarray(y_pred, np.int64).ravel()
  if y_true.shape != y_pred.shape:
    raise ValueError(f'y_true and y_pred differ in length: {y_true.size} vs {y_pred.size}')
  for name, values in (('y_true', y_true), ('y_pred', y_pred)):
    if values.size and (values.min() < 0 or values.max() >= num_classes):
      raise ValueError(f'{name} has labels outside [0, {num_classes})')
  flat = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
  return flat.reshape(num_classes, num_classes).astype(np.int64)


def _ratio(numerator, denominator):
  """Elementwise numerator / denominator, NaN where the denominator is 0."""
  numerator = np.asarray(numerator, np.float64)
  denominator = np.asarray(denominator, np.float64)
  safe = np.where(denominator > 0, denominator, 1.0)
  return np.where(denominator > 0, numerator / safe, np.nan)


def per_class_metrics(cm):
  """Per-class and summary metrics of a confusion matrix.

  Returns a dict of (C,) float arrays 'sensitivity', 'specificity',
  'precision', 'f1' (2TP / (row + column), so 0 when a present class is never
  hit and NaN only when the class is absent from truth and prediction),
  int 'support' (row totals), and floats 'balanced_accuracy' (mean
  sensitivity over the classes with support) and 'accuracy'. NaN marks a
  zero denominator.
  """
  cm = np.asarray(cm, np.int64)
  total = cm.sum()
  tp = np.diag(cm)
  rows = cm.sum(axis=1)
  cols = cm.sum(axis=0)
  sensitivity = _ratio(tp, rows)
  supported = rows > 0
  balanced = float(np.mean(sensitivity[supported])) if supported.any() else math.nan
  return {
      'support': rows,
      'sensitivity': sensitivity,
      'specificity': _ratio(total - rows - cols + tp, total - rows),
      'precision': _ratio(tp, cols),
      'f1': _ratio(2 * tp, rows + cols),
      'balanced_accuracy': balanced,
      'accuracy': float(_ratio(tp.sum(), total)),
  }


def nan_to_none(value):
  """A JSON-safe copy: numpy scalars and arrays to Python, NaN and inf to None."""
  if isinstance(value, dict):
    return {str(k): nan_to_none(v) for k, v in value.items()}
  if isinstance(value, (list, tuple, np.ndarray)):
    return [nan_to_none(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def classification_report(y_true, y_pred, class_names):
  """JSON-safe report: confusion matrix, per-class metrics, balanced and plain accuracy."""
  class_names = list(class_names)
  cm = confusion_matrix(y_true, y_pred, len(class_names))
  metrics = per_class_metrics(cm)
  per_class = {
      name: {key: metrics[key][c] for key in ('support', 'sensitivity', 'specificity', 'precision', 'f1')}
      for c, name in enumerate(class_names)
  }
  return nan_to_none({
      'class_names': class_names,
      'num_samples': cm.sum(),
      'confusion_matrix': cm,
      'per_class': per_class,
      'balanced_accuracy': metrics['balanced_accuracy'],
      'accuracy': metrics['accuracy'],
  })


def _cell(value, digits=3):
  """Right-alignable text of a metric; None (NaN) prints as n/a."""
  if value is None:
    return 'n/a'
  if isinstance(value, float):
    return f'{value:.{digits}f}'
  return str(value)


def _aligned(rows):
  """Rows of strings as text, first column left-aligned and the rest right-aligned."""
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = []
  for row in rows:
    cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]
    lines.append('  '.join(cells).rstrip())
  return lines


def format_table(report, title):
  """Printable text of a `classification_report`: metrics table, then the confusion matrix."""
  names = report['class_names']
  header = ['class', 'support', 'sensitivity', 'specificity', 'precision', 'F1']
  rows = [header]
  for name in names:
    m = report['per_class'][name]
    rows.append([name] + [_cell(m[k]) for k in ('support', 'sensitivity', 'specificity', 'precision', 'f1')])
  lines = [title, '=' * len(title)]
  lines += _aligned(rows)
  lines.append(f"balanced accuracy {_cell(report['balanced_accuracy'])}  "
               f"accuracy {_cell(report['accuracy'])}  n {report['num_samples']}")
  lines.append('')
  lines.append('confusion matrix (rows: truth, columns: prediction)')
  matrix = [['truth \\ pred'] + list(names)]
  matrix += [[name] + [str(v) for v in row] for name, row in zip(names, report['confusion_matrix'])]
  lines += _aligned(matrix)
  return '\n'.join(lines)


def vertebra_class_counts(slice_pred, vertebra_ids, num_classes):
  """(unique sorted vertebra ids, (V, C) int64 counts of predicted classes per vertebra)."""
  slice_pred = np.asarray(slice_pred, np.int64).ravel()
  vertebra_ids = np.asarray(vertebra_ids).ravel()
  if slice_pred.shape != vertebra_ids.shape:
    raise ValueError(f'{slice_pred.size} slice predictions but {vertebra_ids.size} vertebra ids')
  if slice_pred.size and (slice_pred.min() < 0 or slice_pred.max() >= num_classes):
    raise ValueError(f'slice predictions outside [0, {num_classes})')
  ids, inverse = np.unique(vertebra_ids, return_inverse=True)
  counts = np.zeros((ids.size, num_classes), np.int64)
  np.add.at(counts, (inverse.ravel(), slice_pred), 1)
  return ids, counts


def vertebra_quality_decision(slice_pred, vertebra_ids, normal_fraction=0.7, dominant_share=0.7):
  """Per-vertebra bone quality from slice predictions (rule in `quality_from_counts`).

  Returns (unique sorted vertebra ids, (V,) int64 decisions).
  """
  if not 0.5 <= dominant_share < 1.0:
    raise ValueError(f'dominant_share must lie in [0.5, 1) so at most one class dominates; got {dominant_share}')
  ids, counts = vertebra_class_counts(slice_pred, vertebra_ids, len(QUALITY_CLASSES))
  decisions = np.array([quality_from_counts(c, normal_fraction, dominant_share) for c in counts], np.int64)
  return ids, decisions


def vertebra_posterolateral_decision(slice_pred, vertebra_ids, min_fraction=0.2):
  """Per-vertebra posterolateral involvement (rule in `posterolateral_from_counts`).

  Returns (unique sorted vertebra ids, (V,) int64 decisions).
  """
  ids, counts = vertebra_class_counts(slice_pred, vertebra_ids, len(POSTEROLATERAL_CLASSES))
  decisions = np.array([posterolateral_from_counts(c, min_fraction) for c in counts], np.int64)
  return ids, decisions

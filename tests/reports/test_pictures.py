"""PNG pictures: written whole, atomically, with no temporary file left behind."""
import json

import numpy as np
import pytest

from spine_jax.reports import pictures

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def _assert_png(path, min_bytes=5_000):
  data = path.read_bytes()
  assert data.startswith(PNG_SIGNATURE)
  assert min_bytes < len(data) < 2_000_000
  assert sorted(p.name for p in path.parent.iterdir()) == [path.name], 'temporary file left behind'


def test_confusion_matrix_png(tmp_path):
  path = tmp_path / 'cm.png'
  cm = np.array([[50, 3, 1, 1], [4, 10, 2, 0], [2, 3, 8, 2], [0, 0, 0, 0]])
  pictures.confusion_matrix_png(cm, ['normal', 'blastic', 'mixed', 'lytic'], 'bone quality, per slice', path)
  _assert_png(path)
  # Overwrites in place.
  pictures.confusion_matrix_png(cm[:3, :3], ['a', 'b', 'c'], 'again', path)
  _assert_png(path)
  with pytest.raises(ValueError):
    pictures.confusion_matrix_png(cm, ['a', 'b'], 'mismatch', tmp_path / 'bad.png')
  assert not (tmp_path / 'bad.png').exists()


def test_training_curves_png(tmp_path):
  log = tmp_path / 'log' / 'metrics.jsonl'
  log.parent.mkdir()
  lines = [json.dumps({'step': s, 'train': {'loss': 1.0 / (s + 1)}, 'lr': 1e-4, 'note': 'x', 'ok': True})
           for s in range(0, 100, 10)]
  lines.append(json.dumps({'step': 100, 'eval/balanced_accuracy': 0.7}))
  log.write_text('\n'.join(lines) + '\n{"step": 110, "train": {"lo')  # a partial last line
  curves = pictures.read_curves(log)
  assert sorted(curves) == ['eval/balanced_accuracy', 'lr', 'train/loss']
  assert curves['train/loss'][0] == list(range(0, 100, 10))
  out = tmp_path / 'out' / 'curves.png'
  pictures.training_curves_png(log, out, title='run')
  _assert_png(out)
  pictures.training_curves_png(log, tmp_path / 'out' / 'loss.png', keys=['train/loss'])
  assert (tmp_path / 'out' / 'loss.png').read_bytes().startswith(PNG_SIGNATURE)
  with pytest.raises(ValueError):
    pictures.training_curves_png(log, tmp_path / 'out' / 'x.png', keys=['missing'])

"""SPINEPS' N4 (data/bias_field.py `spineps_n4`) in its two backends, 'numpy' and 'sitk', on the same scans.

  python bench/n4_speed.py [--repeats=5]

Scans: the parity bench's first PIR phantom (make_spine(default_rng([100, 0])), 176 x 320 x 32, int16 as
written, on SPINEPS' 0-1500 scale) and the TPTBox test MRI (from SPINEPS' environment, skipped without it).
The backends run alternately in one process; printed per scan: each one's median seconds, and their
agreement (relative L2 and largest |difference| of the outputs, in the scan's integer dtype).
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spine_jax.data import bias_field  # noqa: E402
from spine_jax.data import spineps_preprocess  # noqa: E402
from spine_jax.data.phantoms import mri  # noqa: E402
from tests import spineps_oracle  # noqa: E402


def scans() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  vol = mri.make_spine(np.random.default_rng([100, 0]))
  image = np.clip(np.rint(vol['image']), 0, np.iinfo(np.int16).max).astype(np.int16)
  out = {'phantom': (spineps_preprocess.normalize_to_range(image), vol['affine'])}
  reason = spineps_oracle.available()
  if reason:
    print(f'TPTBox MRI skipped: {reason}')
  else:
    real = spineps_oracle.call('worker.test_mri', {})
    out['TPTBox MRI'] = (real['image'], real['affine'])
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=5, help='timed calls per backend and scan')
  args = parser.parse_args()
  for name, (image, affine) in scans().items():
    times = {backend: [] for backend in bias_field.N4_BACKENDS}
    outputs = {}
    for _ in range(args.repeats):
      for backend in bias_field.N4_BACKENDS:
        start = time.perf_counter()
        outputs[backend] = bias_field.spineps_n4(image, affine, backend=backend)
        times[backend].append(time.perf_counter() - start)
    ours, ref = (outputs[b].astype(np.float64) for b in (bias_field.NUMPY, bias_field.SITK))
    fast, slow = (float(np.median(times[b])) for b in (bias_field.NUMPY, bias_field.SITK))
    rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    print(f'{name} {image.shape} {image.dtype}: numpy {fast:.2f} s, sitk {slow:.2f} s (x{slow / fast:.1f}); '
          f'relative L2 {rel:.2e}, max |diff| {np.abs(ours - ref).max():g} ({int((ours != ref).sum())} voxels)',
          flush=True)


if __name__ == '__main__':
  main()

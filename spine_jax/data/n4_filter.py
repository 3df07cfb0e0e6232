"""ITK 5.4's N4BiasFieldCorrectionImageFilter (the filter inside SimpleITK 2.5 and ANTs) in numpy.

N4 fits on a regular grid, which makes ITK's scattered-data B-spline fit separable: a voxel's cubic
B-spline weight is a product of one weight per axis, and so is the normalisation by the sum of its squared
weights, so the fit's numerator (delta) and denominator (omega) lattices are tensor contractions with
per-axis basis matrices (the mask only multiplies the data; omega is fixed per level), and the field on the
grid is one per axis. Each iteration costs a few small matrix products and a histogram instead of ITK's
loops over every point and its 64 neighbours.

What is ITK's and kept here (itkN4BiasFieldCorrectionImageFilter.hxx, itkBSplineScatteredDataPointSetToImage
Filter.hxx and itkBSplineControlPointImageFilter.hxx at v5.4): the log of the positive masked voxels (the
others enter as they are); the intensity range of 5.4's `SharpenImage`, whose minimum skips every voxel that
raised the running maximum (its `else if`); the triangular-Parzen histogram, the zero-padded FFT Wiener
deconvolution and E[u|v] in float32 and double where ITK has them; the fit's parametric positions and
B-spline weights rounded as ITK rounds them (float32, the epsilon clamp at the domain's end); new lattices
added to the old; the convergence measure (coefficient of variation of exp of the field change); the
refinement to twice the spans between levels.

Round-off: 200 iterations that do not converge amplify it (a 1e-7 change becomes 1e-4 in the field), so
ITK's float32 is kept where it is sequential and cheap to keep: the histogram sums voxel by voxel and the
field's evaluation (4 products summed per axis, last axis first). The fit's lattices are float64
contractions rounded to float32 once, where ITK adds float32 terms in per-thread chunks (so ITK differs
from itself with its thread count; data/bias_field.py gives the measured spread).
"""
from __future__ import annotations

import numpy as np

HISTOGRAM_BINS = 200
BIAS_FIELD_FWHM = 0.15  # in log-intensity units
WIENER_NOISE = 0.01
SPLINE_ORDER = 3  # the only order implemented: ITK's and ANTs' default, SPINEPS' choice
BSPLINE_EPSILON = 1e-3  # ITK's clamp at the end of the parametric domain, in spans per voxel
# FloatAlmostEqual's absolute tolerance: a control point whose omega is within it of 0 gets no value.
OMEGA_TOLERANCE = np.float32(0.1) * np.finfo(np.float32).eps

_F32 = np.float32
_F64 = np.float64
# Cubic B-spline refinement (spans doubled): refined[2i] = (c[i] + c[i+1]) / 2,
# refined[2i+1] = (c[i] + 6 c[i+1] + c[i+2]) / 8 (ITK's m_RefinedLatticeCoefficients).
_REFINE_EVEN = (0.5, 0.5, 0.0)
_REFINE_ODD = (0.125, 0.75, 0.125)


def nonzero_box(mask: np.ndarray) -> tuple[slice, ...]:
  """The bounding box (slices) of a 3-d mask's non-zero voxels, from its projections on each axis."""
  mask = np.asarray(mask) != 0
  spans = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
  if not all(s.size for s in spans):
    raise ValueError('N4: the mask is empty')
  return tuple(slice(int(s[0]), int(s[-1]) + 1) for s in spans)


def cubic_bspline(u: np.ndarray) -> np.ndarray:
  """ITK's BSplineKernelFunction<3> (centred, support [-2, 2]) in float64."""
  a = np.abs(np.asarray(u, _F64))
  inner = (4.0 - 6.0 * a * a + 3.0 * a * a * a) / 6.0
  outer = (8.0 - 12.0 * a + 6.0 * a * a - a * a * a) / 6.0
  return np.where(a < 1.0, inner, np.where(a < 2.0, outer, 0.0))


def _epsilon(spans: int, n: int, spacing: float) -> np.float32:
  r = _F32(_F32(spans) / (_F64(_F32(n - 1)) * spacing))
  return _F32(_F64(r) * spacing * _F64(_F32(BSPLINE_EPSILON)))


def _clamp(u: np.ndarray, spans: int, epsilon: np.float32) -> np.ndarray:
  """ITK's handling of the domain's ends: within epsilon of the end it moves inside, within epsilon below 0
  to 0; anything else outside is an error there."""
  u = np.where(np.abs(u - _F32(spans)) <= epsilon, _F32(_F32(spans) - epsilon), u)
  u = np.where((u < 0) & (np.abs(u) <= epsilon), _F32(0.0), u).astype(_F32)
  if np.any(u < 0) or np.any(u >= spans):
    raise ValueError(f'N4: a parametric position lies outside [0, {spans})')
  return u


def _basis(first: np.ndarray, weights: np.ndarray, controls: int) -> np.ndarray:
  """(points, controls) matrix with the 4 weights of each point at its first control point onwards."""
  out = np.zeros((first.size, controls), _F64)
  rows = np.arange(first.size)
  for k in range(SPLINE_ORDER + 1):
    out[rows, first + k] = weights[:, k]
  return out


def fit_basis(n: int, spans: int, spacing: float, origin: float) -> np.ndarray:
  """B-spline weights (n, spans + 3) of the grid's points in the scattered-data fit: ITK's float32 points
  (origin + spacing * index), their float32 parametric positions and per-axis kernel arguments."""
  r = _F32(_F32(spans) / (_F64(_F32(n - 1)) * spacing))
  point = (_F64(_F32(origin)) + spacing * np.arange(n, dtype=_F64)).astype(_F32)
  u = _clamp(((point.astype(_F64) - origin) * _F64(r)).astype(_F32), spans, _epsilon(spans, n, spacing))
  first = u.astype(np.int64)
  frac = (u - first.astype(_F32)).astype(_F32)
  args = [(_F64((frac - _F32(k)).astype(_F32)) + 0.5 * (SPLINE_ORDER - 1)).astype(_F32)
          for k in range(SPLINE_ORDER + 1)]
  return _basis(first, cubic_bspline(np.stack(args, axis=1)), spans + SPLINE_ORDER)


def evaluation_basis(n: int, spans: int, spacing: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
  """(first control point (n,), float32 weights (n, 4)) with which ITK's BSplineControlPointImageFilter
  evaluates a lattice on n voxels spanning its domain (u = spans * index / (n - 1) in float32; the spacing
  only moves epsilon)."""
  index = np.arange(n, dtype=_F32)
  u = _clamp(((_F32(spans) * index).astype(_F32) / _F32(max(n - 1, 1))).astype(_F32), spans,
             _epsilon(spans, n, spacing))
  first = u.astype(np.int64)
  args = [(_F64((u - (first + k).astype(_F32)).astype(_F32)) + 0.5 * (SPLINE_ORDER - 1)).astype(_F32)
          for k in range(SPLINE_ORDER + 1)]
  return first, cubic_bspline(np.stack(args, axis=1)).astype(_F32)


def contract(volume: np.ndarray, matrices) -> np.ndarray:
  """volume (n0, n1, n2) contracted with per-axis matrices (n_i, m_i): out (m0, m1, m2), as three matrix
  products on contiguous memory."""
  (n0, n1, n2), (m0, m1, m2) = volume.shape, [m.shape[1] for m in matrices]
  out = volume.reshape(n0 * n1, n2) @ matrices[2]
  out = np.matmul(np.ascontiguousarray(matrices[1].T), out.reshape(n0, n1, m2))
  return (np.ascontiguousarray(matrices[0].T) @ out.reshape(n0, m1 * m2)).reshape(m0, m1, m2)


def evaluate(lattice: np.ndarray, bases) -> np.ndarray:
  """The B-spline field of a control-point lattice on a grid from per-axis (first, weights): ITK's
  CollapsePhiLattice, last axis first, each a float32 sum of 4 float32 products in order."""
  out = np.asarray(lattice, _F32)
  for axis in (2, 1, 0):
    first, weights = bases[axis]
    shape = [1, 1, 1]
    shape[axis] = first.size
    total = np.zeros(out.shape[:axis] + (first.size,) + out.shape[axis + 1:], _F32)
    term = np.empty_like(total)
    for k in range(SPLINE_ORDER + 1):
      np.take(out, first + k, axis=axis, out=term)
      term *= weights[:, k].reshape(shape)
      total += term
    out = total
  return out


def refine(lattice: np.ndarray) -> np.ndarray:
  """The same cubic B-spline with twice the spans on every axis (n control points become 2 n - 3)."""
  for axis in range(3):
    n = lattice.shape[axis]
    matrix = np.zeros((2 * n - 3, n), _F64)
    for i in range(n - 1):
      matrix[2 * i, i:i + 2] = _REFINE_EVEN[:2]
      if i + 2 < n:
        matrix[2 * i + 1, i:i + 3] = _REFINE_ODD
    lattice = np.moveaxis(np.tensordot(matrix, lattice.astype(_F64), axes=([1], [axis])), 0, axis)
  return lattice.astype(_F32)


def _value_range(values: np.ndarray) -> tuple[np.float32, np.float32]:
  """(minimum, maximum) as 5.4's SharpenImage finds them: a voxel that raises the running maximum is not
  compared with the minimum (so a first voxel below all others is left out of it)."""
  running = np.maximum.accumulate(np.concatenate([[np.finfo(_F32).min], values[:-1]]).astype(_F32))
  record = values > running
  rest = values[~record]
  return (rest.min() if rest.size else np.finfo(_F32).max), values.max()


def _histogram(idx: np.ndarray, offset: np.ndarray, bins: int) -> np.ndarray:
  """The triangular-Parzen histogram: a value on a bin counts 1 there, one between bins is split linearly;
  float32 sums voxel by voxel in ITK's order (np.add.at adds sequentially)."""
  exact = (idx >= 0) & (offset == 0) & (idx < bins)
  split = (idx >= 0) & (offset != 0) & (idx < bins - 1)
  used = exact | split
  at = np.stack([idx, idx + 1], axis=1)[used].ravel()
  amounts = np.stack([np.where(exact, _F32(1.0), (_F32(1.0) - offset).astype(_F32)),
                      np.where(exact, _F32(0.0), offset)], axis=1)[used].ravel().astype(_F32)
  hist = np.zeros(bins + 1, _F32)
  np.add.at(hist, at, amounts)
  return hist[:bins]


def _mapping(hist: np.ndarray, low: np.float32, slope: np.float32) -> np.ndarray:
  """E[u|v] per bin (float32): the histogram zero-padded to a power of two (2 ** (ceil(log2 bins) + 1)),
  deconvolved by a Wiener filter of the Gaussian bias blur (FWHM in bins) in the Fourier domain, and the
  bin centres' conditional mean under that deconvolved distribution."""
  bins = hist.size
  size = int(2 ** (np.ceil(np.log(_F32(bins)) / np.log(2.0)) + 1) + 0.5)
  pad = int(0.5 * (size - bins))
  padded = np.zeros(size, _F64)
  padded[pad:pad + bins] = hist
  fwhm = _F32(_F32(BIAS_FIELD_FWHM) / slope)
  exp_factor = _F32(4.0 * np.log(2.0) / _F64(_F32(fwhm * fwhm)))
  scale = _F32(2.0 * np.sqrt(np.log(2.0) / np.pi) / _F64(fwhm))
  n = np.arange(1, size // 2 + 1)
  n32 = n.astype(_F32)
  gauss = np.exp((-(n32 * n32).astype(_F32) * exp_factor).astype(_F32).astype(_F64)).astype(_F32)
  kernel = np.zeros(size, _F64)
  kernel[0] = scale
  kernel[n] = kernel[size - n] = (scale * gauss).astype(_F32)
  if size % 2 == 0:
    kernel[size // 2] = _F64(scale) * np.exp(0.25 * -_F64(_F32(_F32(size) * _F32(size))) * _F64(exp_factor))
  k_f = np.fft.fft(kernel)
  conj = np.conj(k_f)
  wiener = conj / (conj * k_f + _F64(_F32(WIENER_NOISE)))
  u = np.maximum(np.fft.ifft(np.fft.fft(padded) * wiener.real).real, 0.0)
  centres = (low + ((np.arange(size, dtype=_F32) - _F32(pad)) * slope).astype(_F32)).astype(_F32)
  numerator = np.fft.ifft(np.fft.fft(centres.astype(_F64) * u) * k_f).real
  denominator = np.fft.ifft(np.fft.fft(u) * k_f).real
  with np.errstate(divide='ignore', invalid='ignore'):
    return np.where(denominator != 0.0, numerator / denominator, 0.0).astype(_F32)[pad:pad + bins]


def sharpen(values: np.ndarray) -> np.ndarray:
  """N4's histogram sharpening of the masked log intensities (in ITK's buffer order): each mapped through
  E[u|v], linearly between bins (float32)."""
  low, high = _value_range(values)
  if not high > low:
    raise ValueError('N4: the masked intensities are all equal, so there is no histogram to sharpen')
  bins = HISTOGRAM_BINS
  slope = _F32((high - low) / _F32(bins - 1))
  cidx = ((values - low).astype(_F32) / slope).astype(_F32)
  idx = np.floor(cidx).astype(np.int64)
  mapping = _mapping(_histogram(idx, (cidx - idx.astype(_F32)).astype(_F32), bins), low, slope)
  inside = (idx >= 0) & (idx < bins - 1)
  at = np.where(inside, idx, 0)
  step = (mapping[at + 1] - mapping[at]).astype(_F32)
  mapped = (mapping[at] + (step * (cidx - at.astype(_F32)).astype(_F32)).astype(_F32)).astype(_F32)
  return np.where(inside, mapped, mapping[-1]).astype(_F32)


def _fit(residual: np.ndarray, cubes, omega: np.ndarray) -> np.ndarray:
  """One scattered-data B-spline fit (one level) of the residual (0 outside the mask): phi = delta / omega,
  with cubes the per-axis B^3 / sum(B^2) and omega the level's (data-independent) denominator lattice."""
  delta = contract(residual.astype(_F64), cubes).astype(_F32)
  with np.errstate(divide='ignore', invalid='ignore'):
    phi = np.where(np.abs(omega) > OMEGA_TOLERANCE, delta / omega, 0.0).astype(_F32)
  return np.where(np.isfinite(phi), phi, 0.0).astype(_F32)


def _convergence(old: np.ndarray, new: np.ndarray) -> np.float32:
  """Coefficient of variation of exp(old - new) over the masked voxels."""
  pixels = np.exp((old - new).astype(_F32).astype(_F64)).astype(_F32).astype(_F64)
  if pixels.size < 2:
    return _F32(0.0)
  return _F32(pixels.std(ddof=1) / pixels.mean())


def n4_lattice(image: np.ndarray, mask: np.ndarray, spacing, origin, control_points, iterations,
               convergence: float) -> np.ndarray:
  """N4's log bias-field control-point lattice of `image` (float32, array axis i = ITK axis i) fitted at the
  voxels where `mask` is non-zero, on a grid with this spacing and origin (direction does not enter)."""
  image = np.asarray(image, _F32)
  mask = np.asarray(mask) != 0
  if image.ndim != 3 or image.shape != mask.shape:
    raise ValueError(f'N4: image {image.shape} and mask {mask.shape} must be 3-d arrays of one shape')
  if not mask.any():
    raise ValueError('N4: the mask keeps no voxel of the shrunk image')
  # Only the mask's bounding box enters the fit and the convergence measure.
  box = nonzero_box(mask)
  inside = mask[box]
  # ITK's buffer order (axis 0 fastest) decides the sharpening's value range.
  where = np.unravel_index(np.flatnonzero(inside.ravel(order='F')), inside.shape, order='F')
  log_input = image[box][where]
  positive = log_input > 0
  log_input[positive] = np.log(log_input[positive].astype(_F64)).astype(_F32)
  field = np.zeros_like(log_input)
  residual = np.zeros(inside.shape, _F64)
  lattice = None
  spans = [int(c) - SPLINE_ORDER for c in control_points]
  threshold = _F32(convergence)
  for level, limit in enumerate(iterations):
    axes = list(zip(image.shape, spans, spacing, origin, box))
    fits = [fit_basis(n, s, float(sp), float(o))[b] for n, s, sp, o, b in axes]
    evals = [[a[b] for a in evaluation_basis(n, s, float(sp))] for n, s, sp, _, b in axes]
    cubes = [f ** 3 / np.sum(f * f, axis=1, keepdims=True) for f in fits]
    omega = contract(inside.astype(_F64), [f * f for f in fits]).astype(_F32)
    measure, done = np.finfo(_F32).max, 0
    while done < limit and measure > threshold:
      done += 1
      uncorrected = (log_input - field).astype(_F32)
      residual[where] = (uncorrected - sharpen(uncorrected)).astype(_F32)
      phi = _fit(residual, cubes, omega)
      lattice = phi if lattice is None else (lattice + phi).astype(_F32)
      new_field = evaluate(lattice, evals)[where]
      measure = _convergence(field, new_field)
      field = new_field
    if level < len(iterations) - 1:
      lattice = refine(lattice)
      spans = [2 * s for s in spans]
  return lattice


def log_field(lattice: np.ndarray, shape, box=None) -> np.ndarray:
  """The lattice's log bias field on a grid of `shape` voxels spanning its parametric domain (float32), or on
  the part `box` (slices) of it."""
  box = box or tuple(slice(0, n) for n in shape)
  return evaluate(lattice, [[a[b] for a in evaluation_basis(n, c - SPLINE_ORDER)]
                            for n, c, b in zip(shape, lattice.shape, box)])

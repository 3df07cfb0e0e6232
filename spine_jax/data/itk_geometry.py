"""ITK 5.4's index <-> physical point arithmetic in double, operation for operation, without ITK.

Why so exact: ANTs' ShrinkImageFilter maps the first kept voxel through a physical point and rounds its
index, and on an even-sized axis that index sits exactly halfway between two voxels (data/bias_field.py),
so the last bit of ITK's arithmetic picks the voxel N4 fits on. The matrices are itk::ImageBase's:
direction * diag(spacing) and its inverse, which ITK takes from vnl's SVD (LINPACK's dsvdc as VXL ships it,
f2c-translated), not from an exact inversion: even a permuted diagonal comes back with round-off in its zero
entries, so that SVD is replayed here step by step (same operations, same order, IEEE double as x86-64
builds compute them).
"""
from __future__ import annotations

import math

import numpy as np


def _sign(a: float, b: float) -> float:
  """f2c's d_sign: |a| with the sign of b (b = -0.0 counts as positive)."""
  return abs(a) if b >= 0 else -abs(a)


def _nrm2(values: list[float]) -> float:
  """Reference BLAS dnrm2 (scaled sum of squares)."""
  if len(values) == 1:
    return abs(values[0])
  scale, ssq = 0.0, 1.0
  for value in values:
    if value != 0.0:
      a = abs(value)
      if scale < a:
        ssq = ssq * ((scale / a) * (scale / a)) + 1.0
        scale = a
      else:
        ssq += (a / scale) * (a / scale)
  return scale * math.sqrt(ssq)


def _dot(xs: list[float], ys: list[float]) -> float:
  """Reference BLAS ddot (unit strides: the first n % 5 terms one by one, then groups of five)."""
  n, total = len(xs), 0.0
  m = n % 5
  for i in range(m):
    total += xs[i] * ys[i]
  for i in range(m, n, 5):
    total = (total + xs[i] * ys[i] + xs[i + 1] * ys[i + 1] + xs[i + 2] * ys[i + 2] + xs[i + 3] * ys[i + 3]
             + xs[i + 4] * ys[i + 4])
  return total


def _rotg(a: float, b: float) -> tuple[float, float, float, float]:
  """Reference BLAS drotg: (r, z, c, s)."""
  roe = a if abs(a) > abs(b) else b
  scale = abs(a) + abs(b)
  if scale == 0.0:
    return 0.0, 0.0, 1.0, 0.0
  r = scale * math.sqrt((a / scale) * (a / scale) + (b / scale) * (b / scale))
  r = _sign(1.0, roe) * r
  c, s = a / r, b / r
  z = 1.0
  if abs(a) > abs(b):
    z = s
  if abs(b) >= abs(a) and c != 0.0:
    z = 1.0 / c
  return r, z, c, s


def _rot(x: list[float], y: list[float], c: float, s: float) -> None:
  """Reference BLAS drot on two whole (1-based, index 0 unused) columns."""
  for i in range(1, len(x)):
    t = c * x[i] + s * y[i]
    y[i] = c * y[i] - s * x[i]
    x[i] = t


def _axpy(a: float, x: list[float], y: list[float], rows) -> None:
  if a != 0.0:
    for i in rows:
      y[i] += a * x[i]


def _svdc(matrix) -> tuple[list[float], list[list[float]], list[list[float]]]:
  """LINPACK dsvdc with job 21 on an n x p matrix: (s, u, v), 1-based, columns as lists (u[j][i] = U(i, j))."""
  n, p = len(matrix), len(matrix[0])
  x = [[0.0] * (n + 1)] + [[0.0] + [float(matrix[i][j]) for i in range(n)] for j in range(p)]
  s, e, work = [0.0] * (p + 2), [0.0] * (p + 2), [0.0] * (n + 2)
  u = [[0.0] * (n + 1) for _ in range(p + 1)]
  v = [[0.0] * (p + 1) for _ in range(p + 1)]
  ncu = min(n, p)
  nct, nrt = min(n - 1, p), max(0, min(p - 2, n))
  for l in range(1, max(nct, nrt) + 1):
    lp1 = l + 1
    if l <= nct:
      s[l] = _nrm2(x[l][l:n + 1])
      if s[l] != 0.0:
        if x[l][l] != 0.0:
          s[l] = _sign(s[l], x[l][l])
        d = 1.0 / s[l]
        for i in range(l, n + 1):
          x[l][i] = d * x[l][i]
        x[l][l] += 1.0
      s[l] = -s[l]
    for j in range(lp1, p + 1):
      if l <= nct and s[l] != 0.0:
        t = -_dot(x[l][l:n + 1], x[j][l:n + 1]) / x[l][l]
        _axpy(t, x[l], x[j], range(l, n + 1))
      e[j] = x[j][l]
    if l <= nct:
      for i in range(l, n + 1):
        u[l][i] = x[l][i]
    if l <= nrt:
      e[l] = _nrm2(e[lp1:p + 1])
      if e[l] != 0.0:
        if e[lp1] != 0.0:
          e[l] = _sign(e[l], e[lp1])
        d = 1.0 / e[l]
        for i in range(lp1, p + 1):
          e[i] = d * e[i]
        e[lp1] += 1.0
      e[l] = -e[l]
      if lp1 <= n and e[l] != 0.0:
        for i in range(lp1, n + 1):
          work[i] = 0.0
        for j in range(lp1, p + 1):
          _axpy(e[j], x[j], work, range(lp1, n + 1))
        for j in range(lp1, p + 1):
          _axpy(-e[j] / e[lp1], work, x[j], range(lp1, n + 1))
      for i in range(lp1, p + 1):
        v[l][i] = e[i]

  m = min(p, n + 1)
  if nct < p:
    s[nct + 1] = x[nct + 1][nct + 1]
  if n < m:
    s[m] = 0.0
  if nrt + 1 < m:
    e[nrt + 1] = x[m][nrt + 1]
  e[m] = 0.0
  for j in range(nct + 1, ncu + 1):
    u[j] = [0.0] * (n + 1)
    u[j][j] = 1.0
  for l in range(nct, 0, -1):
    if s[l] != 0.0:
      for j in range(l + 1, ncu + 1):
        t = -_dot(u[l][l:n + 1], u[j][l:n + 1]) / u[l][l]
        _axpy(t, u[l], u[j], range(l, n + 1))
      for i in range(l, n + 1):
        u[l][i] = -1.0 * u[l][i]
      u[l][l] += 1.0
      for i in range(1, l):
        u[l][i] = 0.0
    else:
      u[l] = [0.0] * (n + 1)
      u[l][l] = 1.0
  for l in range(p, 0, -1):
    if l <= nrt and e[l] != 0.0:
      for j in range(l + 1, p + 1):
        t = -_dot(v[l][l + 1:p + 1], v[j][l + 1:p + 1]) / v[l][l + 1]
        _axpy(t, v[l], v[j], range(l + 1, p + 1))
    v[l] = [0.0] * (p + 1)
    v[l][l] = 1.0

  mm, iterations = m, 0
  while m != 0:
    if iterations >= 1000:
      raise ArithmeticError('vnl SVD did not converge')
    for l in range(m - 1, -1, -1):
      if l == 0:
        break
      test = abs(s[l]) + abs(s[l + 1])
      if test + abs(e[l]) == test:
        e[l] = 0.0
        break
    if l == m - 1:
      kase = 4
    else:
      for ls in range(m, l - 1, -1):
        if ls == l:
          break
        test = 0.0
        if ls != m:
          test += abs(e[ls])
        if ls != l + 1:
          test += abs(e[ls - 1])
        if test + abs(s[ls]) == test:
          s[ls] = 0.0
          break
      if ls == l:
        kase = 3
      elif ls == m:
        kase = 1
      else:
        kase, l = 2, ls
    l += 1
    if kase == 1:
      f = e[m - 1]
      e[m - 1] = 0.0
      for k in range(m - 1, l - 1, -1):
        s[k], f, cs, sn = _rotg(s[k], f)
        if k != l:
          f = -sn * e[k - 1]
          e[k - 1] = cs * e[k - 1]
        _rot(v[k], v[m], cs, sn)
    elif kase == 2:
      f = e[l - 1]
      e[l - 1] = 0.0
      for k in range(l, m + 1):
        s[k], f, cs, sn = _rotg(s[k], f)
        f = -sn * e[k]
        e[k] = cs * e[k]
        _rot(u[k], u[l - 1], cs, sn)
    elif kase == 3:
      scale = abs(s[m])
      for value in (s[m - 1], e[m - 1], s[l], e[l]):
        scale = scale if scale >= abs(value) else abs(value)
      sm, smm1, emm1, sl, el = s[m] / scale, s[m - 1] / scale, e[m - 1] / scale, s[l] / scale, e[l] / scale
      b = ((smm1 + sm) * (smm1 - sm) + emm1 * emm1) / 2.0
      c = (sm * emm1) * (sm * emm1)
      shift = 0.0
      if not (b == 0.0 and c == 0.0):
        shift = math.sqrt(b * b + c)
        if b < 0.0:
          shift = -shift
        shift = c / (b + shift)
      f = (sl + sm) * (sl - sm) + shift
      g = sl * el
      for k in range(l, m):
        f, g, cs, sn = _rotg(f, g)
        if k != l:
          e[k - 1] = f
        f = cs * s[k] + sn * e[k]
        e[k] = cs * e[k] - sn * s[k]
        g = sn * s[k + 1]
        s[k + 1] = cs * s[k + 1]
        _rot(v[k], v[k + 1], cs, sn)
        f, g, cs, sn = _rotg(f, g)
        s[k] = f
        f = cs * e[k] + sn * s[k + 1]
        s[k + 1] = -sn * e[k] + cs * s[k + 1]
        g = sn * e[k + 1]
        e[k + 1] = cs * e[k + 1]
        if k < n:
          _rot(u[k], u[k + 1], cs, sn)
      e[m - 1] = f
      iterations += 1
    else:
      if s[l] < 0.0:
        s[l] = -s[l]
        v[l] = [-1.0 * value for value in v[l]]
      while l != mm and s[l] < s[l + 1]:
        s[l], s[l + 1] = s[l + 1], s[l]
        if l < p:
          v[l], v[l + 1] = v[l + 1], v[l]
        if l < n:
          u[l], u[l + 1] = u[l + 1], u[l]
        l += 1
      iterations = 0
      m -= 1
  return s, u, v


def _product(a, b) -> list[list[float]]:
  """vnl_matrix's product: each entry a sum from 0 in index order."""
  out = []
  for row in a:
    out.append([])
    for k in range(len(b[0])):
      total = 0.0
      for j, value in enumerate(row):
        total += value * b[j][k]
      out[-1].append(total)
  return out


def svd_inverse(matrix) -> np.ndarray:
  """vnl_matrix_inverse(M).as_matrix() (itk::Matrix::GetInverse): V diag(1 / w) U^T from vnl_svd."""
  n = len(matrix)
  s, u, v = _svdc([[float(value) for value in row] for row in matrix])
  w = [abs(s[j + 1]) for j in range(n)]
  w_inverse = [[(1.0 / w[i] if i == j and w[i] > 0.0 else 0.0) for j in range(n)] for i in range(n)]
  v_rows = [[v[j + 1][i + 1] for j in range(n)] for i in range(n)]
  u_transposed = [[u[i + 1][j + 1] for j in range(n)] for i in range(n)]
  return np.asarray(_product(_product(v_rows, w_inverse), u_transposed))


class ItkGrid:
  """An itk::ImageBase's transforms between indices and physical points (origin, spacing, direction)."""

  def __init__(self, spacing, origin, direction):
    self.origin = [float(o) for o in origin]
    direction = np.asarray(direction, np.float64)
    self.matrix = [[float(direction[r, c]) * float(spacing[c]) for c in range(3)] for r in range(3)]
    self.inverse = svd_inverse(self.matrix).tolist()

  def continuous_index_to_point(self, index) -> list[float]:
    out = []
    for r in range(3):
      total = 0.0
      for c in range(3):
        total += self.matrix[r][c] * float(index[c])
      out.append(total + self.origin[r])
    return out

  def index_to_point(self, index) -> list[float]:
    out = []
    for r in range(3):
      point = self.origin[r]
      for c in range(3):
        point += self.matrix[r][c] * int(index[c])
      out.append(point)
    return out

  def point_to_index(self, point) -> list[int]:
    """Rounded half up as x86-64 builds do it: (nearest-even of 2 x + 0.5) >> 1."""
    out = []
    for r in range(3):
      total = 0.0
      for c in range(3):
        total += self.inverse[r][c] * (float(point[c]) - self.origin[c])
      out.append(int(np.rint(2.0 * total + 0.5)) >> 1)
    return out

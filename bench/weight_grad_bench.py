"""The weight gradient of one 3x3 2D convolution on CPU: XLA's own, as nine matrix products, PyTorch's.

  python bench/weight_grad_bench.py [--batch=8] [--size=56] [--in_channels=128] [--channels=32] [--repeats=7]

The DenseNets' training steps are bounded by this gradient (BUILD_NOTES.md, "The DenseNets on CPU"): for the
dense layers' 3x3, 128 -> 32 convolution at 56^2 XLA's backward-filter convolution runs at a fraction of its
matrix-multiply rate. The product forms compute dW[tap] as one (C x L) by (L x O) product per tap over the padded
input laid out flat (N * (H + 2) * (W + 2) rows), each tap a contiguous row slice shifted by its offset, and the
output gradient zero-extended onto the same grid (`flat`, contracting the rows of both; `flat_dy_first`, the
output gradient transposed once so that each product reads its slice as is; `flat_dy_first_P`, each product cut
into P pieces along the rows). One XLA dot of the same size is timed alone for reference (`one_dot_x9`: nine
times its time). Each the median wall time of --repeats after a warm-up, in one process; prints one JSON line.
"""
import argparse
import json
import os

from _timing import median_time, torch_side
import jax
from jax import lax
import jax.numpy as jnp

_DN = ("NHWC", "HWIO", "NHWC")


def xla_weight_grad(x, k, dy):
  conv = lambda k: lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DN)
  return jax.vjp(conv, k)[1](dy)[0]


def _flat(x, dy):
  n, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).reshape(-1, c)
  dyp = jnp.pad(dy, ((0, 0), (0, 2), (0, 2), (0, 0))).reshape(-1, dy.shape[-1])
  rows = xp.shape[0] - 2 * (w + 2) - 2  # the last tap's offset
  offsets = [ky * (w + 2) + kx for ky in range(3) for kx in range(3)]
  return xp, dyp[:rows], rows, offsets


def flat_weight_grad(x, k, dy):
  xp, dyp, rows, offsets = _flat(x, dy)
  taps = [lax.dot_general(lax.slice_in_dim(xp, o, o + rows), dyp, (((0,), (0,)), ((), ()))) for o in offsets]
  return jnp.stack(taps).reshape(k.shape)


def flat_dy_first_weight_grad(x, k, dy, pieces=1):
  xp, dyp, rows, offsets = _flat(x, dy)
  dy_t = dyp.T  # (O, rows), once
  bounds = [rows * i // pieces for i in range(pieces + 1)]
  taps = [sum(dy_t[:, a:b] @ lax.slice_in_dim(xp, o + a, o + b) for a, b in zip(bounds[:-1], bounds[1:]))
          for o in offsets]
  return jnp.stack(taps).transpose(0, 2, 1).reshape(k.shape)


def bench_jax(batch, size, cin, cout, repeats):
  x = jax.random.normal(jax.random.key(0), (batch, size, size, cin))
  k = jax.random.normal(jax.random.key(1), (3, 3, cin, cout)) * 0.05
  dy = jax.random.normal(jax.random.key(2), (batch, size, size, cout))
  reference = jax.jit(xla_weight_grad)(x, k, dy)
  forms = {"xla": xla_weight_grad, "flat": flat_weight_grad, "flat_dy_first": flat_dy_first_weight_grad,
           **{f"flat_dy_first_{p}": (lambda p: lambda x, k, dy: flat_dy_first_weight_grad(x, k, dy, p))(p)
              for p in (4, 16)}}
  result = {}
  for name, form in forms.items():
    f = jax.jit(form)
    err = float(jnp.abs(f(x, k, dy) - reference).max() / jnp.abs(reference).max())
    if err > 1e-4:
      raise AssertionError(f"{name}: relative error {err:.2e} against XLA's weight gradient")
    result[name] = median_time(lambda: f(x, k, dy).block_until_ready(), repeats, warmup=True)
  rows = batch * (size + 2) ** 2
  a, b = jnp.ones((cin, rows)), jnp.ones((rows, cout))
  dot = jax.jit(lambda a, b: a @ b)
  result["one_dot_x9"] = 9 * median_time(lambda: dot(a, b).block_until_ready(), repeats, warmup=True)
  return result


def bench_torch(batch, size, cin, cout, repeats):
  import torch
  x = torch.randn(batch, cin, size, size)
  w = torch.randn(cout, cin, 3, 3, requires_grad=True)
  dy = torch.randn(batch, cout, size, size)
  return {"weight_grad": median_time(lambda: torch.nn.grad.conv2d_weight(x, w.shape, dy, padding=1),
                                     repeats, warmup=True), "torch_threads": torch.get_num_threads()}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--size", type=int, default=56, help="square input side")
  ap.add_argument("--in_channels", type=int, default=128)
  ap.add_argument("--channels", type=int, default=32, help="output channels")
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--no_torch", action="store_true")
  a = ap.parse_args()
  args = (a.batch, a.size, a.in_channels, a.channels, a.repeats)
  flop = 2 * 9 * a.batch * a.size ** 2 * a.in_channels * a.channels
  result = {"machine": f"{os.cpu_count()} CPUs, {jax.devices()[0].platform}", "batch": a.batch, "size": a.size,
            "in_channels": a.in_channels, "channels": a.channels, "gflop": flop / 1e9, "jax_s": bench_jax(*args)}
  if not a.no_torch:
    result["pytorch_s"] = torch_side(bench_torch, *args)
  print(json.dumps(result))


if __name__ == "__main__":
  main()

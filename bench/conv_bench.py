"""One 3x3x3 convolution on CPU: XLA's 3D convolution, SlicedConv (2D convolutions), PyTorch's Conv3d.

  python bench/conv_bench.py [--shape=2,64,128,32] [--channels=16] [--repeats=5]

Forward, and backward (input and weight gradients), each the median wall time of --repeats after a
warm-up, in one process; PyTorch's numbers need the torch extra. Prints one JSON line. This is why the
U-Net computes with `conv='sliced'` on CPU (models/conv.py).
"""
import argparse
import json
import os

from _timing import median_time
import jax

from spine_jax.models import conv as conv_lib



def bench_jax(impl, shape, channels, repeats):
  x = jax.random.normal(jax.random.key(0), (*shape, channels))
  w = jax.random.normal(jax.random.key(1), (3, 3, 3, channels, channels)) * 0.1
  pad = ((1, 1),) * 3
  if impl == "xla":
    f = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1, 1), pad, dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
  else:
    f = lambda x, w: conv_lib.sliced_conv(x, w, (1, 1, 1), pad)
  fwd = jax.jit(f)
  dy = fwd(x, w)
  bwd = jax.jit(lambda x, w, dy: jax.vjp(f, x, w)[1](dy))
  return {"forward_s": median_time(lambda: fwd(x, w).block_until_ready(), repeats, warmup=True),
          "backward_s": median_time(lambda: jax.block_until_ready(bwd(x, w, dy)), repeats, warmup=True)}


def bench_torch(shape, channels, repeats):
  import torch
  b, *spatial = shape
  x = torch.randn(b, channels, *spatial, requires_grad=True)
  conv = torch.nn.Conv3d(channels, channels, 3, padding=1)
  with torch.no_grad():
    fwd = median_time(lambda: conv(x), repeats, warmup=True)
  y = conv(x)
  dy = torch.randn_like(y)

  def backward():
    out = conv(x)
    torch.autograd.grad(out, (x, conv.weight), dy)
  total = median_time(backward, repeats, warmup=True)
  return {"forward_s": fwd, "backward_s": total - fwd, "torch_threads": torch.get_num_threads()}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--shape", default="2,64,128,32", help="batch and three spatial sides")
  ap.add_argument("--channels", type=int, default=16)
  ap.add_argument("--repeats", type=int, default=5)
  a = ap.parse_args()
  shape = tuple(int(v) for v in a.shape.split(","))
  result = {"machine": f"{os.cpu_count()} CPUs, {jax.devices()[0].platform}", "shape": shape, "channels": a.channels,
            "xla_3d": bench_jax("xla", shape, a.channels, a.repeats),
            "sliced": bench_jax("sliced", shape, a.channels, a.repeats)}
  try:
    result["pytorch"] = bench_torch(shape, a.channels, a.repeats)
  except ImportError as e:
    result["pytorch"] = f"not measured: {e}"
  print(json.dumps(result))


if __name__ == "__main__":
  main()

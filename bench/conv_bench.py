"""One stride-1 3D convolution on CPU: XLA's 3D convolution, SlicedConv (2D convolutions), the FFT form,
the fused tap sums, PyTorch's Conv3d.

  python bench/conv_bench.py [--shape=2,64,128,32] [--channels=16] [--in_channels=C] [--kernel=3] [--repeats=5]
  python bench/conv_bench.py --shape=4,72,80,16 --in_channels=10 --channels=8 --kernel=7 --impls=sliced,fft
  # (the instance network's first convolution)
  python bench/conv_bench.py --channels=8 --impls=sliced,tapsum  # the U-Nets' first stage
  python bench/conv_bench.py --shape=1,248,304,64 --in_channels=10 --channels=16 --kernel=7 --impls=fft \
      --fft_block_sides=40,48,64,72,96,0 --forward_only --repeats=3 --no_torch  # FFT_BLOCK_SIDE (0: whole axes)

Forward, and backward (input and weight gradients), each the median wall time of --repeats after a
warm-up, in one process; PyTorch's numbers need the torch extra. Prints one JSON line. This is why the
U-Nets compute with `conv='auto'` (sums of 2D convolutions, FFTs for kernels of 5^3 taps or more, fused
tap sums for few channels) on CPU (models/conv.py).
"""
import argparse
import json
import os

from _timing import median_time, torch_side
import jax

from spine_jax.models import conv as conv_lib



def bench_jax(impl, shape, in_channels, channels, kernel, repeats, forward_only=False, block_side=None):
  x = jax.random.normal(jax.random.key(0), (*shape, in_channels))
  w = jax.random.normal(jax.random.key(1), (kernel,) * 3 + (in_channels, channels)) * 0.1
  pad = ((kernel // 2, kernel // 2),) * 3
  if impl == "xla":
    f = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1, 1), pad, dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
  elif impl == "fft":
    f = lambda x, w: conv_lib.fft_conv(x, w, pad, block_side)
  elif impl == "tapsum":
    f = lambda x, w: conv_lib.tap_sum_conv(x, w, pad)
  else:
    f = lambda x, w: conv_lib.sliced_conv(x, w, (1, 1, 1), pad)
  fwd = jax.jit(f)
  result = {"forward_s": median_time(lambda: fwd(x, w).block_until_ready(), repeats, warmup=True)}
  if not forward_only:
    dy = fwd(x, w)
    bwd = jax.jit(lambda x, w, dy: jax.vjp(f, x, w)[1](dy))
    result["backward_s"] = median_time(lambda: jax.block_until_ready(bwd(x, w, dy)), repeats, warmup=True)
  return result


def bench_torch(shape, in_channels, channels, kernel, repeats, forward_only=False):
  import torch
  b, *spatial = shape
  x = torch.randn(b, in_channels, *spatial, requires_grad=True)
  conv = torch.nn.Conv3d(in_channels, channels, kernel, padding=kernel // 2)
  with torch.no_grad():
    fwd = median_time(lambda: conv(x), repeats, warmup=True)
  if forward_only:
    return {"forward_s": fwd, "torch_threads": torch.get_num_threads()}
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
  ap.add_argument("--channels", type=int, default=16, help="output channels (and input, without --in_channels)")
  ap.add_argument("--in_channels", type=int, default=None)
  ap.add_argument("--kernel", type=int, default=3, help="odd kernel side; 'same' padding")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--impls", default="xla,sliced,fft", help="spine_jax forms to time (xla's 7^3 takes minutes)")
  ap.add_argument("--fft_block_sides", default="",
                  help="time 'fft' at each of these overlap-save block sides (0: whole axes) instead of FFT_BLOCK_SIDE")
  ap.add_argument("--forward_only", action="store_true", help="skip the gradients")
  ap.add_argument("--no_torch", action="store_true", help="skip PyTorch's Conv3d")
  a = ap.parse_args()
  shape = tuple(int(v) for v in a.shape.split(","))
  args = (shape, a.in_channels or a.channels, a.channels, a.kernel, a.repeats, a.forward_only)
  result = {"machine": f"{os.cpu_count()} CPUs, {jax.devices()[0].platform}", "shape": shape,
            "in_channels": args[1], "channels": a.channels, "kernel": a.kernel}
  for impl in a.impls.split(","):
    if impl == "fft" and a.fft_block_sides:
      for side in (int(v) for v in a.fft_block_sides.split(",")):
        # 0: one block per axis, however long (channels-first FFTs and the loop over blocks all the same)
        result[f"fft_block_side_{side}"] = bench_jax(impl, *args, block_side=side or max(shape[1:]) + a.kernel)
    else:
      result[impl] = bench_jax(impl, *args)
  if not a.no_torch:
    result["pytorch"] = torch_side(bench_torch, *args)
  print(json.dumps(result))


if __name__ == "__main__":
  main()

"""Every benchmark of bench/run_all.py on this machine's accelerator (GPU or TPU), bf16 mixed precision on both sides.

  python bench/accelerator.py [--output=accel.json] [--only=a,b,e,f,g] [--peak_tflops=989] [--tiny]

Our side: the training configs' :gpu variants (batch and patch sizes for one 80 GB device, bfloat16 compute,
float32 parameters) on `jax.default_backend()`. PyTorch's side, where CUDA is available: the same networks under
`torch.autocast(bfloat16)` and `torch.compile`, as nnU-Net trains. Reported per workload: images or voxels per
second and model-FLOPs utilisation (XLA's FLOP count of our step over the time, against the chip's dense bf16
peak from the table below, or --peak_tflops). c and d (the SPINEPS-environment peers) run their peers on the
CPU, so they are left out unless named in --only.

--tiny runs the smoke networks in bf16 on whatever backend there is (the CI test on a CPU: torch.compile is
skipped there, and the share is against the measured bf16 matrix-multiply rate, for want of a chip peak).
"""
from __future__ import annotations

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import run_all  # noqa: E402

# Dense bf16 peaks, TFLOP/s, by a piece of `device_kind` (the first match wins: longer names first).
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("B200", 2250.0),
                    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0),
                    ("TPU v5p", 459.0), ("TPU v5", 459.0), ("TPU v6", 918.0), ("TPU v4", 275.0))
DEFAULT_ONLY = "abefg"


def chip_peak_tflops(device_kind: str) -> float | None:
  """The table's dense bf16 peak for a device kind (None when the kind is unknown, a CPU say)."""
  return next((peak for name, peak in PEAK_BF16_TFLOPS if name.lower() in device_kind.lower()), None)


def torch_kwargs() -> tuple[dict, str]:
  """The PyTorch peers' settings here, and a note on what was left out and why."""
  try:
    import torch
  except ImportError:
    return {}, "torch is not installed"
  if torch.cuda.is_available():
    return {"device": "cuda", "autocast": True, "compile_model": True}, "torch.autocast(bfloat16) + torch.compile, CUDA"
  return {"device": "cpu", "autocast": True, "compile_model": False}, \
      "torch.autocast(bfloat16) on the CPU; torch.compile skipped (no CUDA: nnU-Net compiles only on GPUs)"


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  peak_tflops = next((float(a.split("=", 1)[1]) for a in argv if a.startswith("--peak_tflops=")), None)
  argv = [a for a in argv if not a.startswith("--peak_tflops=")]
  if not any(a.startswith("--only") for a in argv):
    argv.append(f"--only={DEFAULT_ONLY}")
  args = run_all.parse_args(argv, __doc__)
  args.variant = "bf16" if args.tiny else "gpu"
  args.matmul_dtype = jnp.bfloat16
  args.torch_kwargs, torch_note = torch_kwargs()
  kind = jax.devices()[0].device_kind
  peak_tflops = peak_tflops or chip_peak_tflops(kind)
  args.peak_gflops = peak_tflops * 1e3 if peak_tflops else None
  report = run_all.run(args)
  report.update(backend=jax.default_backend(), device_kind=kind, torch=torch_note,
                peak_source="--peak_tflops or the table of chip peaks" if peak_tflops else "measured bf16 matmul")
  for row in report["workloads"].values():  # MFU: the share of the chip's peak, under its usual name
    for side in ("spine_jax", "peer"):
      if isinstance(row, dict) and isinstance(row.get(side), dict) and "share_of_peak" in row[side]:
        row[side]["mfu"] = row[side]["share_of_peak"]
  print(f"backend {report['backend']} ({kind}); peak {report['peak_gflops_used'] / 1e3:.1f} TFLOP/s "
        f"({report['peak_source']}); PyTorch: {torch_note}")
  run_all.print_table(report)
  if args.output:
    pathlib.Path(args.output).write_text(json.dumps(report, indent=1, default=str))
  return 0


if __name__ == "__main__":
  sys.exit(main())

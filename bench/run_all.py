"""Every benchmark in one command: spine_jax against its peer, side by side, a table and a JSON file.

  python bench/run_all.py [--output=bench.json] [--only=a,b,...] [--tasks=semantic,...] [--repeats=5] [--tiny]

Workloads (letters for --only):
  a  DenseNet-121 multi-task (bone_quality) training step and eval forward; peer MONAI's DenseNet with the same
     trunk preset and the same heads (bench/densenet_bench.py `torch_multitask_calls`).
  b  semantic U-Net training step, configs/semantic.py (CPU default) and :nnunet (nnU-Net 3d_fullres plan); peer
     dynamic_network_architectures' PlainConvUNet, SGD, CE over the deep-supervision outputs (bench/unet_bench.py).
  c  whole-volume sliding window with mirroring on all three axes; peer nnU-Net v2's own `nnUNetPredictor`
     on the same weights (exported with `convert export_spineps`).
  d  the instance phase (phase 2 to the raw instance mask) on a phantom spine, both of our modes; peer SPINEPS'
     `phase_instance.predict_instance_mask` with the same weights.
  e  each task's grain pipeline: samples per second against what its training step consumes.
  f  compile time of each training step, cold (empty persistent cache) and warm (the same cache, new process).
  g  peak memory of each training step: XLA's buffer assignment (`memory_analysis`) and, for both sides, the
     process's resident-memory high-water over one step above its level before it (sampled every millisecond;
     the allocators' caches make it a lower bound).

Pairs that can live in one process (a, b) alternate call by call after a warm-up. nnU-Net v2 and SPINEPS live
in their own virtualenv (scripts/spineps_env.sh): c and d time the peer in a worker process there
(tests/spineps_oracle.py), rounds alternating with ours, each side timed inside its own process. The networks
of c and d are freshly initialised (random weights): the cost is the same, the masks are not meaningful.
GFLOP/s: XLA's cost analysis of our compiled step (the same count divides the peer's time), against the
machine's measured matrix-multiply peak (an XLA float32 dot, numpy's too). A peer that is not installed is
"not measured: reason". --tiny: tiny widths and volumes and one or two repeats (the CI test).

Over 400 lines because the seven workloads share one set of helpers and one table; each workload is one function.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

BENCH = pathlib.Path(__file__).resolve().parent
ROOT = BENCH.parent
for _path in (str(ROOT), str(BENCH)):
  if _path not in sys.path:
    sys.path.insert(0, _path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from _timing import alternate, median_time, not_measured, summary  # noqa: E402
import functools  # noqa: E402

WORKLOADS = "abcdefg"
PEAK_MATMUL_SIDE = 2048
TASKS = ("bone_quality", "semantic", "semantic_nnunet", "instance", "labeling")
# Training phantoms a benchmarked step's pipeline prepares: a step needs one batch and e the pipeline's steady
# rate, not a whole training split (the labelling task's 128 phantoms take 77 s to prepare on the 2-core CPU).
BENCH_TRAIN_VOLUMES = 8


# --- Sizes ---------------------------------------------------------------------------------------------------


def task_config(name: str, tiny: bool, variant: str = ""):
  """The training config of a benchmarked step: the config files' own (tiny: their smoke variants), DenseNet-121
  for bone quality; `variant` 'gpu' adds the configs' :gpu variant, 'bf16' sets bfloat16 compute."""
  module = importlib.import_module(f"configs.{name.replace('_nnunet', '')}")
  variants = (["nnunet"] if name.endswith("_nnunet") else []) + (["smoke"] if tiny else []) + \
      ([variant] if variant and variant != "bf16" else [])
  config = module.get_config(",".join(variants))
  if variant == "bf16":
    config.model.dtype = "bfloat16"
  phantom = config.data.get("phantom")
  if phantom is not None and phantom.get("num_train_volumes") is not None:
    phantom.num_train_volumes = min(int(phantom.num_train_volumes), BENCH_TRAIN_VOLUMES)
  if name == "bone_quality" and variant != "gpu":
    config.model.trunk = "small" if tiny else "densenet121"
  if tiny:
    config.batch_size = 2
  return config


# --- Measuring -----------------------------------------------------------------------------------------------


def matmul_peak(side: int = PEAK_MATMUL_SIDE, dtype=jnp.float32) -> dict:
  """GFLOP/s of an XLA dot of two side x side matrices on the default device, and of numpy's (float32)."""
  a = jnp.ones((side, side), dtype)
  dot = jax.jit(jnp.dot)
  xla = median_time(lambda: dot(a, a).block_until_ready(), 3, warmup=True)
  b = np.ones((side, side), np.float32)
  host = median_time(lambda: b @ b, 3, warmup=True)
  flops = 2.0 * side ** 3
  return {"side": side, "dtype": str(jnp.dtype(dtype)), "xla_gflops": flops / xla / 1e9, "numpy_gflops": flops / host / 1e9}


def _rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_peak_delta(fn) -> int | None:
  """Resident-memory high-water of one call of fn above the level before it, sampled every millisecond
  (None where /proc is absent)."""
  if not os.path.exists("/proc/self/statm"):
    return None
  base, peak, done = _rss_bytes(), [0], threading.Event()

  def sample():
    while not done.is_set():
      peak[0] = max(peak[0], _rss_bytes())
      time.sleep(0.001)
  thread = threading.Thread(target=sample, daemon=True)
  thread.start()
  try:
    fn()
  finally:
    done.set()
    thread.join()
  return max(0, max(peak[0], _rss_bytes()) - base)


def cost_flops(compiled) -> float | None:
  """FLOPs of a compiled XLA program by its cost analysis (None where the backend gives none)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - backends without a cost model
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def xla_memory(compiled) -> dict | None:
  """XLA's buffer assignment of a compiled program: arguments + outputs + temporaries - donated aliases."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001
    return None
  if m is None:
    return None
  total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  return {"peak_bytes": int(total), "temp_bytes": int(m.temp_size_in_bytes), "argument_bytes": int(m.argument_size_in_bytes)}


def available_bytes() -> int | None:
  """The kernel's estimate of memory available to a new allocation (MemAvailable; None without /proc)."""
  try:
    with open("/proc/meminfo") as f:
      return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
  except (OSError, StopIteration, ValueError):
    return None


def memory_shortfall(memory: dict | None, available: int | None, share: float = 0.9) -> str | None:
  """Why a compiled step cannot run here (None when it fits): XLA's buffer assignment above `share` of the
  available memory would have the kernel's OOM killer end the whole run."""
  need = (memory or {}).get("peak_bytes")
  if need is None or available is None or need <= share * available:
    return None
  return (f"XLA's buffer assignment needs {need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB is available here "
          f"(the peer is not run either)")


def torch_reason() -> str | None:
  """Why the PyTorch peers cannot run here (None when they can)."""
  for module in ("torch", "monai", "dynamic_network_architectures"):
    try:
      importlib.import_module(module)
    except ImportError as e:
      return f"{module} is not installed ({e}); pip install -e '.[torch]'"
  return None


def pair(ours: list[float], peer, *, flops: float | None, peak_gflops: float, items: float, unit: str,
         peer_name: str, how: str) -> dict:
  """A table row: our and the peer's times (or the peer's reason), the ratio of medians, GFLOP/s and share."""
  row = {"peer_name": peer_name, "how": how, "unit": unit, "flops": flops, "spine_jax": summary(ours)}
  sides = [("spine_jax", row["spine_jax"])]
  if isinstance(peer, str):
    row["peer"] = peer
  else:
    row["peer"] = summary(peer)
    sides.append(("peer", row["peer"]))
    row["ratio_peer_over_ours"] = row["peer"]["median_s"] / row["spine_jax"]["median_s"]
  for _, side in sides:
    side["throughput"] = items / side["median_s"]
    if flops:
      side["gflops"] = flops / side["median_s"] / 1e9
      side["share_of_peak"] = side["gflops"] / peak_gflops
  return row


# --- Our training steps ----------------------------------------------------------------------------------------


class Step:
  """A task's real training step (training/steps.py), compiled once, on one batch of its real pipeline."""

  def __init__(self, config):
    from spine_jax.engine import mesh as mesh_lib
    from spine_jax.engine import state as state_lib
    from spine_jax.training import tasks
    self.config, self.task = config, tasks.get_task(config)
    self.iterator = self.task.train_iterator()
    start = time.perf_counter()
    self.host_batch = next(self.iterator)
    self.first_batch_s = time.perf_counter() - start
    mesh = mesh_lib.make_mesh(1)
    tx = state_lib.make_optimizer(config.optimizer, config.num_train_steps)
    self.state = state_lib.create_train_state(self.task.model, tx, self.task.init_shape, jax.random.key(0), mesh)
    self.batch = jax.device_put(self.host_batch)
    jitted = jax.jit(functools.partial(self.task.train_step, config=config), donate_argnums=0)
    start = time.perf_counter()
    self.compiled = jitted.lower(self.state, self.batch).compile()
    self.compile_s = time.perf_counter() - start
    self.flops, self.memory = cost_flops(self.compiled), xla_memory(self.compiled)
    self.shortfall = memory_shortfall(self.memory, available_bytes())  # a reason not to run it, or None

  @property
  def batch_size(self) -> int:
    return int(self.config.batch_size)

  def __call__(self) -> None:
    if self.shortfall:
      raise MemoryError(self.shortfall)
    self.state, metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready(metrics["loss"])


_STEPS: dict = {}


def our_step(name: str, args) -> Step:
  """One Step per task and run (a, b, e, g share them)."""
  if name not in _STEPS:
    _STEPS[name] = Step(task_config(name, args.tiny, args.variant))
  return _STEPS[name]


def _voxels(step: Step) -> int:
  x = step.host_batch.get("image", step.host_batch.get("input", step.host_batch.get("patch")))
  return int(np.prod(np.shape(x)[:4 if np.ndim(x) >= 4 else 1]))


# --- Workloads -------------------------------------------------------------------------------------------------


def multitask_peer(step: Step, args) -> dict:
  """The MONAI peer of the multi-task step: our trunk preset, our heads (sizes read off our model's outputs)."""
  from densenet_bench import torch_multitask_calls
  from spine_jax.models import multitask
  images = step.batch["image"]
  shapes = jax.eval_shape(lambda: step.task.model.apply(
      {"params": step.state.params, "batch_stats": step.state.batch_stats}, images, train=False))
  heads = {name: (int(s.shape[-1]) if len(s.shape) == 2 else 1) for name, s in shapes.items()}
  return torch_multitask_calls(multitask.trunk_fields(step.config.model), heads, int(step.config.model.mlp_hidden),
                               step.batch_size, tuple(images.shape[1:3]), int(images.shape[-1]), **args.torch_kwargs)


def bench_densenet(args, peak: float) -> dict:
  """(a) the multi-task DenseNet: training step and eval forward, alternating with MONAI's."""
  from spine_jax.engine import predict as predict_lib
  step = our_step("bone_quality", args)
  images = step.batch["image"]
  forward = jax.jit(predict_lib.classifier_probabilities).lower(step.state, images).compile()
  ours = {"train_step": step, "forward": lambda: jax.block_until_ready(forward(step.state, images))}
  reason = torch_reason()
  peer = {} if reason else multitask_peer(step, args)
  out = {}
  for kind, flops in (("train_step", step.flops), ("forward", cost_flops(forward))):
    calls = {"ours": ours[kind]} | ({"peer": peer[kind]} if peer else {})
    times = alternate(calls, args.repeats)
    out[f"a_densenet_{kind}"] = pair(times["ours"], times.get("peer", not_measured(reason or "")), flops=flops,
                                     peak_gflops=peak, items=step.batch_size, unit="images/s",
                                     peer_name="MONAI DenseNet, same heads", how="one process, alternating")
  return out


def bench_unet(args, peak: float) -> dict:
  """(b) the semantic U-Net's training step at the CPU default and the nnU-Net plan, alternating with
  PlainConvUNet's (SGD, CE: nnU-Net's Dice term adds little compute)."""
  from unet_bench import torch_calls
  out = {}
  reason = torch_reason()
  for name in ("semantic", "semantic_nnunet"):
    step = our_step(name, args)
    if step.shortfall:
      out[f"b_{name}_train_step"] = not_measured(step.shortfall)
      continue
    calls = {"ours": step}
    if not reason:
      patch = tuple(step.config.data.patch.patch_size)
      calls["peer"] = torch_calls(step.config.model, patch, step.batch_size, **args.torch_kwargs)["train_step"]
    times = alternate(calls, args.repeats)
    out[f"b_{name}_train_step"] = pair(times["ours"], times.get("peer", not_measured(reason or "")), flops=step.flops,
                                       peak_gflops=peak, items=_voxels(step), unit="voxels/s",
                                       peer_name="dynamic_network_architectures PlainConvUNet, SGD",
                                       how="one process, alternating")
  return out


def _spineps_reason() -> str | None:
  from tests import spineps_oracle
  return spineps_oracle.available() or torch_reason()


def _write_bundles(folder: pathlib.Path, args) -> dict:
  """Freshly initialised semantic (mirroring on every axis, nnU-Net's own way: no left-right swap) and instance
  (SPINEPS' Unet3D) bundles, and their SPINEPS/nnU-Net folders from `export_spineps`."""
  from spine_jax.conversion import export_spineps, spineps
  from spine_jax.engine import bundle
  from spine_jax.models import instance_unet, unet
  semantic = task_config("semantic", args.tiny)
  semantic.inference.mirror_axes = (0, 1, 2)
  semantic.inference.mirror_swaps_left_right = False
  model = unet.build_unet(semantic.model)
  patch = tuple(semantic.data.patch.patch_size)
  variables = model.init(jax.random.key(0), jnp.zeros((1, *patch, semantic.model.in_channels)), train=False)
  bundle.write_bundle(folder / "semantic", semantic, variables)
  instance = spineps.spineps_instance_config()
  if args.tiny:
    instance.model.update(dim=8)
    instance.data.cutout.cutout_size = (32, 48, 16)
  cutout = tuple(instance.data.cutout.cutout_size)
  params = instance_unet.build_instance_unet(instance.model).init(jax.random.key(1), jnp.zeros((1, *cutout, 10)))
  bundle.write_bundle(folder / "instance", instance, {"params": params["params"]})
  export_spineps.export_pair(folder / "exported", semantic_checkpoint=folder / "semantic",
                             instance_checkpoint=folder / "instance")
  return {"semantic": semantic, "instance": instance}


def bench_sliding_window(args, peak: float, folder: pathlib.Path) -> dict:
  """(c) whole-volume sliding window with mirroring: ours in this process, nnUNetPredictor in SPINEPS' env."""
  from spine_jax.data import spine_labels
  from spine_jax.engine import predict as predict_lib
  from spine_jax.inference import restore, sliding_window
  from tests import spineps_oracle
  state, config, mesh = restore.load_for_inference(folder / "semantic", "semantic")
  patch = tuple(config.data.patch.patch_size)
  shape = tuple(int(p * (1.0 if args.tiny else 2.5)) for p in patch)  # tiny: one window (and its mirrors)
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)  # z-scored input; the cost is content-free
  mirror = tuple(config.inference.mirror_axes)
  fn = predict_lib.semantic_logits_fn(state, mesh)
  batch = int(config.inference.batch_size)

  def ours():
    sliding_window.sliding_window_predict(fn, x[..., None], patch, spine_labels.NUM_CLASSES, step_size=config.inference.step_size,
                                          batch_size=batch, mirror_axes=mirror, mode=sliding_window.window_mode_of(config.inference))
  windows = math.prod(len(s) for s in sliding_window.sliding_window_steps(shape, patch))
  forward = jax.jit(predict_lib.segmentation_logits).lower(state, jnp.zeros((batch, *patch, 1))).compile()
  per_batch = cost_flops(forward)
  flops = per_batch * math.ceil(windows / batch) * 2 ** len(mirror) if per_batch else None
  reason = _spineps_reason()
  ours()
  mine, theirs, extra = [], [], {}
  for _ in range(args.rounds):
    start = time.perf_counter()
    ours()
    mine.append(time.perf_counter() - start)
    if not reason:
      got = spineps_oracle.call("worker.nnunet_predict_timed", {"data": np.ascontiguousarray(x.T)[None]},
                                folder=str(folder / "exported" / "semantic"), repeats=1)
      theirs += [float(s) for s in got["seconds"]]
      extra = {"peer_mirror_axes": got["mirror_axes"].tolist(), "peer_load_s": float(got["load_s"])}
  row = pair(mine, theirs if theirs else not_measured(reason), flops=flops, peak_gflops=peak, items=math.prod(shape),
             unit="voxels/s", peer_name="nnU-Net v2 nnUNetPredictor (SPINEPS env)",
             how="rounds alternating, each side timed in its own process")
  row.update(volume=list(shape), patch=list(patch), windows=windows, mirror_axes=list(mirror), **extra)
  return {"c_sliding_window": row}


def bench_instance_phase(args, folder: pathlib.Path) -> dict:
  """(d) phase 2 to the raw instance mask, both our modes, against SPINEPS' predict_instance_mask."""
  from spine_jax.data.phantoms import mri
  from spine_jax.engine import predict as predict_lib
  from spine_jax.inference import restore
  from spine_jax.inference.phase2 import common as phase2_common
  from spine_jax.inference.phase2 import pipeline
  from tests import spineps_oracle
  state, config, mesh = restore.load_for_inference(folder / "instance", "instance")
  zoom = tuple(float(z) for z in config.data.preprocess.spacing)
  semantic = mri.make_spine(np.random.default_rng(0), mri.smoke_config() if args.tiny else None)["semantic"]
  predict_fn = predict_lib.instance_predict_fn(state, mesh)
  calls = {}
  for mode in phase2_common.PHASE2_MODES:
    cfg = phase2_common.default_instance_config()
    cfg.phase2_mode, cfg.cutout_size = mode, tuple(config.data.cutout.cutout_size)
    calls[mode] = (lambda c=cfg: pipeline.instance_mask(semantic, predict_fn, c, spacing=zoom))
  reason = _spineps_reason()
  times = alternate(calls, 0)
  theirs, extra = [], {}
  for _ in range(args.rounds):
    for mode, t in alternate(calls, 1, warmup=0).items():
      times[mode] += t
    if not reason:
      got = spineps_oracle.call("worker.instance_phase_timed", {"semantic": semantic}, folder=str(folder / "exported" / "instance"),
                                zoom=list(zoom), repeats=1)
      theirs += [float(s) for s in got["seconds"]]
      extra = {"peer_errcode": str(got["errcode"]), "peer_load_s": float(got["load_s"])}
  out = {}
  for mode, mine in times.items():
    row = pair(mine, theirs if theirs else not_measured(reason), flops=None, peak_gflops=1.0, items=1, unit="masks/s",
               peer_name="SPINEPS predict_instance_mask (SPINEPS env)",
               how="rounds alternating, each side timed in its own process; FLOPs not counted")
    row.update(mask_shape=list(semantic.shape), mode=mode, **extra)
    out[f"d_instance_phase_{mode}"] = row
  return out


def bench_pipelines(args) -> dict:
  """(e) each task's grain pipeline: batches drawn in a row (after the first and the read-ahead) against the step's
  consumption."""
  from spine_jax.data import pipelines
  out = {}
  for name in args.tasks:
    step = our_step(name, args)
    for _ in range(0 if args.tiny else pipelines.PREFETCH_BATCHES):  # drain what was read ahead: the steady rate
      next(step.iterator)
    n = 2 if args.tiny else 20
    start = time.perf_counter()
    for _ in range(n):
      next(step.iterator)
    produced = n * step.batch_size / (time.perf_counter() - start)
    consumed = None if step.shortfall else step.batch_size / median_time(step, args.repeats, warmup=True)
    out[f"e_pipeline_{name}"] = {"samples_per_s": produced,
                                 "step_consumes_per_s": consumed or not_measured(step.shortfall),
                                 "pipeline_over_step": produced / consumed if consumed else None,
                                 "first_batch_s": step.first_batch_s,
                                 "batches_drawn": n, "workers": int(step.config.data.get("num_workers", 0) or 0)}
  return out


def _compile_specs(args) -> dict:
  return {name: {"tiny": args.tiny, "variant": args.variant} for name in args.tasks}


def compile_worker(specs: dict, cache: str) -> dict:
  """In a new process: lower and compile each training step against the persistent cache at `cache`."""
  if any(spec["tiny"] for spec in specs.values()):
    jax.config.update("jax_disable_most_optimizations", True)
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  from spine_jax.engine import mesh as mesh_lib
  from spine_jax.engine import state as state_lib
  from spine_jax.training import tasks
  out = {}
  for name, spec in specs.items():
    config = task_config(name, spec["tiny"], spec["variant"])
    task = tasks.get_task(config)
    tx = state_lib.make_optimizer(config.optimizer, config.num_train_steps)
    state = state_lib.abstract_train_state(task.model, tx, task.init_shape, mesh_lib.make_mesh(1))
    batch = next(task.train_iterator())
    batch = jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype), batch)
    start = time.perf_counter()
    jax.jit(functools.partial(task.train_step, config=config), donate_argnums=0).lower(state, batch).compile()
    out[name] = time.perf_counter() - start
  return out


def bench_compile(args) -> dict:
  """(f) each training step's compile time in a new process: cold (empty cache), then warm (the same cache)."""
  out = {}
  with tempfile.TemporaryDirectory(prefix="spine_jax_bench_cache_") as cache:
    for phase in ("cold", "warm"):
      done = subprocess.run([sys.executable, __file__, f"--_compile_worker={json.dumps(_compile_specs(args))}",
                             f"--_cache={cache}"], capture_output=True, text=True, cwd=ROOT, check=False,
                            env={k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")})
      if done.returncode:
        return {"f_compile": not_measured(f"compile worker failed: {done.stderr[-800:]}")}
      for name, seconds in json.loads(done.stdout.strip().splitlines()[-1]).items():
        out.setdefault(f"f_compile_{name}", {})[f"{phase}_s"] = seconds
  return out


def bench_memory(args) -> dict:
  """(g) each training step's peak memory: XLA's buffer assignment, and the RSS high-water of one step on both
  sides (the peers of a and b)."""
  from unet_bench import torch_calls
  reason = torch_reason()
  out = {}
  for name in args.tasks:
    step = our_step(name, args)
    row = {"spine_jax_xla_bytes": (step.memory or {}).get("peak_bytes")}
    if step.shortfall:
      out[f"g_memory_{name}"] = {**row, "spine_jax_rss_delta_bytes": not_measured(step.shortfall)}
      continue
    step()
    row["spine_jax_rss_delta_bytes"] = rss_peak_delta(step)
    if name.startswith("semantic") and not reason:
      peer = torch_calls(step.config.model, tuple(step.config.data.patch.patch_size), step.batch_size,
                         **args.torch_kwargs)["train_step"]
    elif name == "bone_quality" and not reason:
      peer = multitask_peer(step, args)["train_step"]
    else:
      peer = None
      row["peer"] = not_measured(reason or "no peer training step in this harness for this task")
    if peer is not None:
      peer()
      row["peer_rss_delta_bytes"] = rss_peak_delta(peer)
      if args.torch_kwargs.get("device") == "cuda":
        import torch
        torch.cuda.reset_peak_memory_stats()
        peer()
        row["peer_cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    out[f"g_memory_{name}"] = row
  return out


# --- The run ---------------------------------------------------------------------------------------------------


def run(args) -> dict:
  """Every selected workload; a workload that fails is reported with its error, the others still run."""
  args.rounds = 1 if args.tiny else args.repeats
  if args.tiny:  # the CI run checks the harness, not XLA's optimiser: compile fast
    jax.config.update("jax_disable_most_optimizations", True)
  peak = matmul_peak(256 if args.tiny else PEAK_MATMUL_SIDE, args.matmul_dtype)
  report = {"machine": f"{os.cpu_count()} CPUs, {jax.default_backend()} ({jax.devices()[0].device_kind})",
            "tiny": args.tiny, "repeats": args.repeats, "variant": args.variant, "matmul_peak": peak, "workloads": {}}
  peak_gflops = args.peak_gflops or peak["xla_gflops"]
  report["peak_gflops_used"] = peak_gflops
  with tempfile.TemporaryDirectory(prefix="spine_jax_bench_") as tmp:
    folder = pathlib.Path(tmp)
    jobs = {"a": lambda: bench_densenet(args, peak_gflops), "b": lambda: bench_unet(args, peak_gflops),
            "c": lambda: bench_sliding_window(args, peak_gflops, folder), "d": lambda: bench_instance_phase(args, folder),
            "e": lambda: bench_pipelines(args), "f": lambda: bench_compile(args), "g": lambda: bench_memory(args)}
    bundles = None
    for letter in args.only:
      if letter in "cd" and bundles is None:
        bundles = _write_bundles(folder, args)
      try:
        report["workloads"].update(jobs[letter]())
      except Exception as e:  # noqa: BLE001 - one workload's failure is reported, the run goes on
        report["workloads"][f"{letter}_failed"] = not_measured(f"{type(e).__name__}: {e}")
    for name, step in _STEPS.items():
      report["workloads"].setdefault(f"f_compile_{name}", {})["in_run_s"] = step.compile_s
  return report


def _fmt(v, spec=".3g") -> str:
  return "-" if v is None else format(v, spec)


def print_table(report: dict) -> None:
  print(f"{report['machine']}; matmul peak {report['peak_gflops_used']:.1f} GFLOP/s "
        f"(XLA {report['matmul_peak']['xla_gflops']:.1f}, numpy {report['matmul_peak']['numpy_gflops']:.1f})")
  print("| workload | ours median s (min-max) | peer median s (min-max) | peer/ours | ours GFLOP/s (% peak) | "
        "peer GFLOP/s (% peak) | throughput ours / peer | peer, how |")
  print("|---|---|---|---|---|---|---|---|")
  for name, row in report["workloads"].items():
    if isinstance(row, str):
      print(f"| {name} | {row} |")
    elif "spine_jax" in row:
      cells = []
      for side in ("spine_jax", "peer"):
        s = row[side]
        cells.append(s if isinstance(s, str) else f"{s['median_s']:.3g} ({s['min_s']:.3g}-{s['max_s']:.3g})")
      rate = [(f"{row[s]['gflops']:.3g} ({100 * row[s]['share_of_peak']:.1f}%)" if isinstance(row[s], dict) and
               "gflops" in row[s] else "-") for s in ("spine_jax", "peer")]
      thru = " / ".join(_fmt(row[s]["throughput"]) if isinstance(row[s], dict) else "-" for s in ("spine_jax", "peer"))
      print(f"| {name} | {cells[0]} | {cells[1]} | {_fmt(row.get('ratio_peer_over_ours'))} | {rate[0]} | {rate[1]} | "
            f"{thru} {row['unit']} | {row['peer_name']}; {row['how']} |")
    else:
      print(f"| {name} | " + ", ".join(f"{k} {_fmt(v) if isinstance(v, (int, float)) else v}" for k, v in row.items()) + " |")


def parse_args(argv=None, description: str = __doc__):
  ap = argparse.ArgumentParser(description=description.splitlines()[0])
  ap.add_argument("--output", default="", help="write the report here as JSON")
  ap.add_argument("--only", default=WORKLOADS, help="workload letters, e.g. a,c (default: all)")
  ap.add_argument("--repeats", type=int, default=None, help="timed calls per side (default 5; --tiny 2)")
  ap.add_argument("--tiny", action="store_true", help="tiny widths and volumes, few repeats (CI)")
  ap.add_argument("--tasks", default=",".join(TASKS), help="the training steps of e, f and g (default: all)")
  ap.add_argument("--peak_gflops", type=float, default=None, help="the peak to share against (default: measured)")
  ap.add_argument("--_compile_worker", default="", help=argparse.SUPPRESS)
  ap.add_argument("--_cache", default="", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  args.only = [c for c in args.only.replace(",", "") if c.strip()]
  unknown = sorted(set(args.only) - set(WORKLOADS))
  if unknown:
    ap.error(f"--only: unknown workload(s) {unknown}; known: {', '.join(WORKLOADS)}")
  args.tasks = [t for t in args.tasks.split(",") if t]
  if set(args.tasks) - set(TASKS):
    ap.error(f"--tasks: unknown task(s) {sorted(set(args.tasks) - set(TASKS))}; known: {', '.join(TASKS)}")
  args.repeats = args.repeats or (2 if args.tiny else 5)
  args.variant, args.torch_kwargs, args.matmul_dtype = "", {}, jnp.float32
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  if args._compile_worker:
    print(json.dumps(compile_worker(json.loads(args._compile_worker), args._cache)))
    return 0
  report = run(args)
  print_table(report)
  if args.output:
    pathlib.Path(args.output).write_text(json.dumps(report, indent=1, default=str))
  return 0


if __name__ == "__main__":
  sys.exit(main())

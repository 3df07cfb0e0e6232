"""The training loop shared by every task: resume, steps, logging, checkpoints, signals, evaluation."""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pathlib
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from spine_jax.data import nifti
from spine_jax.engine import bundle
from spine_jax.engine import checkpoints
from spine_jax.engine import mesh as mesh_lib
from spine_jax.engine import state as state_lib
from spine_jax.metrics import classification
from spine_jax.training import steps
from spine_jax.training import tasks

PREEMPTED_EXIT_CODE = 42  # launch scripts requeue a run that exits with this after SIGTERM


class MetricWriter:
  """JSON lines and TensorBoard events, from process 0 only."""

  def __init__(self, workdir: pathlib.Path):
    self._active = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    if self._active:
      self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(str(workdir / "tensorboard"))
      except ImportError:
        logging.warning("tensorboardX is not installed: metrics go to metrics.jsonl only")

  def write(self, step: int, scalars: dict[str, float], prefix: str = "train") -> None:
    if not self._active:
      return
    self._jsonl.write(json.dumps({"step": step, "split": prefix, **scalars}, default=_jsonable) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(f"{prefix}/{k}", v, step)
      self._tb.flush()

  def close(self):
    if self._jsonl:
      self._jsonl.close()
    if self._tb:
      self._tb.close()


def _jsonable(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON serialisable: {type(x)}")


class _SigtermFlag:
  """Notes SIGTERM (what schedulers send before preemption) so the loop can checkpoint and leave."""

  def __init__(self):
    self.raised = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.raised = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class _StopVote:
  """All processes agree on the step at which to stop after a SIGTERM, which may reach only some of them.

  Each step launches an any-reduce of every process's flag (a jitted max over the mesh) and reads the
  one launched a step earlier, which has finished by then: every process reads the same value at the
  same step, and the loop never waits on it. One process alone decides for itself at once.
  """

  def __init__(self, mesh):
    self._multi = jax.process_count() > 1
    self._pending = None
    if self._multi:  # the two possible inputs, built once
      sharding = mesh_lib.batch_sharding(mesh)
      self._flags = [jax.make_array_from_process_local_data(sharding, np.full((len(mesh.local_devices),), v, np.int32))
                     for v in (0, 1)]
      self._any = jax.jit(jnp.max, out_shardings=mesh_lib.replicated(mesh))

  def __call__(self, raised: bool) -> bool:
    if not self._multi:
      return raised
    previous, self._pending = self._pending, self._any(self._flags[int(raised)])
    return previous is not None and bool(previous)


class _Watchdog:
  """Ends this process when no training step finishes for `timeout` seconds.

  A dead peer is caught by JAX (its heartbeats stop, its sockets close); a peer that is alive but stuck
  keeps heartbeating and would hold every collective forever. Armed from the first finished step (not
  during compilation) and paused around checkpoints and evaluations.
  """

  EXIT_CODE = 3

  def __init__(self, timeout: float):
    self._timeout = timeout
    self._last = None
    self._done = threading.Event()
    self._who = f"process {jax.process_index()}/{jax.process_count()}"

  def __enter__(self):
    if self._timeout > 0:
      threading.Thread(target=self._watch, name="step-watchdog", daemon=True).start()
    return self

  def __exit__(self, *exc):
    self._done.set()

  def kick(self):
    self._last = time.monotonic()

  @contextlib.contextmanager
  def paused(self):
    self._last = None
    try:
      yield
    finally:
      self.kick()

  def _watch(self):
    while not self._done.wait(min(self._timeout / 4, 5.0)):
      last = self._last
      if last is not None and time.monotonic() - last > self._timeout:
        print(f"error: {self._who}: no training step finished in {self._timeout:g} s (--step_timeout); another "
              f"process has probably died or hung. Exiting with {self.EXIT_CODE}; rerun to resume from the latest "
              f"checkpoint.", file=sys.stderr, flush=True)
        os._exit(self.EXIT_CODE)


def fingerprint(tree) -> str:
  """A short hash of this process's copy of replicated arrays: equal on every process of a healthy run."""
  h = hashlib.sha256()
  for x in jax.tree.leaves(tree):
    h.update(np.ascontiguousarray(jax.device_get(x.addressable_data(0))).tobytes())
  return h.hexdigest()[:16]


class Preempted(SystemExit):
  def __init__(self, step: int):
    super().__init__(PREEMPTED_EXIT_CODE)
    self.step = step


def _say(msg: str) -> None:
  """Progress for the person running the command: process 0 only, on stdout (library logs stay quiet)."""
  if jax.process_index() == 0:
    print(msg, flush=True)


def _progress(step, total, scalars, rate, elapsed) -> str:
  eta = (total - step) / rate if rate > 0 else float("nan")
  shown = " | ".join(f"{k} {v:.4g}" for k, v in scalars.items() if k in
                     ("loss", "plain_loss", "spl_kept", "acc_quality", "acc_posterolateral", "lr", "dice"))
  return (f"step {step}/{total} | {shown} | {rate:.2f} steps/s | elapsed {elapsed / 60:.1f} min | "
          f"ETA {eta / 60:.1f} min")


def _for_eval(state, eval_mesh):
  """The state on the mesh evaluation runs on: as is in one process, this process's copy in many."""
  return state if jax.process_count() == 1 else mesh_lib.local_copy(state, eval_mesh)


def train_and_evaluate(config, workdir, *, step_timeout: float = 0.0) -> dict:
  """Trains `config.task` in `workdir`, resuming from its latest checkpoint, then evaluates.

  Every process of a multi-process run calls this; there `step_timeout` bounds how long one waits for
  a step (see _Watchdog).
  """
  workdir = pathlib.Path(workdir).absolute()
  task = tasks.get_task(config)
  mesh = mesh_lib.make_mesh()
  mesh_lib.local_batch_size(config.batch_size, mesh)  # fails early on a batch the mesh cannot split
  print(mesh_lib.describe(mesh), flush=True)  # every process: its devices and the mesh
  tx = state_lib.make_optimizer(config.optimizer, config.num_train_steps)
  abstract = state_lib.abstract_train_state(task.model, tx, task.init_shape, mesh)
  state_sharding = jax.tree.map(lambda s: s.sharding, abstract)

  latest = checkpoints.latest_step(workdir)
  resuming = latest is not None
  data_iter = None  # a run already at its last step only evaluates: no training data to prepare
  if latest is None or latest < config.num_train_steps:
    t0 = time.time()
    data_iter = task.train_iterator()
    _say(f"training data ready in {time.time() - t0:.1f} s")
  if not resuming:  # before the work directory is made: a bad init_from leaves nothing behind
    state = state_lib.create_train_state(task.model, tx, task.init_shape, jax.random.key(config.seed), mesh)
    state = task.initial_state(state)  # e.g. pretrained weights (config.model.init_from)
  workdir.mkdir(parents=True, exist_ok=True)
  mngr = checkpoints.manager(workdir, max_to_keep=config.keep_checkpoints)
  if resuming:
    state, start = checkpoints.restore(mngr, abstract, data_iter, step=latest)
    _say(f"resumed from step {start} in {workdir}" + (" (training done: evaluating)" if data_iter is None else ""))
  else:
    start = 0
    _say(f"new run in {workdir}: {state_lib.count_params(state.params):,} parameters")

  train_step = steps.jit_train_step(task.train_step, config, state_sharding, mesh_lib.batch_sharding(mesh))
  lr_fn = state_lib.learning_rate_schedule(config.optimizer, config.num_train_steps)
  writer = MetricWriter(workdir)
  stop_vote = _StopVote(mesh)
  eval_mesh = mesh if jax.process_count() == 1 else mesh_lib.local_mesh()
  pending = []
  step = start
  t_log, step_log, t_start = time.time(), start, time.time()
  try:
    with _SigtermFlag() as sigterm, _Watchdog(step_timeout if jax.process_count() > 1 else 0.0) as watchdog:
      while step < config.num_train_steps:
        batch = mesh_lib.global_batch(next(data_iter), mesh)
        state, metrics = train_step(state, batch)
        step += 1
        stop = stop_vote(sigterm.raised)
        watchdog.kick()
        pending.append(metrics)
        if step % config.log_every == 0 or step == config.num_train_steps:
          scalars = {k: float(np.mean([m[k] for m in jax.device_get(pending)])) for k in pending[0]}
          scalars["lr"] = float(lr_fn(step - 1))
          pending = []
          now = time.time()
          rate = (step - step_log) / max(now - t_log, 1e-9)
          scalars["steps_per_s"] = rate
          writer.write(step, scalars)
          _say(_progress(step, config.num_train_steps, scalars, rate, now - t_start))
          t_log, step_log = now, step
        if (config.checkpoint_every and step % config.checkpoint_every == 0) or stop:
          with watchdog.paused():
            checkpoints.save(mngr, step, state, data_iter, config)
        if stop:
          _say(f"preempted: checkpoint written at step {step}, exiting with {PREEMPTED_EXIT_CODE}")
          raise Preempted(step)
        if config.get("eval_every") and step % config.eval_every == 0 and step < config.num_train_steps:
          with watchdog.paused():
            headline = task.headline(classification.nan_to_none(
                task.evaluate(_for_eval(state, eval_mesh), eval_mesh, None)))
          writer.write(step, {k: v for k, v in headline.items() if v is not None}, prefix="eval")
          _say(f"step {step} held-out: " + ", ".join(f"{k} {v:.4g}" for k, v in headline.items() if v is not None))
    if mngr.latest_step() != step:
      checkpoints.save(mngr, step, state, data_iter, config)
  finally:
    writer.close()
  if jax.process_count() > 1:  # every process: a diverged replica would show here
    print(f"process {jax.process_index()}/{jax.process_count()}: step {step}, parameters "
          f"{fingerprint(state.params)}", flush=True)

  eval_state = _for_eval(state, eval_mesh)
  if jax.process_index() == 0:  # what inference loads: the variables and the inference part of the config
    bundle.write_bundle(workdir / bundle.BUNDLE_DIR, config,
                        {"params": eval_state.params, "batch_stats": eval_state.batch_stats}, step=step)
  # Each process evaluates the whole held-out split on its own devices (same result everywhere, no
  # cross-process traffic); process 0 writes it.
  report = task.evaluate(eval_state, eval_mesh, workdir if jax.process_index() == 0 else None)
  report = classification.nan_to_none({"task": config.task, "step": step, **report})
  if jax.process_index() == 0:
    nifti.atomic_write_text(workdir / "eval.json", json.dumps(report, indent=2))
    print(task.format_report(report), flush=True)
    writer = MetricWriter(workdir)
    writer.write(step, {k: v for k, v in task.headline(report).items() if v is not None}, prefix="eval")
    writer.close()
  return report

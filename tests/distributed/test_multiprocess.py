"""Many processes, one job: real `python -m spine_jax.train` processes joined on a loopback coordinator.

Two processes x two simulated CPU devices train the smoke classifier on a handful of phantoms. Every
uninterrupted run is made once per module and shared; compiled steps come from the test compilation
cache. Numbers to compare: one process x four devices runs the same global batches on the same mesh
shape, so it must reach the same parameters up to float summation order (the gradient all-reduce
adds the four device shares in another order across two processes than within one).
"""
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from spine_jax.engine import checkpoints

ROOT = pathlib.Path(__file__).resolve().parents[2]
CACHE = pathlib.Path(os.environ.get("SPINE_JAX_TEST_CACHE", ROOT / ".jax_cache"))
STEPS, EVERY = 12, 6
HEARTBEAT_S = 10
ARGS = ("--config=configs/bone_quality.py:smoke", f"--config.num_train_steps={STEPS}", f"--config.checkpoint_every={EVERY}",
        "--config.log_every=1", "--config.data.phantom.num_train_vertebrae=4",
        "--config.data.phantom.num_test_vertebrae=2", f"--heartbeat_timeout={HEARTBEAT_S}", "--step_timeout=120")
FINGERPRINT = re.compile(r"process (\d+)/(\d+): step (\d+), parameters ([0-9a-f]{16})")
# 1x4 against 2x2 (summation order, see the module docstring): most parameters come out bit-equal, the
# largest difference measured after 12 steps was 1.6e-5. A wrong batch would move them by about the
# learning rate (2e-3 a step).
RTOL, ATOL = 1e-4, 1e-5


def _env(devices_per_process: int) -> dict:
  env = {k: v for k, v in os.environ.items()
         if k != "SPINE_JAX_DISTRIBUTED" and not k.startswith(("SLURM_", "OMPI_", "TPU_", "JAX_COORDINATOR"))}
  env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices_per_process), JAX_DISABLE_MOST_OPTIMIZATIONS="1",
             JAX_COMPILATION_CACHE_DIR=str(CACHE), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHON=sys.executable)
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class _Job:
  """`n` train processes on a loopback coordinator, each writing stdout and stderr to its own log."""

  def __init__(self, workdir: pathlib.Path, n: int, *extra: str, devices: int = 2, tag: str = "run"):
    port = _free_port()
    self.procs, self.logs = [], []
    for i in range(n):
      cmd = [sys.executable, "-m", "spine_jax.train", *ARGS, f"--workdir={workdir}", *extra]
      if n > 1:
        cmd += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n}", f"--process_id={i}"]
      log = workdir.parent / f"{tag}.{i}.log"
      with open(log, "w") as f:
        self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(devices), stdout=f, stderr=subprocess.STDOUT))
      self.logs.append(log)

  def text(self, i: int = 0) -> str:
    return self.logs[i].read_text()

  def wait_for(self, condition, timeout: float = 300.0):
    """Polls `condition` until true; fails if a process ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
      ended = [i for i, p in enumerate(self.procs) if p.poll() is not None]
      assert not ended, f"process(es) {ended} ended early:\n" + self.text(ended[0])[-3000:]
      assert time.monotonic() < deadline, "timed out:\n" + self.text()[-3000:]
      time.sleep(0.01)

  def wait(self, timeout: float = 300.0) -> list[int]:
    return [p.wait(timeout=timeout) for p in self.procs]

  def kill(self):
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def _params(workdir: pathlib.Path, step: int = STEPS) -> dict:
  """Parameters of a checkpoint as numpy, whatever topology wrote them."""
  path = workdir / "checkpoints" / str(step) / "state"
  ckptr = ocp.PyTreeCheckpointer()
  tree = ckptr.metadata(path).item_metadata.tree
  restored = ckptr.restore(path, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))
  return restored["params"]


def _assert_close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL), a, b)


def _complete_steps(workdir: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _fingerprints(text: str) -> dict[int, str]:
  return {int(m[0]): m[3] for m in FINGERPRINT.findall(text) if int(m[2]) == STEPS}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  """The reference: one process with four devices, uninterrupted. Started here, awaited by `_done`, so
  that it runs beside the two-process run."""
  workdir = tmp_path_factory.mktemp("one_process") / "run"
  job = _Job(workdir, 1, devices=4)
  yield workdir, job
  job.kill()


def _done(run) -> pathlib.Path:
  workdir, job = run
  assert job.wait() == [0], job.text()[-3000:]
  return workdir


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  """`launch/local.sh 2`: two processes with two devices each, uninterrupted."""
  workdir = tmp_path_factory.mktemp("two_processes") / "run"
  t0 = time.monotonic()
  out = subprocess.run(["bash", "launch/local.sh", "2", *ARGS, f"--workdir={workdir}"], cwd=ROOT,
                       env=_env(2) | {"SPINE_JAX_LOCAL_DEVICES": "2"}, capture_output=True, text=True, timeout=600)
  print(f"local.sh 2: {time.monotonic() - t0:.1f} s")
  return workdir, out


def test_local_sh_two_processes_match_one_process_of_four_devices(one_process, two_processes):
  workdir, out = two_processes
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  for i in range(2):  # every process announced itself and the global mesh
    assert re.search(rf"process {i}/2 on .*mesh {{'data': 4}} over 4 devices \(cpu\)", out.stdout), out.stdout[:2000]
  prints = _fingerprints(out.stdout)
  assert sorted(prints) == [0, 1] and prints[0] == prints[1], out.stdout[-2000:]
  assert re.search(r"^\[process 1\] process 1/2: step", out.stdout, re.M)  # local.sh labels the others' lines
  # Progress, metrics and the report come from process 0 alone.
  assert len(re.findall(rf"^step {STEPS}/{STEPS} ", out.stdout, re.M)) == 1
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines if l["split"] == "train"] == list(range(1, STEPS + 1))
  assert json.loads((workdir / "eval.json").read_text())["step"] == STEPS
  # One checkpoint directory holds the state once and each process's data-iterator state.
  assert _complete_steps(workdir) == [EVERY, STEPS]
  names = sorted(p.name for p in (workdir / "checkpoints" / str(STEPS) / "data_iter").glob("*.json"))
  assert names == ["process_0-of-2.json", "process_1-of-2.json"]
  _assert_close(_params(workdir), _params(_done(one_process)))


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
  """Two processes; process 1 SIGKILLed after the first checkpoint. Returns what happened to process 0."""
  workdir = tmp_path_factory.mktemp("killed") / "run"
  job = _Job(workdir, 2, tag="killed")
  try:
    job.wait_for(lambda: (workdir / "checkpoints" / str(EVERY)).is_dir())
    job.procs[1].kill()
    t_kill = time.monotonic()
    code = job.procs[0].wait(timeout=HEARTBEAT_S + 60)
    elapsed = time.monotonic() - t_kill
    print(f"process 0 stopped {elapsed:.2f} s after process 1 was killed")
  finally:
    job.kill()
  return workdir, code, elapsed, job.text(0)


def test_killing_one_process_stops_the_other_with_an_error(killed):
  _, code, elapsed, text = killed
  assert code != 0, text[-3000:]
  assert elapsed < HEARTBEAT_S + 5, f"process 0 took {elapsed:.1f} s to stop"
  assert ("error: process 0/2 failed" in text or
          "JAX distributed service detected fatal errors" in text), text[-3000:]
  assert not _fingerprints(text), "process 0 finished training: the kill came too late to test anything"


def test_restart_after_sigkill_ends_bit_identical_to_an_uninterrupted_run(killed, two_processes):
  workdir, *_ = killed
  saved = _complete_steps(workdir)
  assert saved and saved[-1] < STEPS
  job = _Job(workdir, 2, tag="resumed")
  try:
    assert job.wait() == [0, 0], job.text()[-3000:]
  finally:
    job.kill()
  assert f"resumed from step {saved[-1]} " in job.text(0)
  reference_dir, reference_out = two_processes
  assert _fingerprints(job.text(0)) | _fingerprints(job.text(1)) == _fingerprints(reference_out.stdout)
  jax.tree.map(np.testing.assert_array_equal, _params(workdir), _params(reference_dir))


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
  """Two processes; SIGTERM to process 1 only, once training is under way."""
  workdir = tmp_path_factory.mktemp("preempted") / "run"
  job = _Job(workdir, 2, tag="term")
  try:
    job.wait_for(lambda: re.search(r"^step \d+/", job.text(0), re.M))
    reached = int(re.search(r"^step (\d+)/", job.text(0), re.M)[1])
    job.procs[1].send_signal(signal.SIGTERM)
    codes = job.wait(timeout=120)
  finally:
    job.kill()
  return workdir, reached, codes, job


def test_sigterm_to_one_process_checkpoints_all_at_one_step_and_exits_42(preempted):
  workdir, reached, codes, job = preempted
  assert codes == [42, 42], job.text(0)[-2000:] + job.text(1)[-2000:]
  saved = _complete_steps(workdir)[-1]
  assert reached <= saved < STEPS
  assert f"preempted: checkpoint written at step {saved}, exiting with 42" in job.text(0)
  names = sorted(p.name for p in (workdir / "checkpoints" / str(saved) / "data_iter").glob("*.json"))
  assert names == ["process_0-of-2.json", "process_1-of-2.json"]
  assert not (workdir / "eval.json").exists()


def test_resume_on_another_process_count_continues_the_same_batches(preempted, one_process):
  workdir, *_ = preempted
  saved = _complete_steps(workdir)[-1]
  job = _Job(workdir, 1, devices=4, tag="one")
  try:
    assert job.wait() == [0], job.text()[-3000:]
  finally:
    job.kill()
  assert f"resumed from step {saved} " in job.text()
  assert "data-iterator state written by 2 processes restored on 1" in job.text()
  _assert_close(_params(workdir), _params(_done(one_process)))


def test_iterator_state_restores_across_process_counts_only_when_global(tmp_path):
  directory = tmp_path / "7" / "data_iter"
  directory.mkdir(parents=True)
  for i in range(2):
    (directory / f"process_{i}-of-2.json").write_text(json.dumps({"next_index": 7}))
  assert checkpoints.iterator_state(directory, 1, 2) == {"next_index": 7}
  assert checkpoints.iterator_state(directory, 0, 1) == {"next_index": 7}
  assert checkpoints.iterator_state(directory, 3, 4) == {"next_index": 7}
  per_worker = {"workers_state": {"0": {"next_index": 3}}, "iterations_to_skip": {"0": 0}, "last_worker_index": 0}
  (directory / "process_1-of-2.json").write_text(json.dumps(per_worker))
  assert checkpoints.iterator_state(directory, 1, 2) == per_worker  # same count: its own file
  with pytest.raises(ValueError, match="written by 2 processes .* cannot restore on 4 processes"):
    checkpoints.iterator_state(directory, 0, 4)
  (directory / "process_1-of-2.json").unlink()
  with pytest.raises(ValueError, match=r"lacks the data-iterator state of process\(es\) \[1\] of 2"):
    checkpoints.iterator_state(directory, 0, 1)


def test_env_switch_starts_distributed_and_names_what_is_missing(tmp_path):
  out = subprocess.run([sys.executable, "-m", "spine_jax.train", *ARGS, f"--workdir={tmp_path / 'run'}",
                        "--initialization_timeout=5"], cwd=ROOT, env=_env(2) | {"SPINE_JAX_DISTRIBUTED": "1"},
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 1
  assert "error: could not join the distributed run (coordinator (auto-detected)" in out.stderr, out.stderr[-2000:]
  assert "coordinator_address" in out.stderr and "Traceback" not in out.stderr


def test_watchdog_ends_a_process_whose_steps_stop_but_not_during_a_pause():
  code = ("import time\n"
          "from spine_jax.training import loop\n"
          "with loop._Watchdog(0.5) as w:\n"
          "  w.kick()\n"
          "  with w.paused():\n"
          "    time.sleep(1.5)\n"
          "  print('survived the pause', flush=True)\n"
          "  time.sleep(60)\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(1), capture_output=True, text=True, timeout=50)
  assert out.returncode == 3, out.stderr[-2000:]
  assert "survived the pause" in out.stdout
  assert "no training step finished in 0.5 s (--step_timeout)" in out.stderr

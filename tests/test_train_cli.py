"""The training command as a user runs it: smoke training, resume, config errors."""
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _train(*args, timeout=600):
  return subprocess.run([sys.executable, "-m", "spine_jax.train", *args], capture_output=True, text=True,
                        cwd=ROOT, timeout=timeout)


def test_train_then_resume(tmp_path):
  workdir = tmp_path / "run"
  first = _train("--config=configs/bone_quality.py:smoke", f"--workdir={workdir}", "--config.num_train_steps=4")
  assert first.returncode == 0, first.stderr[-3000:]
  assert "step 4/4" in first.stdout and "balanced accuracy" in first.stdout
  train_lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in train_lines if l["split"] == "train"] == [2, 4]
  second = _train("--config=configs/bone_quality.py:smoke", f"--workdir={workdir}", "--config.num_train_steps=6")
  assert second.returncode == 0, second.stderr[-3000:]
  assert "resumed from step 4" in second.stdout
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines if l["split"] == "train"] == [2, 4, 6]
  assert json.loads((workdir / "eval.json").read_text())["step"] == 6
  (workdir / "eval.json").unlink()
  third = _train("--config=configs/bone_quality.py:smoke", f"--workdir={workdir}", "--config.num_train_steps=6")
  assert third.returncode == 0, third.stderr[-3000:]
  # already at its last step: evaluates again without preparing training data or training
  assert "resumed from step 6" in third.stdout and "training done" in third.stdout
  assert "training data ready" not in third.stdout
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines if l["split"] == "train"] == [2, 4, 6]
  assert json.loads((workdir / "eval.json").read_text())["step"] == 6


def test_unknown_config_field_is_named(tmp_path):
  out = _train("--config=configs/bone_quality.py:smoke", f"--workdir={tmp_path}", "--config.model.no_such_field=1")
  assert out.returncode != 0
  assert "--config.model.no_such_field=1" in out.stderr and "no_such_field" in out.stderr
  assert "Traceback" not in out.stderr
  assert not any(tmp_path.iterdir())


def test_unknown_variant_is_named(tmp_path):
  out = _train("--config=configs/bone_quality.py:smokey", f"--workdir={tmp_path}")
  assert out.returncode != 0 and "smokey" in out.stderr


def test_sigterm_writes_a_checkpoint_and_exits_for_requeue(tmp_path):
  import signal
  import time
  workdir = tmp_path / "run"
  proc = subprocess.Popen([sys.executable, "-m", "spine_jax.train", "--config=configs/bone_quality.py:smoke",
                           f"--workdir={workdir}", "--config.num_train_steps=1000000", "--config.log_every=20",
                           "--config.checkpoint_every=0"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
  reached = None
  deadline = time.time() + 300
  for line in proc.stdout:  # wait until training is under way
    if line.startswith("step "):
      reached = int(line.split()[1].split("/")[0])
      break
    assert time.time() < deadline
  assert reached is not None
  proc.send_signal(signal.SIGTERM)
  proc.stdout.read()  # drain, so the process is never blocked on a full pipe
  assert proc.wait(timeout=120) == 42
  saved = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(saved) == 1 and saved[0] >= reached
  assert not (workdir / "eval.json").exists()

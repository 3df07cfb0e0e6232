"""bench/run_all.py and bench/accelerator.py run end to end at --tiny scale (CPU), so the harness cannot rot."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests import spineps_oracle

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPINEPS_ENV = os.environ.get("SPINEPS_ENV", str(ROOT / ".spineps-env"))


def _run(script: str, only: str, tmp_path, *extra: str) -> dict:
  out = tmp_path / "report.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "SPINEPS_ENV": SPINEPS_ENV}
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user's run
  done = subprocess.run([sys.executable, f"bench/{script}", "--tiny", f"--only={only}", f"--output={out}", *extra],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "| workload |" in done.stdout
  return json.loads(out.read_text())


def _check_pairs(workloads: dict, prefixes) -> None:
  """Every workload is there; each pair has our numbers, the peer's or a reason, and a ratio of the medians."""
  for prefix in prefixes:
    rows = {k: v for k, v in workloads.items() if k.startswith(prefix)}
    assert rows, f"no {prefix} workload in {sorted(workloads)}"
    for name, row in rows.items():
      assert isinstance(row, dict), f"{name}: {row}"
      if "spine_jax" not in row:
        continue
      ours = row["spine_jax"]
      assert ours["min_s"] <= ours["median_s"] <= ours["max_s"] and ours["median_s"] > 0, name
      if isinstance(row["peer"], str):
        assert row["peer"].startswith("not measured: ") and len(row["peer"]) > len("not measured: "), name
        assert "ratio_peer_over_ours" not in row
      else:
        assert row["ratio_peer_over_ours"] == pytest.approx(row["peer"]["median_s"] / ours["median_s"]), name
      if row["flops"]:
        assert ours["gflops"] == pytest.approx(row["flops"] / ours["median_s"] / 1e9)


# e, f and g build every task's training step; two of them keep the CI run short (each task's step is
# built by its own tests too).
SOME_TASKS = ("bone_quality", "labeling")


def test_run_all_tiny_in_process_workloads(tmp_path):
  report = _run("run_all.py", "a,b,e,f,g", tmp_path, f"--tasks={','.join(SOME_TASKS)}")
  assert report["matmul_peak"]["xla_gflops"] > 0 and report["matmul_peak"]["numpy_gflops"] > 0
  w = report["workloads"]
  assert not [k for k in w if k.endswith("_failed")], {k: v for k, v in w.items() if k.endswith("_failed")}
  _check_pairs(w, ("a_densenet_train_step", "a_densenet_forward", "b_semantic_train_step",
                   "b_semantic_nnunet_train_step"))
  assert not [k for k in w if k[0] in "eg" and not k.endswith(SOME_TASKS)]
  for task in SOME_TASKS:
    e = w[f"e_pipeline_{task}"]
    assert e["pipeline_over_step"] == pytest.approx(e["samples_per_s"] / e["step_consumes_per_s"])
    f = w[f"f_compile_{task}"]
    assert f["cold_s"] > 0 and f["warm_s"] > 0 and f["in_run_s"] > 0
    g = w[f"g_memory_{task}"]
    assert g["spine_jax_xla_bytes"] > 0
    assert "peer_rss_delta_bytes" in g or g["peer"].startswith("not measured: ")


def test_run_all_tiny_spineps_environment_peers(tmp_path):
  """c and d: our side always; nnUNetPredictor and predict_instance_mask where SPINEPS' environment is."""
  pytest.importorskip("torch", reason="torch is an optional extra (pip install -e '.[torch]')", exc_type=ImportError)
  report = _run("run_all.py", "c,d", tmp_path)
  w = report["workloads"]
  assert not [k for k in w if k.endswith("_failed")], {k: v for k, v in w.items() if k.endswith("_failed")}
  _check_pairs(w, ("c_sliding_window", "d_instance_phase_spine_jax", "d_instance_phase_spineps"))
  reason = spineps_oracle.available()
  if reason:
    assert w["c_sliding_window"]["peer"] == f"not measured: {reason}"
  else:  # the peer mirrors along the same three axes as ours
    assert sorted(w["c_sliding_window"]["peer_mirror_axes"]) == [0, 1, 2] == w["c_sliding_window"]["mirror_axes"]


def test_accelerator_script_tiny_on_cpu(tmp_path):
  report = _run("accelerator.py", "a,b", tmp_path)
  assert report["backend"] == "cpu" and report["variant"] == "bf16"
  assert report["peak_source"] == "measured bf16 matmul"
  w = report["workloads"]
  _check_pairs(w, ("a_densenet_train_step", "b_semantic_train_step"))
  assert w["a_densenet_train_step"]["spine_jax"]["mfu"] == pytest.approx(
      w["a_densenet_train_step"]["spine_jax"]["share_of_peak"])


def test_chip_peaks_by_device_kind():
  sys.path.insert(0, str(ROOT / "bench"))
  import accelerator
  assert accelerator.chip_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
  assert accelerator.chip_peak_tflops("NVIDIA H100 PCIe") == 756.0
  assert accelerator.chip_peak_tflops("TPU v5 lite") == 197.0
  assert accelerator.chip_peak_tflops("cpu") is None


def test_a_step_that_does_not_fit_the_memory_is_reported_not_run():
  sys.path.insert(0, str(ROOT / "bench"))
  import run_all
  gib = 2 ** 30
  assert run_all.memory_shortfall({"peak_bytes": 10 * gib}, 20 * gib) is None
  reason = run_all.memory_shortfall({"peak_bytes": 22 * gib}, 17 * gib)
  assert "needs 22.0 GiB" in reason and "17.0 GiB is available" in reason
  assert run_all.memory_shortfall(None, gib) is None and run_all.memory_shortfall({"peak_bytes": gib}, None) is None
  available = run_all.available_bytes()
  assert available is None or available > 0


def test_conv_bench_times_each_fft_block_side(tmp_path):
  """bench/conv_bench.py reruns the block-side table of BUILD_NOTES.md ("Overlap-save blocks")."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  done = subprocess.run([sys.executable, "bench/conv_bench.py", "--shape=1,12,10,6", "--in_channels=2",
                         "--channels=3", "--kernel=5", "--impls=sliced,fft", "--fft_block_sides=8,0",
                         "--forward_only", "--no_torch", "--repeats=1"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  for key in ("sliced", "fft_block_side_8", "fft_block_side_0"):
    assert set(result[key]) == {"forward_s"} and result[key]["forward_s"] > 0, result
  assert "fft" not in result and "pytorch" not in result


def test_weight_grad_bench_forms_agree_with_xla(tmp_path):
  """bench/weight_grad_bench.py's product forms give XLA's weight gradient (it refuses to time a wrong one)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  done = subprocess.run([sys.executable, "bench/weight_grad_bench.py", "--batch=2", "--size=6", "--in_channels=4",
                         "--channels=3", "--repeats=1", "--no_torch"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert set(result["jax_s"]) == {"xla", "flat", "flat_dy_first", "flat_dy_first_4", "flat_dy_first_16",
                                  "one_dot_x9"}
  assert all(t > 0 for t in result["jax_s"].values()) and "pytorch_s" not in result

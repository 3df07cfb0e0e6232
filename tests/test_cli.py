"""What a user's mistake looks like at every entry point: one `error:` line naming the culprit, exit 1,
no traceback, no usage dump, nothing written; `--help` exits 0; Ctrl-C is one line and exit 130."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(module, *args, cwd=ROOT):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", f"spine_jax.{module}", *map(str, args)], capture_output=True,
                        text=True, cwd=cwd, timeout=300, env=env)


def _one_error(run, *fragments):
  """Exit 1, stderr an `error:` line (and at most a pointer to --helpshort) holding every fragment."""
  assert run.returncode == 1, (run.returncode, run.stderr[-2000:])
  lines = run.stderr.strip().splitlines()
  assert lines and lines[0].startswith("error: ") and len(lines) <= 2, run.stderr[-2000:]
  assert "Traceback" not in run.stderr
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize("module", ["predict", "convert", "train"])
def test_help_exits_zero(module):
  run = _run(module, "--help")
  assert run.returncode == 0 and f"python -m spine_jax.{module}" in run.stdout


def test_usage_errors_are_one_line():
  _one_error(_run("predict", "semantic"), "semantic needs --checkpoint, --input and --output")
  _one_error(_run("predict", "nope"), "{ct|semantic|spine}")
  _one_error(_run("convert", "spineps", "--output=x"), "spineps needs --output and --semantic_folder")


def test_predict_checks_its_flags_and_paths_before_loading_a_model(tmp_path):
  absent = tmp_path / "no_checkpoint"
  ct = ["ct", f"--checkpoint={absent}", "--image=a.nii.gz", "--mask=b.nii.gz"]
  _one_error(_run("predict", *ct, "--labels=20,x", f"--output={tmp_path / 'o'}"), "--labels")
  _one_error(_run("predict", *ct, "--name=../../x", f"--output={tmp_path / 'o'}"), "--name '../../x'")
  (tmp_path / "file").write_text("")
  _one_error(_run("predict", *ct, f"--output={tmp_path / 'file'}"), "--output", "is a file")
  _one_error(_run("predict", "semantic", f"--checkpoint={absent}", f"--input={tmp_path / 'nope'}",
                  f"--output={tmp_path / 'o'}"), "nope", "no such file or folder")
  _one_error(_run("predict", *ct, f"--output={tmp_path / 'o'}"), str(absent), "does not exist")
  (tmp_path / "empty").mkdir()
  _one_error(_run("predict", "ct", f"--checkpoint={tmp_path / 'empty'}", "--image=a", "--mask=b",
                  f"--output={tmp_path / 'o'}"), "no spine_jax checkpoint")
  assert not [p for p in (tmp_path / "o").rglob("*")]


def test_bad_pairs_files_name_the_row(tmp_path):
  pairs = tmp_path / "pairs.csv"
  pairs.write_text("image,mask\na.nii.gz,a_seg.nii.gz\nb.nii.gz\n,c_seg.nii.gz\n")
  base = ["ct", f"--checkpoint={tmp_path}", f"--output={tmp_path / 'o'}"]
  _one_error(_run("predict", *base, f"--pairs={pairs}"), "pairs.csv", "row 3: empty mask", "row 4: empty image")
  _one_error(_run("predict", *base, f"--pairs={tmp_path / 'absent.csv'}"), "absent.csv: no such file")
  pairs.write_text("img,seg\na,b\n")
  _one_error(_run("predict", *base, f"--pairs={pairs}"), "needs the columns image,mask")
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  pairs.write_text("image,mask\na/ct.nii.gz,a/m.nii.gz\na/ct.nii.gz,b/m.nii.gz\n")
  _one_error(_run("predict", *base, f"--pairs={pairs}"), "inputs would write the same outputs", "a/ct.nii.gz")
  assert not (tmp_path / "o").exists()


def test_train_mistakes_are_one_line(tmp_path):
  _one_error(_run("train", "--config=configs/mtl.py:nope", f"--workdir={tmp_path / 'w'}"),
             "configs/mtl.py: unknown variant(s) ['nope']")
  _one_error(_run("train", "--config=configs/mtl.py:smoke", f"--workdir={tmp_path / 'w'}", "--config.batch_size=0"),
             "config.batch_size 0")
  (tmp_path / "file").write_text("")
  _one_error(_run("train", "--config=configs/mtl.py:smoke", f"--workdir={tmp_path / 'file'}"), "file")
  _one_error(_run("train", "--config=configs/semantic.py:smoke", f"--workdir={tmp_path / 'w2'}",
                  "--config.data.source=manifest", f"--config.data.manifest={tmp_path / 'absent.csv'}"),
             "absent.csv")


def _cli_run(body: str):
  """cli.run of a main whose body is `body`, in a fresh process (absl parses flags once per process)."""
  code = f"from absl import app\nfrom spine_jax import cli\ndef main(argv):\n  {body}\ncli.run(main, 'spine_jax.x')\n"
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_ctrl_c_is_one_line_and_status_130():
  run = _cli_run("raise KeyboardInterrupt")
  assert run.returncode == 130 and "Traceback" not in run.stderr
  err = run.stderr.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("interrupted:")


def test_usage_error_is_one_line_without_usage_text():
  run = _cli_run("raise app.UsageError('semantic needs --checkpoint')")
  assert run.returncode == 1 and run.stderr.startswith("error: semantic needs --checkpoint\n")
  assert len(run.stderr.strip().splitlines()) == 2

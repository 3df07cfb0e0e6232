"""Safe reading of PyTorch files: tensors and plain data only unless the user trusts the file."""
import fractions

import numpy as np
import pytest

from spine_jax.conversion import ConversionError
from spine_jax.conversion import torch_files


def test_tensors_and_numpy_scalars_load_without_trust(torch, tmp_path):
  # nnU-Net checkpoints hold numpy scalars in their training log: data, not code.
  path = tmp_path / "ok.pth"
  torch.save({"w": torch.ones(2, 3), "log": {"ema": np.float64(0.5), "epoch": np.int64(3)}}, path)
  obj = torch_files.load(path)
  assert obj["log"]["ema"] == 0.5 and obj["w"].shape == (2, 3)


def test_file_needing_pickle_is_refused_unless_trusted(torch, tmp_path):
  path = tmp_path / "needs_pickle.pth"
  torch.save({"w": torch.ones(1), "extra": fractions.Fraction(1, 3)}, path)
  with pytest.raises(ConversionError, match=r"needs_pickle\.pth.*fractions\.Fraction.*--trust_pickle"):
    torch_files.load(path)
  assert torch_files.load(path, trust_pickle=True)["extra"] == fractions.Fraction(1, 3)


def test_truncated_and_missing_files_are_named(torch, tmp_path):
  path = tmp_path / "cut.pth"
  torch.save({"w": torch.randn(64, 64)}, path)
  path.write_bytes(path.read_bytes()[:1000])
  with pytest.raises(ConversionError, match=r"cut\.pth: not a readable PyTorch file \(truncated or corrupt"):
    torch_files.load(path)
  with pytest.raises(ConversionError, match=r"absent\.pth: no such file"):
    torch_files.load(tmp_path / "absent.pth")


def test_state_dict_entries_must_be_tensors(torch, tmp_path):
  with pytest.raises(ConversionError, match=r"x\.pth: the file: entry 'step' is a int, not a tensor"):
    torch_files.state_dict_arrays({"w": torch.ones(1), "step": 3}, tmp_path / "x.pth")
  arrays = torch_files.state_dict_arrays({"w": torch.ones(2, dtype=torch.bfloat16)}, "x.pth")
  assert arrays["w"].dtype == np.float32  # numpy has no bfloat16


def test_common_wrapper_prefix_is_stripped():
  arrays = {"module._orig_mod.a": 1, "module._orig_mod.b": 2}
  assert torch_files.strip_common_prefix(arrays) == {"a": 1, "b": 2}
  assert torch_files.strip_common_prefix({"module.a": 1, "b": 2}) == {"module.a": 1, "b": 2}

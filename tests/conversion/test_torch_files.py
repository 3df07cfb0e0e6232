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


class _Runs:
  """An object whose unpickling would run code: exec writes the file named in `mark`."""

  def __init__(self, mark):
    self.mark = str(mark)

  def __reduce__(self):
    return exec, (f"import pathlib; pathlib.Path({self.mark!r}).write_text('ran')",)


def test_stand_ins_read_what_a_file_pickles_without_importing_or_running_it(torch, tmp_path, monkeypatch):
  """A Lightning checkpoint's hyper-parameters: a dataclass of a module that is gone by load time, an enum
  member, and a reduce that would run code. With stand_ins they become inert records."""
  import dataclasses
  import enum
  import sys
  import types
  module = types.ModuleType("gone_at_load_time")

  @dataclasses.dataclass
  class ArgsModel:
    backbone: str = "DENSENET121"
    final_size: tuple = (152, 168, 32)

  class Backbone(enum.Enum):
    DENSENET121 = 121

  for cls in (ArgsModel, Backbone):
    cls.__module__, cls.__qualname__ = module.__name__, cls.__name__
    setattr(module, cls.__name__, cls)
  monkeypatch.setitem(sys.modules, module.__name__, module)
  mark = tmp_path / "ran.txt"
  path = tmp_path / "hparams.ckpt"
  torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {
      "opt": ArgsModel(), "backbone": Backbone.DENSENET121, "payload": _Runs(mark)}}, path)
  monkeypatch.delitem(sys.modules, module.__name__)
  with pytest.raises(ConversionError, match=r"holds .*--trust_pickle"):
    torch_files.load(path)
  loaded = torch_files.load(path, stand_ins=True)
  hp = loaded["hyper_parameters"]
  assert isinstance(hp["opt"], torch_files.PickledObject) and hp["opt"].pickled_class == "gone_at_load_time.ArgsModel"
  assert (hp["opt"].backbone, hp["opt"].final_size) == ("DENSENET121", (152, 168, 32))
  assert hp["backbone"].pickled_class == "gone_at_load_time.Backbone" and hp["backbone"].pickled_args == (121,)
  assert hp["payload"].pickled_class == "builtins.exec" and not mark.exists()  # nothing ran
  assert "gone_at_load_time" not in sys.modules and loaded["state_dict"]["w"].shape == (2,)

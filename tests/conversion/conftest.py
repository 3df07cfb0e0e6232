"""Shared pieces of the conversion tests: the optional PyTorch side and the recorded error figures."""
import pytest

from spine_jax.conversion import layout

TOLERANCE = 1e-5  # relative L2 error of converted outputs, float32
_FIGURES: list[tuple[str, float]] = []


@pytest.fixture(scope="session")
def torch():
  return pytest.importorskip("torch", reason="torch is an optional extra (pip install -e '.[torch]')",
                             exc_type=ImportError)


@pytest.fixture(scope="session")
def monai_nets(torch):
  return pytest.importorskip("monai.networks.nets", reason="needs monai (pip install --no-deps monai)")


@pytest.fixture(scope="session")
def unet_arch(torch):
  return pytest.importorskip("dynamic_network_architectures.architectures.unet",
                             reason="needs dynamic-network-architectures (pip install --no-deps)")


@pytest.fixture
def conformance(record_property):
  """check(name, ours, reference) -> the relative L2 error, recorded, printed at the end of the run,
  and asserted under TOLERANCE."""
  def check(name: str, ours, reference, tolerance: float = TOLERANCE) -> float:
    error = layout.relative_l2(ours, reference)
    _FIGURES.append((name, error))
    record_property(f"relative_l2[{name}]", error)
    print(f"conversion conformance {name}: relative L2 error {error:.2e}")
    assert error < tolerance, f"{name}: relative L2 error {error:.3g} >= {tolerance}"
    return error
  return check


def pytest_terminal_summary(terminalreporter):
  if _FIGURES:
    terminalreporter.write_sep("-", "converted weights vs PyTorch (relative L2 error of outputs, float32)")
    for name, error in _FIGURES:
      terminalreporter.write_line(f"{name:60s} {error:.2e}")

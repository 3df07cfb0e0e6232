"""Test-wide JAX settings: several simulated CPU devices, fast compiles, a persistent cache."""
import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

_CACHE = pathlib.Path(os.environ.get("SPINE_JAX_TEST_CACHE", pathlib.Path(__file__).resolve().parents[1] / ".jax_cache"))
# Entry points run as subprocesses share it (spine_jax/cli.py), instead of the user's ~/.cache.
os.environ.setdefault("SPINE_JAX_CACHE_DIR", str(_CACHE))
jax.config.update("jax_disable_most_optimizations", True)
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
EXAMPLE_CT = SHARED_DATA / "totalsegmentator_example_ct"


@pytest.fixture(scope="session")
def example_ct_dir():
  """The real abdominal CT beside the project; tests that need it skip when it is absent."""
  if not (EXAMPLE_CT / "example_ct.nii.gz").exists():
    pytest.skip(f"real CT not found at {EXAMPLE_CT} (expected ../shared/data/ beside the project)")
  return EXAMPLE_CT


def _smoke_run(tmp_path_factory, config_module: str) -> pathlib.Path:
  import importlib
  from spine_jax.training import loop
  workdir = tmp_path_factory.mktemp(f"{config_module}_smoke_run")
  loop.train_and_evaluate(importlib.import_module(f"configs.{config_module}").get_config("smoke"), workdir)
  return workdir


@pytest.fixture(scope="session")
def bone_quality_smoke_run(tmp_path_factory):
  """Work directory of the CT multi-task classifier trained for a few steps (smoke config); read-only."""
  return _smoke_run(tmp_path_factory, "bone_quality")


@pytest.fixture(scope="session")
def semantic_smoke_run(tmp_path_factory):
  """Work directory of the semantic (SPINEPS phase 1) U-Net after a few steps (smoke config); read-only."""
  return _smoke_run(tmp_path_factory, "semantic")


@pytest.fixture(scope="session")
def instance_smoke_run(tmp_path_factory):
  """Work directory of the instance (SPINEPS phase 2) U-Net after a few steps (smoke config); read-only."""
  return _smoke_run(tmp_path_factory, "instance")

"""Writing converted models: a model bundle, published all at once."""
from __future__ import annotations

import pathlib
from typing import Any, Mapping


def write_model(directory, config, variables: Mapping[str, Any], *,
                extra_files: Mapping[str, str] | None = None) -> pathlib.Path:
  """Converted weights as a model bundle (`engine/bundle.py`: the variables and the inference part of
  ``config``, step 0; no optimiser) at ``directory``, which inference loads as it loads a trained model."""
  from spine_jax.engine import bundle
  return bundle.write_bundle(directory, config, variables, step=0, extra_files=extra_files)

"""The `configs/<name>.py:<variant>,<variant>` convention shared by every config file."""
from __future__ import annotations


class ConfigError(ValueError):
  """A config that cannot run: an unknown variant, a value out of range."""


def parse_variants(arg: str, known, config_name: str) -> set[str]:
  """The comma-separated variants of `arg`; an unknown one is an error naming the config file and
  the variants it has."""
  variants = {v.strip() for v in (arg or "").split(",") if v.strip()}
  unknown = variants - set(known)
  if unknown:
    raise ConfigError(f"{config_name}: unknown variant(s) {sorted(unknown)}; known: {sorted(known)}")
  return variants

"""Entry point: python -m spine_jax.train --config=configs/mtl.py --workdir=DIR [--config.field=value]."""
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from spine_jax.training import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and eval.json.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv):
  """absl parsing, with an unknown `--config.a.b=...` field reported by name instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    missing = str(e).strip("\"'")
    culprits = [a for a in argv[1:] if a.startswith("--config.") and
                re.search(rf"[.]{re.escape(missing)}(=|[.]|$)", a.split("=", 1)[0])]
    shown = culprits[0] if culprits else f"a --config.* override ({missing!r})"
    sys.exit(f"error: unknown config field in {shown}: the config has no field {missing!r}. "
             f"See the config file for the fields it defines.")
  except flags.Error as e:
    sys.exit(f"error: {e}\nPass --helpshort to see the flags.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax and grain are chatty at INFO
  loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)

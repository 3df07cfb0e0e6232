"""How every entry point starts and ends: absl's `app.run`, with the endings a shell user expects.

- `--help` (`-?`, `--helpshort`, `--helpfull`, `--helpxml`) prints the help and exits 0; absl exits 1.
- A usage error (`app.UsageError`: a missing or contradictory flag) or a flag that does not parse
  prints one `error:` line and a pointer to `--helpshort`, and exits 1, instead of absl's whole usage
  text before the message.
- Ctrl-C prints one line and exits 130 (outputs are written atomically, so none is left half-written).
- `predict` and `train` keep XLA's compiled programs in a persistent cache (`--compilation_cache`), so a
  second run over new scans does not compile the networks again (about 10 s of CPU per run for a
  SPINEPS pair on a 2-core CPU).
"""
from __future__ import annotations

import functools
import os
import pathlib
import sys
from typing import Callable

from absl import app
from absl import flags

HELP_FLAGS = ("--help", "-?", "--helpshort", "--helpfull", "--helpxml")
CACHE_ENV = "SPINE_JAX_CACHE_DIR"


def default_compilation_cache() -> str:
  """$SPINE_JAX_CACHE_DIR, else $XDG_CACHE_HOME/spine_jax/xla (~/.cache/spine_jax/xla)."""
  if os.environ.get(CACHE_ENV) is not None:
    return os.environ[CACHE_ENV]
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return str(pathlib.Path(base) / "spine_jax" / "xla")


def define_compilation_cache_flag():
  """The `--compilation_cache` flag of an entry point that compiles networks."""
  return flags.DEFINE_string(
      "compilation_cache", default_compilation_cache(),
      f"Folder of XLA's persistent compilation cache (default ${CACHE_ENV} or ~/.cache/spine_jax/xla); '' turns it "
      "off. A run reuses what an earlier run with the same networks and shapes compiled.")


def use_compilation_cache(folder: str | None) -> str | None:
  """Points JAX's persistent compilation cache at `folder` (None or '': off), unless a cache is already
  configured in this process (a test session's, or JAX_COMPILATION_CACHE_DIR). Returns the folder in use."""
  import jax  # noqa: PLC0415 (only the entry points that compile pay for the import)
  current = jax.config.jax_compilation_cache_dir
  if current or not folder:
    return current or None
  try:
    pathlib.Path(folder).mkdir(parents=True, exist_ok=True)
  except OSError as e:
    print(f"warning: --compilation_cache={folder}: {e.strerror}; compiling without a cache", file=sys.stderr)
    return None
  jax.config.update("jax_compilation_cache_dir", str(folder))
  return str(folder)


def _asks_for_help(argv) -> bool:
  return any(a.split("=", 1)[0] in HELP_FLAGS and a.split("=", 1)[-1].lower() not in ("false", "0")
             for a in argv[1:])


def _one_line_usage_errors(main: Callable, program: str) -> Callable:
  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except app.UsageError as e:
      print(f"error: {e}\n(python -m {program} --helpshort lists the flags)", file=sys.stderr)
      return e.exitcode
  return wrapped


def flag_error(e: flags.Error) -> str:
  """What a flag that does not parse prints."""
  return f"error: {e}\n(--helpshort lists the flags)"


def parse_flags(argv):
  """absl's flag parsing, with a flag that does not parse reported on one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(flag_error(e))


def run(main: Callable, program: str, flags_parser: Callable = parse_flags) -> None:
  """`app.run(main)` for `python -m <program>`."""
  help_asked = _asks_for_help(sys.argv)
  try:
    app.run(_one_line_usage_errors(main, program), flags_parser=flags_parser)
  except SystemExit as e:
    if help_asked and e.code == 1:
      sys.exit(0)
    raise
  except KeyboardInterrupt:
    print("\ninterrupted: outputs finished so far are complete; run the same command again to go on",
          file=sys.stderr, flush=True)
    sys.exit(130)

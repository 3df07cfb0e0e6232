"""How every entry point starts and ends: absl's `app.run`, with the endings a shell user expects.

- `--help` (`-?`, `--helpshort`, `--helpfull`, `--helpxml`) prints the help and exits 0; absl exits 1.
- A usage error (`app.UsageError`: a missing or contradictory flag) or a flag that does not parse
  prints one `error:` line and a pointer to `--helpshort`, and exits 1, instead of absl's whole usage
  text before the message.
- Ctrl-C prints one line and exits 130 (outputs are written atomically, so none is left half-written).
"""
from __future__ import annotations

import functools
import sys
from typing import Callable

from absl import app
from absl import flags

HELP_FLAGS = ("--help", "-?", "--helpshort", "--helpfull", "--helpxml")


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

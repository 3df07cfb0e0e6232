"""The one error type of the converters (a ValueError, so command-line code reports it plainly), and the
one check every converter makes before it writes."""
from __future__ import annotations

import pathlib


class ConversionError(ValueError):
  """A weight file or model folder that cannot be converted; the message names file and key."""


def refuse_existing(output: pathlib.Path, overwrite: bool) -> None:
  """An existing ``output`` is replaced only with --overwrite."""
  if output.exists() and not overwrite:
    raise ConversionError(f"{output}: exists; choose another --output or pass --overwrite")

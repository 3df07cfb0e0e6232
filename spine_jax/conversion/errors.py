"""The one error type of the converters (a ValueError, so command-line code reports it plainly)."""


class ConversionError(ValueError):
  """A weight file or model folder that cannot be converted; the message names file and key."""

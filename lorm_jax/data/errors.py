"""Error type raised by the data loaders."""

from __future__ import annotations


class DataError(ValueError):
  """A dataset is missing, incomplete or corrupt.

  The message is a single line: what is missing, where it was looked for and
  how to get it (newlines in the message are folded into spaces).
  """

  def __init__(self, message: str):
    super().__init__(" ".join(str(message).split()))

"""The errors a user can meet, and how the entry points report them.

Every error caused by what the user gave (a config value, a config file, a
data set, weights, a split file, a workdir) is a `UserError` with a one-line
message that says what is wrong and what to do. The entry points print it as
`error: <message>` on stderr and exit with status 2; anything else is a
programming error and keeps its traceback. `LORM_JAX_VERBOSE=1` shows the
traceback of user errors too. docs/errors.md lists them.
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, NoReturn

EXIT_USER_ERROR = 2


class UserError(ValueError):
  """Bad input; the message is one line (newlines are folded into spaces)."""

  def __init__(self, message: str):
    super().__init__(' '.join(str(message).split()))


class ConfigError(UserError):
  """A config key, value or file no run can use, or a workdir that does not fit."""


class DataError(UserError):
  """A dataset or split file is missing, incomplete, corrupt or does not fit the config."""


class CheckpointError(UserError):
  """A weights or run checkpoint is missing, unreadable or does not fit the model."""


class DivergenceError(UserError):
  """Training produced a non-finite loss, Gram or merge; nothing of it was saved."""


def verbose() -> bool:
  return os.environ.get('LORM_JAX_VERBOSE', '') not in ('', '0')


def fail(message: str) -> NoReturn:
  """Prints `error: message` (one line) on stderr and exits with status 2."""
  print('error: ' + ' '.join(str(message).split()), file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def report_user_errors(main: Callable[..., object]) -> Callable[..., object]:
  """Wraps an entry point's main: a UserError becomes one line and exit status 2."""
  def wrapped(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except UserError as e:
      if verbose():
        traceback.print_exc()
      fail(str(e))
  wrapped.__name__ = getattr(main, '__name__', 'main')
  wrapped.__doc__ = getattr(main, '__doc__', None)
  return wrapped


def parse_flags_or_fail(argv: list[str]) -> list[str]:
  """absl `flags_parser` for `app.run`: a bad flag, config file or config
  override (`--config.rnak=4`, `--config.rounds=abc`, a missing file, a
  config argument its `get_config` rejects) becomes one line and status 2."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  try:
    rest = flags.FLAGS(argv)
    for name in flags.FLAGS:   # config files load lazily: load them now
      if type(flags.FLAGS[name]).__name__ == '_ConfigFlag' and flags.FLAGS[name].present:
        flags.FLAGS[name].value.keys()  # a failed load raises on first access
    return rest
  except Exception as e:  # pylint: disable=broad-except
    if verbose():
      traceback.print_exc()
    fail(_flag_error_message(e, argv))


def _flag_error_message(e: Exception, argv: list[str]) -> str:
  """One line for a flag-parsing failure (absl and ml_collections give
  multi-line texts with tracebacks inside)."""
  text = str(e)
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  overrides = [a[2:].split('=')[0] for a in argv if a.startswith('--config.')]
  if isinstance(e, (AttributeError, KeyError)) or "Unknown command line flag 'config." in text:
    unknown = next((o for o in overrides if o.split('.', 1)[1] in text or
                    repr(o.split('.')[-1]) in text), overrides[0] if overrides else '?')
    return (f'--{unknown}: the config has no key {unknown.split(".", 1)[-1]!r}; '
            '--config.KEY=VALUE must name an existing key (e.g. --config.model.rank=4)')
  if 'Failed loading config file' in text or 'earlier failure to load' in text:
    missing = [l for l in lines if 'Errno' in l or 'No such file' in l]
    return f'cannot load the config file: {(missing or lines)[-1]}'
  if 'Error whilst parsing config file' in text:   # get_config raised: its last line
    return f'{lines[0].split(": Error whilst")[0]}: {lines[-1]}'
  return ' '.join(lines)


def argument_parser(**kwargs):
  """An argparse.ArgumentParser whose usage errors are one line and status 2."""
  import argparse  # pylint: disable=import-outside-toplevel

  class _Parser(argparse.ArgumentParser):
    def error(self, message):
      fail(f'{self.prog}: {message} (see --help)')

  return _Parser(**kwargs)

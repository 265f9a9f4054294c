"""A table of named rows with aliases: the dataset and backbone registries.

A row is any object with `name` and `aliases` attributes. A name or alias is
registered once; looking up an unknown one is a ValueError whose one line
lists what is known (config validation turns it into a ConfigError).
"""
from __future__ import annotations

from typing import Generic, Iterator, TypeVar

Row = TypeVar('Row')


class Registry(Generic[Row]):
  """Rows by name; `what` names the kind in messages ('dataset', 'model')."""

  def __init__(self, what: str):
    self.what = what
    self._rows: dict[str, Row] = {}
    self._aliases: dict[str, str] = {}

  def register(self, row: Row) -> Row:
    """Adds a row; its name and aliases must be new."""
    for name in (row.name, *row.aliases):
      if name in self._rows or name in self._aliases:
        raise ValueError(f'{self.what} name {name!r} is registered already')
    self._rows[row.name] = row
    self._aliases.update({a: row.name for a in row.aliases})
    return row

  def unregister(self, name: str) -> None:
    """Removes a row and its aliases (tests that register a toy one)."""
    row = self._rows.pop(name)
    for a in row.aliases:
      self._aliases.pop(a, None)

  def get(self, name: str) -> Row:
    """The row of a name or alias; ValueError (one line, the known names) otherwise."""
    key = self._aliases.get(name, name)
    if key not in self._rows:
      aliases = f' (aliases: {", ".join(sorted(self._aliases))})' if self._aliases else ''
      raise ValueError(f'unknown {self.what} {name!r}; known: {", ".join(sorted(self._rows))}'
                       f'{aliases}')
    return self._rows[key]

  def __contains__(self, name: str) -> bool:
    return self._aliases.get(name, name) in self._rows

  def __iter__(self) -> Iterator[str]:
    return iter(self._rows)

  def items(self):
    return self._rows.items()

  def values(self):
    return self._rows.values()

  def __getitem__(self, name: str) -> Row:
    return self._rows[name]

"""Bookkeeping shared by the converters: what was read, written and skipped, and why.

A reader turns each input record into a `MoleculeRecord` through `ConversionReport.build`, which
validates it and either returns it, counts it as skipped under a reason (`skip_bad=True`), or raises
`ConversionError` naming the file and record (`skip_bad=False`). Nothing is ever dropped silently:
`read == written + sum(skipped.values())` once the writer has counted what it stored.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable

from consist.data.record import MoleculeRecord, RecordError


class ConversionError(ValueError):
  """A bad input record met without --skip_bad. The message names the file and the record."""


class BadRecord(Exception):
  """Raised inside a reader for one malformed input record.

  Attributes:
    reason: short snake_case key the report counts the record under ("truncated", "parse_error", ...).
  """

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


@dataclasses.dataclass
class ConversionReport:
  """Counts of one conversion; JSON-able through `to_json`.

  Attributes:
    format: input format name.
    input: input path.
    skip_bad: skip bad records (counting them) instead of raising `ConversionError`.
    validate: run `MoleculeRecord.validate` on each record built. A writer that validates on
      append (the store does) turns this off and passes its RecordErrors to `bad`.
    read: input records met, good or bad.
    written: records stored (counted by the caller that writes).
    skipped: reason -> number of records skipped.
    notes: event -> count for records kept with a caveat (e.g. QM9 bonds without orders).
    examples: reason or note -> the first message seen, naming file and record.
    where: location of the record most recently read ("file: record"), for the writer's messages.
  """

  format: str
  input: str
  skip_bad: bool = False
  validate: bool = True
  read: int = 0
  written: int = 0
  skipped: dict[str, int] = dataclasses.field(default_factory=collections.Counter)
  notes: dict[str, int] = dataclasses.field(default_factory=collections.Counter)
  examples: dict[str, str] = dataclasses.field(default_factory=dict)
  where: str = ""

  def build(self, where: str, make: Callable[[], MoleculeRecord]) -> MoleculeRecord | None:
    """Counts one input record, builds and validates it; None if it was skipped.

    Args:
      where: "file: record" location put in every message.
      make: builds the record; may raise `BadRecord`, `RecordError`, or ValueError / KeyError /
        IndexError for unparseable content (counted as "parse_error").
    """
    self.read += 1
    self.where = where
    try:
      record = make()
      return record.validate(where) if self.validate else record
    except BadRecord as e:
      self.bad(e.reason, f"{where}: {e}")
    except RecordError as e:
      self.bad(e.reason, str(e))
    except (ValueError, KeyError, IndexError) as e:
      self.bad("parse_error", f"{where}: cannot parse ({type(e).__name__}: {e})")
    return None

  def lose(self, where: str, reason: str, message: str) -> None:
    """Counts one input record that could not even be delimited (a truncated tail), like `bad`."""
    self.read += 1
    self.where = where
    self.bad(reason, f"{where}: {message}")

  def bad(self, reason: str, message: str) -> None:
    """Raises `ConversionError(message)`, or under `skip_bad` counts the record under `reason`."""
    if not self.skip_bad:
      raise ConversionError(f"{message} [reason: {reason}; pass --skip_bad to skip such records]")
    self.skipped[reason] += 1
    self.examples.setdefault(reason, message)

  def note(self, event: str, message: str) -> None:
    """Counts a kept record that carries a caveat (`event`), remembering the first message."""
    self.notes[event] += 1
    self.examples.setdefault(event, message)

  def to_json(self) -> dict[str, Any]:
    return {
        "format": self.format,
        "input": self.input,
        "read": self.read,
        "written": self.written,
        "skipped": dict(sorted(self.skipped.items())),
        "skipped_total": sum(self.skipped.values()),
        "notes": dict(sorted(self.notes.items())),
        "examples": dict(sorted(self.examples.items())),
    }

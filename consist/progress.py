"""A progress bar on stderr for loops over molecules: `label 37/120 [######..............]  31% 4.2/s ETA 20s`.

One class for every stage that reports progress (prediction, evaluation, relaxation, the
reproduction): either called with (done, total), as `consist.relax` and `consist.eval.physics` do,
or advanced with `update(n)` against the total it was made with. On a terminal the line is redrawn
in place; otherwise (a log file, CI) one line is written per tenth of the work.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO


class Progress:
  """A progress bar (module docstring). `enabled=False` makes it silent."""

  def __init__(self, label: str, total: int = 0, *, enabled: bool = True, stream: TextIO | None = None):
    self.label, self.total, self.done, self.enabled = label, total, 0, enabled
    self._stream = stream or sys.stderr
    self._tty = hasattr(self._stream, "isatty") and self._stream.isatty()
    self._start = time.perf_counter()
    self._shown = -1

  def update(self, n: int = 1) -> None:
    """Advances by n items of the total given at construction."""
    self(self.done + n, self.total)

  def __call__(self, done: int, total: int) -> None:
    self.done, self.total = done, total
    if not self.enabled or total <= 0:
      return
    frac = min(done / total, 1.0)
    tenth = int(10 * frac)
    if not self._tty and tenth == self._shown and done < total:
      return
    self._shown = tenth
    elapsed = time.perf_counter() - self._start
    rate = done / elapsed if elapsed > 0 else math.nan
    eta = (total - done) / rate if rate > 0 else math.nan
    bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
    eta_text = f"{eta:.0f}s" if math.isfinite(eta) else "–"
    line = f"{self.label} {done}/{total} [{bar}] {100 * frac:3.0f}% {rate:.1f}/s ETA {eta_text}"
    if self._tty:
      self._stream.write("\r" + line + ("\n" if done >= total else ""))
    else:
      self._stream.write(line + "\n")
    self._stream.flush()

"""Run logging: console progress bar with ETA, TensorBoard event files, a JSONL metrics file.

Only process 0 writes (the other processes get a logger whose methods do nothing). Files:
  <workdir>/metrics.jsonl   one JSON object per line: {"split", "step", "time", <metric>: float, ...}
  <workdir>/tb/             TensorBoard scalars "<split>/<metric>"
A resumed run appends to both.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Mapping, TextIO

import jax

# Console columns besides the loss terms; everything else goes only to the files.
_CONSOLE_FIRST = ("loss", "lr", "grad_norm")
_NOT_ON_CONSOLE = ("finite", "nonfinite_term", "nonfinite_steps")


def _fmt_time(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsLogger:
  """Writes metrics of one run.

  Args:
    workdir: run directory.
    total_steps: the run's last step (for the bar and ETA).
    start_step: first step of this process's run (resumed runs start later; ETA uses the rate since).
    stream: console stream (default stderr).
    enabled: default `jax.process_index() == 0`.
  """

  def __init__(self, workdir: str | Path, *, total_steps: int, start_step: int = 0,
               stream: TextIO | None = None, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.total_steps = total_steps
    self._start_step = start_step
    self._start_time = time.perf_counter()
    self._stream = stream or sys.stderr
    self._tty = hasattr(self._stream, "isatty") and self._stream.isatty()
    self._jsonl = self._tb = None
    if self.enabled:
      workdir = Path(workdir)
      workdir.mkdir(parents=True, exist_ok=True)
      self._jsonl = open(workdir / "metrics.jsonl", "a", buffering=1)
      from tensorboardX import SummaryWriter  # noqa: PLC0415  (heavy; only process 0 needs it)
      self._tb = SummaryWriter(str(workdir / "tb"))

  def write(self, split: str, step: int, metrics: Mapping[str, float]) -> None:
    """Appends one record to the JSONL file and TensorBoard; training records also update the bar."""
    if not self.enabled:
      return
    values = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"split": split, "step": int(step), "time": time.time(), **values}) + "\n")
    for k, v in values.items():
      self._tb.add_scalar(f"{split}/{k}", v, int(step))
    if split == "train":
      self._progress(step, values)
    else:
      self.message(f"[{split} @ {step}] " + self._columns(values))

  def _columns(self, values: Mapping[str, float]) -> str:
    keys = [k for k in _CONSOLE_FIRST if k in values]
    keys += sorted(k for k in values if k not in _CONSOLE_FIRST and k not in _NOT_ON_CONSOLE)
    return " ".join(f"{k} {values[k]:.4g}" for k in keys)

  def _progress(self, step: int, values: Mapping[str, float]) -> None:
    elapsed = time.perf_counter() - self._start_time
    done = step - self._start_step
    rate = done / elapsed if elapsed > 0 and done > 0 else float("nan")
    eta = (self.total_steps - step) / rate if rate > 0 else float("nan")
    frac = min(step / max(self.total_steps, 1), 1.0)
    bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
    line = (f"step {step}/{self.total_steps} [{bar}] {100 * frac:3.0f}% {rate:.2f} it/s "
            f"ETA {_fmt_time(eta)} | " + self._columns(values))
    self._stream.write(("\r" + line) if self._tty else (line + "\n"))
    self._stream.flush()

  def message(self, text: str) -> None:
    """A line on the console (process 0 only), not overwritten by the bar."""
    if self.enabled:
      self._stream.write(("\n" if self._tty else "") + text + "\n")
      self._stream.flush()

  def close(self) -> None:
    if self.enabled:
      if self._tty:
        self._stream.write("\n")
      self._jsonl.close()
      self._tb.close()
      self.enabled = False

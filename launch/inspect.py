"""Prints a JSON summary of a consist dataset (or some of its records).

  python -m launch.inspect [DIR] [--split NAME] [--verify]    # summary; DIR default: data/bundled
  python -m launch.inspect DIR --records 0:5 [--split train]  # records 0..4 as JSON

Without --split, --records indexes the splits concatenated in the dataset's order; every printed
record carries its split and its index within that split. DIR may also be a single split written by
a standalone StoreWriter.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from absl import app, flags

from launch import _cli

from consist.data import store_format
from consist.data.bundled import BUNDLED_DATASET
from consist.data.store import Dataset, Store, StoreError, open_dataset, open_store

_RECORDS = flags.DEFINE_string(
    "records", None,
    "START:STOP (STOP exclusive, either may be empty): print these records as JSON.")
_SPLIT = flags.DEFINE_string("split", None, "Restrict the summary / --records to this split.")
_VERIFY = flags.DEFINE_bool("verify", False, "Recompute every column file's sha256 first.")


def parse_range(text: str, size: int) -> range:
  """'START:STOP' -> range within [0, size]; app.UsageError on anything else."""
  start_text, sep, stop_text = text.partition(":")
  try:
    start = int(start_text) if start_text.strip() else 0
    stop = int(stop_text) if stop_text.strip() else size
  except ValueError:
    start = stop = -1
  if not sep or start < 0 or stop < start:
    raise app.UsageError(f"--records={text!r}: expected START:STOP with 0 <= START <= STOP")
  if stop > size:
    raise app.UsageError(f"--records={text!r}: STOP {stop} is past the end ({size} records)")
  return range(start, stop)


def _open(path: Path) -> Dataset | Store:
  if not path.exists() and path == BUNDLED_DATASET:
    raise app.UsageError(
        f"the bundled dataset {path} has not been built yet: build it with "
        "`python -m launch.build_dataset` (see the README), or pass a dataset directory")
  if (path / store_format.MANIFEST).exists() and not (path / store_format.DATASET_JSON).exists():
    return open_store(path, verify=_VERIFY.value)
  return open_dataset(path, verify=_VERIFY.value)


def inspect(path: Path, records: str | None, split: str | None) -> dict | list:
  """The summary dict, or a list of record dicts when `records` is given."""
  data = _open(path)
  if isinstance(data, Store):
    if split is not None:
      raise app.UsageError(f"--split={split}: {path} is a single split without named splits")
    stores = {"": data}
  elif split is not None:
    if split not in data.splits:
      raise app.UsageError(f"--split={split}: {path} has splits {list(data.splits)}")
    stores = {split: data[split]}
  else:
    stores = data.splits
  if records is None:
    summary = stores[split].summary() if split is not None else data.summary()
    summary["verified"] = _VERIFY.value
    return summary
  wanted = parse_range(records, sum(len(s) for s in stores.values()))
  out, offset = [], 0
  for name, store in stores.items():
    for i in range(max(wanted.start - offset, 0), min(wanted.stop - offset, len(store))):
      out.append({"split": name or None, "index": i, **store[i].to_json()})
    offset += len(store)
  return out


def main(argv):
  if len(argv) > 2:
    raise app.UsageError(f"expected at most one dataset directory, got {argv[1:]}")
  path = Path(argv[1]) if len(argv) == 2 else BUNDLED_DATASET
  try:
    result = inspect(path, _RECORDS.value, _SPLIT.value)
  except StoreError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  try:
    json.dump(result, sys.stdout, indent=1, ensure_ascii=False)
    sys.stdout.write("\n")
    sys.stdout.flush()
  except BrokenPipeError:  # `... | head`: the reader has gone; exit quietly
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
  return 0


if __name__ == "__main__":
  _cli.run(main, "launch.inspect")

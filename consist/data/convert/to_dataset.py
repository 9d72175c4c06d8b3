"""Streams a reader's records into a consist dataset (one split) and writes the conversion report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from consist.data.convert.formats import reader
from consist.data.convert.report import ConversionError, ConversionReport
from consist.data.record import RecordError
from consist.data.store import DatasetWriter

REPORT_NAME = "conversion_report.json"


def convert_to_dataset(fmt: str, input_path: str | Path, out: str | Path, *,
                       split: str = "train", skip_bad: bool = False, overwrite: bool = False,
                       **options: Any) -> dict[str, Any]:
  """Converts `input_path` (format `fmt`) into the dataset `out`; returns the report as JSON.

  The dataset's attrs record the source (format, input, options); the report is also written to
  `<out>/conversion_report.json`. Records the store rejects (its own checks) count as skipped too.

  Raises:
    ConversionError: a bad record without `skip_bad`, or no record converted at all. Nothing is
      finalised at `out` then (a previous dataset there is left untouched).
  """
  read = reader(fmt)
  # The store validates every record on append: the reader need not validate it too.
  report = ConversionReport(format=fmt, input=str(input_path), skip_bad=skip_bad, validate=False)
  source = {"format": fmt, "input": str(input_path),
            "options": {k: str(v) for k, v in options.items()}}
  with DatasetWriter(out, overwrite=overwrite, attrs={"source": source}) as dataset:
    writer = dataset.split(split)
    for record in read(input_path, report, **options):
      try:
        writer.append(record, where=report.where)
      except RecordError as e:
        report.bad(e.reason, str(e))
        continue
      report.written += 1
    if report.written == 0:
      raise ConversionError(f"{input_path}: no record could be converted "
                            f"({report.read} read, skipped: {dict(report.skipped)})")
  result = {**report.to_json(), "out": str(out), "split": split}
  (Path(out) / REPORT_NAME).write_text(json.dumps(result, indent=2) + "\n")
  return result

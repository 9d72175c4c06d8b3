"""Converters from the formats users have into `MoleculeRecord`s (units: Å, eV, eV/Å).

Each format module (`consist.data.convert.<format>`) exposes
`read(path, report, **options) -> Iterator[MoleculeRecord]`, a generator that never writes: it yields
records, and for each bad input record either raises `ConversionError` naming the file and record
or (report.skip_bad) counts it in the `ConversionReport` under its reason. `convert_to_dataset`
(and `python -m launch.convert`) streams them into the store.
"""

from consist.data.convert.formats import FORMATS, OPTIONS, reader
from consist.data.convert.report import BadRecord, ConversionError, ConversionReport
from consist.data.convert.to_dataset import convert_to_dataset

__all__ = ["FORMATS", "OPTIONS", "BadRecord", "ConversionError", "ConversionReport",
           "convert_to_dataset", "reader"]

"""The converter formats, their options, and their readers (imported on first use, so that ase.io,
h5py and RDKit load only when a format needs them)."""

import importlib
from typing import Callable, Iterator

from consist.data.record import MoleculeRecord

# Format -> keyword options its reader accepts (launch.convert flags of the same name).
OPTIONS = {
    "extxyz": ("fidelity", "structure_fidelity"),
    "asedb": ("fidelity", "structure_fidelity"),
    "qm9": (),
    "pcqm4mv2": ("smiles_csv",),
    "spice": ("fidelity",),
    "pubchemqc": (),
}
FORMATS = tuple(OPTIONS)


def reader(fmt: str) -> Callable[..., Iterator[MoleculeRecord]]:
  """The `read(path, report, **options)` generator function of format `fmt`."""
  if fmt not in OPTIONS:
    raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
  return importlib.import_module(f"consist.data.convert.{fmt}").read

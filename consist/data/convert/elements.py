"""Element symbols -> atomic numbers, strict (no dummy "X")."""

from ase.data import chemical_symbols

from consist.data.convert.report import BadRecord

_Z = {symbol: z for z, symbol in enumerate(chemical_symbols) if z > 0}


def atomic_number(symbol: str) -> int:
  """Atomic number of an element symbol ("C", "Cl"); raises BadRecord("unknown_element")."""
  z = _Z.get(symbol.strip())
  if z is None:
    raise BadRecord("unknown_element", f"unknown element symbol {symbol!r}")
  return z

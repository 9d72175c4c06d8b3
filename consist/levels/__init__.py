"""Levels of theory behind one interface (BRIEF section 4): MMFF94, GFN1/GFN2-xTB, PySCF DFT.

  level = get_level("gfn2-xtb")
  energy_eV, forces_eV_per_A = level.energy_forces(atomic_numbers, positions_A)
  result = level.relax(atomic_numbers, positions_A, fmax=0.01)
"""

from consist.levels.base import (REASON_ELEMENT, REASON_SCF, REASON_SETUP, REASON_STATE, Level,
                                 LevelError, RelaxResult, ScfNotConvergedError,
                                 UnsupportedElementError, UnsupportedStateError)


def check_level_name(name: str) -> str:
  """`name` normalised (stripped, lower case) if it names a level `get_level` builds.

  Raises:
    ValueError: it does not.
  """
  key = name.strip().lower()
  if key in ("mmff94", "gfn1-xtb", "gfn2-xtb") or "/" in key:
    return key
  raise ValueError(f"unknown level of theory {name!r}: expected mmff94, gfn1-xtb, gfn2-xtb or "
                   "<functional>/<basis> (e.g. b3lyp/6-31g*)")


def get_level(name: str, **options) -> Level:
  """"mmff94" | "gfn1-xtb" | "gfn2-xtb" | "<functional>/<basis>" (PySCF); options go to the level."""
  key = check_level_name(name)
  if key == "mmff94":
    from consist.levels.mmff import MmffLevel  # pylint: disable=g-import-not-at-top
    return MmffLevel(**options)
  if key in ("gfn1-xtb", "gfn2-xtb"):
    from consist.levels.xtb import XtbLevel  # pylint: disable=g-import-not-at-top
    return XtbLevel(key, **options)
  from consist.levels.dft import DftLevel  # pylint: disable=g-import-not-at-top
  return DftLevel(key, **options)


__all__ = ["Level", "LevelError", "RelaxResult", "ScfNotConvergedError", "UnsupportedElementError",
           "UnsupportedStateError", "REASON_ELEMENT", "REASON_SCF", "REASON_SETUP", "REASON_STATE",
           "check_level_name", "get_level"]

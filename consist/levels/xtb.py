"""GFN1-xTB and GFN2-xTB through tblite's ASE calculator.

tblite parallelises with OpenMP: in worker processes set OMP_NUM_THREADS=1 before it loads
(BRIEF section 4: oversubscribed threads made single points ~200x slower).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from consist.levels import base

_METHODS = {"gfn1-xtb": "GFN1-xTB", "gfn2-xtb": "GFN2-xTB"}


class XtbLevel(base.Level):
  """Tight-binding level `gfn1-xtb` or `gfn2-xtb` (elements H-Rn).

  Args:
    name: "gfn1-xtb" or "gfn2-xtb".
    accuracy: tblite numerical accuracy (smaller is tighter; 1.0 is tblite's default).
    electronic_temperature: Fermi smearing temperature, K.
    max_iterations: SCF iterations before ScfNotConvergedError.
  """

  supported_elements = frozenset(range(1, 87))

  def __init__(self, name: str, *, accuracy: float = 1.0, electronic_temperature: float = 300.0,
               max_iterations: int = 250):
    if name not in _METHODS:
      raise ValueError(f"unknown xTB level {name!r}; expected one of {sorted(_METHODS)}")
    self.name = name
    self.accuracy = accuracy
    self.electronic_temperature = electronic_temperature
    self.max_iterations = max_iterations

  def _calculator(self, atomic_numbers: np.ndarray, positions: np.ndarray, charge: int,
                  multiplicity: int, bonds: Any):
    from tblite.ase import TBLite  # pylint: disable=g-import-not-at-top (loads OpenMP)
    return TBLite(method=_METHODS[self.name], charge=charge, multiplicity=multiplicity,
                  accuracy=self.accuracy, electronic_temperature=self.electronic_temperature,
                  max_iterations=self.max_iterations, verbosity=0)

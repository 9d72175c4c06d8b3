"""SPICE-style HDF5 (Eastman et al. 2023): one group per molecule, several conformations each.

Per group: `atomic_numbers` int [n], `conformations` [k, n, 3] (bohr), `dft_total_energy` [k]
(hartree), `dft_total_gradient` [k, n, 3] (hartree/bohr; forces are its negative), `smiles`
(bytes array of length 1, or a scalar: the mapped SMILES). Other datasets (formation energy, MBIS
charges, subset, ...) are not kept. One record per conformation, sharing mol_id = group name;
charge from the formal charges of the SMILES (0, noted in the report, if it does not parse);
off-equilibrium structures (is_equilibrium False, no structure fidelity: SPICE conformations are
MD samples). A group that cannot be used at all (missing or inconsistent arrays) is one bad record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
from rdkit import Chem

from consist import units
from consist.data.convert import sniff
from consist.data.convert.report import BadRecord, ConversionError, ConversionReport
from consist.data.record import MoleculeRecord

FIDELITY = "wb97m-d3bj/def2-tzvppd"


def read(path: str | Path, report: ConversionReport, *,
         fidelity: str = FIDELITY) -> Iterator[MoleculeRecord]:
  """Yields one record per conformation of every molecule group in the HDF5 file `path`.

  Args:
    fidelity: label fidelity tag of the energies and gradients (SPICE's level by default).
  """
  path = Path(path)
  sniff.check_input_file(path, "spice")
  try:
    f = h5py.File(path, "r")
  except OSError as e:
    raise ConversionError(f"{path}: not a readable HDF5 file ({sniff.describe(path)}; {e})") from None
  with f:
    for name in f:
      group = f[name]
      where = f"{path}: group {name!r}"
      try:
        arrays = _group_arrays(group)
      except BadRecord as e:
        report.lose(where, e.reason, str(e))
        continue
      except (OSError, KeyError) as e:
        report.lose(where, "parse_error", f"cannot read ({type(e).__name__}: {e})")
        continue
      z, conformations, energies, gradients, smiles = arrays
      charge = _charge_of(smiles)
      if charge is None:
        report.note("charge_unknown_assumed_neutral",
                    f"{where}: no parseable SMILES {smiles!r}; charge set to 0")
        charge = 0
      for k in range(conformations.shape[0]):
        record = report.build(f"{where} conformation {k}", lambda: MoleculeRecord(
            mol_id=name,
            atomic_numbers=z,
            positions=conformations[k] * units.BOHR_TO_ANGSTROM,
            charge=charge,
            smiles=smiles,
            energy=None if energies is None else float(energies[k]) * units.HARTREE_TO_EV,
            forces=(None if gradients is None
                    else -gradients[k] * units.HARTREE_PER_BOHR_TO_EV_PER_ANGSTROM),
            is_equilibrium=False,
            label_fidelity=fidelity if energies is not None or gradients is not None else "",
        ))
        if record is not None:
          yield record


def _group_arrays(group: h5py.Group):
  """(z [n], conformations [k, n, 3] bohr, energies [k] | None, gradients [k, n, 3] | None,
  smiles) of one molecule group; raises BadRecord if they are missing or inconsistent."""
  if not isinstance(group, h5py.Group):
    raise BadRecord("parse_error", "not a group")
  for key in ("atomic_numbers", "conformations"):
    if key not in group:
      raise BadRecord("missing_key", f"no dataset {key!r}")
  z = np.asarray(group["atomic_numbers"][()], dtype=np.int64)
  conformations = np.asarray(group["conformations"][()], dtype=np.float64)
  if z.ndim != 1:
    raise BadRecord("length_mismatch", f"atomic_numbers has shape {z.shape}, expected (n,)")
  n = z.shape[0]
  if n == 0:
    raise BadRecord("empty_molecule", "empty molecule (0 atoms)")
  if conformations.ndim != 3 or conformations.shape[1:] != (n, 3):
    raise BadRecord("length_mismatch",
                    f"conformations has shape {conformations.shape}, expected (k, {n}, 3)")
  k = conformations.shape[0]
  energies = gradients = None
  if "dft_total_energy" in group:
    energies = np.asarray(group["dft_total_energy"][()], dtype=np.float64)
    if energies.shape != (k,):
      raise BadRecord("length_mismatch",
                      f"dft_total_energy has shape {energies.shape}, expected ({k},)")
  if "dft_total_gradient" in group:
    gradients = np.asarray(group["dft_total_gradient"][()], dtype=np.float64)
    if gradients.shape != (k, n, 3):
      raise BadRecord("length_mismatch",
                      f"dft_total_gradient has shape {gradients.shape}, expected ({k}, {n}, 3)")
  smiles = ""
  if "smiles" in group:
    raw = np.asarray(group["smiles"][()]).reshape(-1)
    if raw.size != 1:
      raise BadRecord("parse_error", f"smiles holds {raw.size} strings, expected 1")
    smiles = raw[0].decode("utf-8") if isinstance(raw[0], bytes) else str(raw[0])
  return z.astype(np.int32), conformations, energies, gradients, smiles


def _charge_of(smiles: str) -> int | None:
  """Sum of the SMILES' formal charges (parsed without sanitising); None if it does not parse."""
  mol = Chem.MolFromSmiles(smiles, sanitize=False) if smiles else None
  return None if mol is None else sum(atom.GetFormalCharge() for atom in mol.GetAtoms())

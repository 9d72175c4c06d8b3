"""An ASE calculator on a trained consist model: energy (eV) and forces = -dE/dR (eV/Å).

  calc = ConsistCalculator.from_workdir()                 # the bundled pretrained model
  calc = ConsistCalculator.from_workdir("runs/stage2")    # or ConsistCalculator(TrainedModel.load(...))
  atoms.calc = calc; ase.optimize.BFGS(atoms).run(fmax=0.05)

The model takes a bond graph (bond-order edge features). It is taken, in this order, from
`atoms.info["bonds"]` (int [b, 2]) with `atoms.info["bond_orders"]` (float [b]; 1, 1.5 aromatic, 2,
3), from the `bonds` / `bond_orders` given to the constructor, or else perceived once with RDKit
(rdDetermineBonds) from the first geometry the calculator sees, with the total charge from
`atoms.info["charge"]`, the constructor's `charge`, or 0. The graph is then kept fixed along an
optimisation or MD trajectory (a bond stretched far does not stop being a bond); it is resolved again
only when the atom count or elements change.

Every call goes through the run's shape buckets (`TrainedModel.energy_and_forces`): the first
molecule that lands in a bucket compiles it, later molecules of any size in that bucket reuse it.
"""

from __future__ import annotations

from pathlib import Path

import ase
import ase.calculators.calculator as ase_calc
import numpy as np

from consist.data.convert.bonds import bonds_of
from consist.data.graph import count_edges
from consist.data.record import MoleculeRecord
from consist.inference import TrainedModel, load_model
from consist.predict import molecules


class ConsistCalculator(ase_calc.Calculator):
  """Energy and forces of one trained consist model (see the module docstring).

  Args:
    model: the trained model.
    bonds, bond_orders: a bond graph for the molecules this calculator will see (else perceived).
    charge: total charge used for bond perception and as the model's charge input when
      `atoms.info` has no "charge".
    fidelity: level of theory the energy is reported at (one of `model.fidelities`; default the
      run's first).
  """

  implemented_properties = ["energy", "forces"]

  def __init__(self, model: TrainedModel, *, bonds: np.ndarray | None = None,
               bond_orders: np.ndarray | None = None, charge: int = 0, fidelity: str | None = None,
               **kwargs):
    super().__init__(**kwargs)
    if (bonds is None) != (bond_orders is None):
      raise ValueError("ConsistCalculator: give bonds and bond_orders together")
    fidelity = model.fidelities[0] if fidelity is None else fidelity
    if fidelity not in model.fidelities:
      raise ValueError(f"ConsistCalculator: fidelity {fidelity!r} is not one of the run's {model.fidelities}")
    self.model = model
    self.fidelity = fidelity
    self._bonds = None if bonds is None else (np.asarray(bonds, np.int64), np.asarray(bond_orders, np.float64))
    self._charge = int(charge)
    self._template: MoleculeRecord | None = None  # bond graph, charge and elements in use

  @classmethod
  def from_workdir(cls, workdir: str | Path | None = None, *, step: int | None = None,
                   **kwargs) -> "ConsistCalculator":
    """Loads the latest (or `step`'s) checkpoint of a `launch.train` workdir; None = the bundled
    pretrained model (models/pretrained).

    Raises:
      CheckpointError: naming the path and what is wrong.
    """
    return cls(load_model(workdir, step), **kwargs)

  @property
  def bond_graph(self) -> tuple[np.ndarray, np.ndarray] | None:
    """(bonds int [b, 2], bond_orders float [b]) in use, None before the first calculation."""
    return None if self._template is None else (self._template.bonds, self._template.bond_orders)

  def _resolve_graph(self, atoms: ase.Atoms) -> MoleculeRecord:
    """The molecule's bond graph, charge and elements as a record (positions of this geometry)."""
    charge = int(atoms.info.get("charge", self._charge))
    z = np.asarray(atoms.numbers, dtype=np.int64)
    name = atoms.get_chemical_formula()
    if "bonds" in atoms.info:
      bonds = np.asarray(atoms.info["bonds"], np.int64).reshape(-1, 2)
      orders = np.asarray(atoms.info.get("bond_orders", np.ones(len(bonds))), np.float64)
    elif self._bonds is not None:
      bonds, orders = self._bonds
    else:
      try:
        bonds, orders = bonds_of(molecules.from_structure(z, atoms.positions, charge, name).mol)
      except molecules.MoleculeError as e:
        raise ase_calc.CalculatorError(f"ConsistCalculator: {e}; pass atoms.info['bonds'] and "
                                       "['bond_orders'] or the constructor's bonds / bond_orders") from e
    record = MoleculeRecord(mol_id=name, atomic_numbers=z, positions=np.array(atoms.positions), charge=charge,
                            bonds=bonds, bond_orders=orders, label_fidelity=self.fidelity)
    record.validate(f"ConsistCalculator({name})")
    return record

  def calculate(self, atoms=None, properties=("energy",), system_changes=ase_calc.all_changes):
    super().calculate(atoms, properties, system_changes)
    z = np.asarray(self.atoms.numbers)
    if self._template is None or not np.array_equal(self._template.atomic_numbers, z):
      self._template = self._resolve_graph(self.atoms)
      self._check_supported(self._template)
    record = self._template.replace(positions=np.array(self.atoms.positions, dtype=np.float64))
    energy, forces = self.model.energy_and_forces([record])[0]
    self.results = {"energy": energy, "free_energy": energy, "forces": forces}

  def _check_supported(self, record: MoleculeRecord) -> None:
    problem = (molecules.unknown_elements(self.model, record.atomic_numbers, self.fidelity)
               or molecules.size_problem(self.model, record.n_atoms,
                                         count_edges(record, self.model.config.data.cutoff)))
    if problem:
      raise ase_calc.CalculatorError(f"ConsistCalculator({record.mol_id}): {problem}")

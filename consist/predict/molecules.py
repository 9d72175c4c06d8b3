"""Input molecules for prediction: SMILES / SDF / XYZ -> RDKit molecules with explicit hydrogens ->
records the model takes, with the checks that tell a user why a molecule cannot be predicted.

Bond graphs follow the training data (`consist.build.molecule`): RDKit bond orders, aromatic = 1.5,
total charge = sum of formal charges, multiplicity = 1 + number of radical electrons. Structures
without coordinates get a seeded ETKDGv3 embedding; refine mode relaxes it with MMFF94 (the cheap
level the bundled data's structures come from) to the builder's threshold.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Sequence

import ase.data
import ase.io
import numpy as np
from rdkit import Chem
from rdkit.Chem import rdDistGeom

from consist.build.molecule import molecule_seed
from consist import checkpoint
from consist.data.convert import extxyz, sniff
from consist.data.convert.bonds import bonds_of, quiet_rdkit
from consist.data.convert.report import ConversionError
from consist.data.graph import count_edges
from consist.data.record import MoleculeRecord, RecordError
from consist.inference import TrainedModel
from consist.levels import LevelError, get_level
from consist.levels.mmff import molecule_graph

INPUT_SUFFIXES = (".smi", ".sdf", ".xyz")
# The dataset builder's MMFF94 threshold (BuildSettings.cheap_fmax), eV/Å: refine starts look like
# the cheap structures the model was trained on.
MMFF_FMAX = 0.005
MMFF_MAX_STEPS = 2000

REASON_PARSE = "unparsable input"
REASON_ELEMENT = "element unknown to the model"
REASON_SIZE = "larger than every shape bucket"
REASON_BONDS = "bond perception failed"
REASON_EMBED = "embedding failed"
REASON_MMFF = "MMFF94 start failed"
REASON_CHARGE = "charge or multiplicity unknown to the model"
# What a checkpoint without a recorded coverage (written before it was recorded) was trained on:
# every consist dataset so far is neutral and closed-shell.
DEFAULT_COVERAGE = {"charges": [0], "multiplicities": [1]}


class InputFileError(ValueError):
  """A whole input file cannot be read (the message names it)."""


class MoleculeError(Exception):
  """One molecule cannot be predicted: `reason` (a REASON_* key) and a human-readable `detail`."""

  def __init__(self, name: str, source: str, reason: str, detail: str):
    super().__init__(f"{name} ({source}): {reason}: {detail}")
    self.name, self.source, self.reason, self.detail = name, source, reason, detail


@dataclasses.dataclass(frozen=True)
class Molecule:
  """One input molecule.

  Attributes:
    name: identifier (SDF title, extxyz `name`, .smi name column, or `<file>:<entry>` / the SMILES).
    smiles: the source SMILES, or the canonical SMILES of an input structure's bond graph.
    mol: sanitised RDKit molecule with explicit hydrogens (the bond graph); if `has_coordinates`,
      conformer 0 holds the input structure (Å).
    has_coordinates: the input gave a 3D structure (used as the refine start instead of ETKDG+MMFF).
  """

  name: str
  smiles: str
  mol: Chem.Mol
  has_coordinates: bool

  @property
  def atomic_numbers(self) -> np.ndarray:
    return np.array([a.GetAtomicNum() for a in self.mol.GetAtoms()], dtype=np.int64)

  @property
  def canonical_smiles(self) -> str:
    """RDKit's canonical SMILES of the bond graph: the same molecule written differently, or given at
    another position of the input, gets the same seed."""
    with quiet_rdkit():
      return Chem.MolToSmiles(Chem.RemoveHs(self.mol, sanitize=False))

  def seed(self, seed: int) -> int:
    """This molecule's seed under the run seed `seed` (ETKDG embedding and, per molecule, sampling)."""
    return molecule_seed(seed, self.canonical_smiles)

  @property
  def charge(self) -> int:
    return int(Chem.GetFormalCharge(self.mol))

  @property
  def multiplicity(self) -> int:
    return 1 + sum(a.GetNumRadicalElectrons() for a in self.mol.GetAtoms())

  def fail(self, reason: str, detail: str) -> MoleculeError:
    return MoleculeError(self.name, self.smiles, reason, detail)


def from_smiles(smiles: str, name: str = "") -> Molecule:
  """RDKit molecule with explicit hydrogens; raises MoleculeError if RDKit cannot parse it."""
  name = name or smiles
  with quiet_rdkit():
    mol = Chem.MolFromSmiles(smiles) if smiles.strip() else None
  if mol is None or mol.GetNumAtoms() == 0:
    raise MoleculeError(name, smiles, REASON_PARSE, f"RDKit cannot parse SMILES {smiles!r}")
  return Molecule(name, smiles, Chem.AddHs(mol), has_coordinates=False)


def from_structure(atomic_numbers: np.ndarray, positions: np.ndarray, charge: int = 0,
                   name: str = "") -> Molecule:
  """A 3D structure without a bond graph: bonds and orders perceived by RDKit (rdDetermineBonds)."""
  source = f"{len(atomic_numbers)} atoms, charge {charge}"
  try:
    with quiet_rdkit():
      mol = molecule_graph(np.asarray(atomic_numbers), np.asarray(positions), int(charge), None)
  except LevelError as e:
    raise MoleculeError(name, source, REASON_BONDS, str(e)) from e
  return Molecule(name, Chem.MolToSmiles(Chem.RemoveHs(mol, sanitize=False)), mol, has_coordinates=True)


def from_mol(mol: Chem.Mol, name: str = "") -> Molecule:
  """A sanitised RDKit molecule (e.g. from an SDF): hydrogens added (placed, if it has 3D coordinates)."""
  has_3d = mol.GetNumConformers() > 0 and mol.GetConformer().Is3D()
  name = name or (mol.GetProp("_Name") if mol.HasProp("_Name") else "")
  with quiet_rdkit():
    smiles = Chem.MolToSmiles(Chem.RemoveHs(mol, sanitize=False))
    mol = Chem.AddHs(mol, addCoords=has_3d)
  if not has_3d:
    mol.RemoveAllConformers()
  return Molecule(name or smiles, smiles, mol, has_coordinates=has_3d)


def read_smiles(smiles: Sequence[str]) -> list[Molecule | MoleculeError]:
  """`from_smiles` of each; a SMILES RDKit cannot parse becomes its MoleculeError."""
  return [_catch(lambda s=s: from_smiles(s)) for s in smiles]


def read_input(path: str | Path) -> list[Molecule | MoleculeError]:
  """The molecules of a .smi (`SMILES [name]` per line, # comments), .sdf or .xyz (extended XYZ:
  `charge`, `name` from the comment line) file; an entry that cannot be used is a MoleculeError.

  Raises:
    InputFileError: missing file, unknown suffix, or a file that cannot be parsed at all.
  """
  path = Path(path)
  if path.is_dir():
    raise InputFileError(f"{path}: is a directory; give a .smi, .sdf or .xyz file")
  if path.suffix.lower() not in INPUT_SUFFIXES:
    raise InputFileError(f"{path}: unknown input format {path.suffix!r}; expected one of {INPUT_SUFFIXES}")
  if not path.is_file():
    raise InputFileError(f"{path}: no such file")
  suffix = path.suffix.lower()
  if sniff.kind_of(path) in ("binary", "sqlite", "hdf5", "archive"):
    raise InputFileError(f"{path}: not a text {suffix} file ({sniff.describe(path).split(': try')[0]})")
  out: list[Molecule | MoleculeError] = []
  if suffix == ".smi":
    try:
      text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
      raise InputFileError(f"{path}: not a text .smi file (byte {e.start} is not UTF-8)") from None
    for line_no, line in enumerate(text.splitlines(), start=1):
      fields = line.split(maxsplit=1)
      if not fields or fields[0].startswith("#"):
        continue
      name = fields[1].strip() if len(fields) > 1 else f"{path.name}:{line_no}"
      out.append(_catch(lambda: from_smiles(fields[0], name)))
  elif suffix == ".sdf":
    with quiet_rdkit():
      supplier = Chem.SDMolSupplier(str(path), removeHs=False, sanitize=True)
      for i in range(len(supplier)):
        mol = supplier[i]
        name = f"{path.name}:{i + 1}"
        if mol is None:
          out.append(MoleculeError(name, str(path), REASON_PARSE, f"RDKit cannot read SDF entry {i + 1}"))
        else:
          out.append(from_mol(mol, mol.GetProp("_Name") if mol.GetProp("_Name").strip() else name))
  else:
    out = _read_xyz(path)
  return out


def _read_xyz(path: Path) -> list[Molecule | MoleculeError]:
  """Each frame of an (extended) XYZ file on its own: a frame that cannot be read (an unknown
  element, a malformed line, cut short) is a MoleculeError with its index and reason; the others
  are read."""
  out: list[Molecule | MoleculeError] = []
  lost = []
  try:
    frames = list(extxyz.split_frames(path, lambda where, reason, detail: lost.append(detail)))
  except ConversionError as e:
    raise InputFileError(f"{path}: cannot read as extended XYZ: {str(e).removeprefix(f'{path}: ')}") from None
  except UnicodeDecodeError as e:
    raise InputFileError(f"{path}: not a text .xyz file (byte {e.start} of a line is not UTF-8)") from None
  for i, _, frame in frames:
    name = f"{path.name}:{i + 1}"
    try:
      atoms = ase.io.read(io.StringIO(frame), format="extxyz")
    except KeyError as e:  # ase.symbols: unknown chemical symbol
      out.append(MoleculeError(name, str(path), REASON_PARSE, f"frame {i + 1}: unknown element symbol {e}"))
      continue
    except Exception as e:  # ase raises many types on a malformed frame  # pylint: disable=broad-except
      out.append(MoleculeError(name, str(path), REASON_PARSE, f"frame {i + 1}: cannot read as extended XYZ "
                                                               f"({type(e).__name__}: {e})"))
      continue
    name = str(atoms.info.get("name", name))
    out.append(_catch(lambda: from_structure(atoms.numbers, atoms.positions, int(atoms.info.get("charge", 0)),
                                             name)))
  for detail in lost:
    name = f"{path.name}:{len(out) + 1}"
    out.append(MoleculeError(name, str(path), REASON_PARSE, f"frame {len(out) + 1}: {detail}"))
  return out


def _catch(build) -> Molecule | MoleculeError:
  try:
    return build()
  except MoleculeError as e:
    return e


def _elements(z) -> str:
  return ", ".join(ase.data.chemical_symbols[int(a)] for a in sorted(set(int(a) for a in z)))


def unknown_elements(model: TrainedModel, atomic_numbers: np.ndarray, fidelity: str) -> str:
  """"" if every element has a fitted reference energy at `fidelity`, else what is missing. An
  element without one was absent from the run's training data: the model has never seen it."""
  known = ~np.isnan(model.reference.element_energy[model.reference.fidelities.index(fidelity)])
  z = np.asarray(atomic_numbers, dtype=np.int64)
  unknown = z[~known[z]]
  if not unknown.size:
    return ""
  return (f"element(s) {_elements(unknown)} not in the training data of {model.workdir} "
          f"(it knows {_elements(np.flatnonzero(known))})")


def size_problem(model: TrainedModel, n_atoms: int, n_edges: int | None = None) -> str:
  """"" if a molecule of this size fits the run's largest shape bucket, else why not (edges
  unknown before embedding with a radius cutoff: pass None to check the atom count only)."""
  top = model.buckets.largest
  if n_atoms > top.n_node - 1 or (n_edges or 0) > top.n_edge:
    edges = "" if n_edges is None else f" / {n_edges} edges"
    message = (f"{n_atoms} atoms{edges}; the largest shape bucket of {model.workdir} holds "
               f"{top.n_node - 1} atoms / {top.n_edge} edges")
    if model.config.data.cutoff is None:
      limit = max_atoms_all_pairs(top.n_node - 1, top.n_edge)
      message += (f" (this model has no cutoff: its edges are all n(n-1) atom pairs, so about {limit} "
                  "atoms at most fit)")
    else:
      message += f" (edges are the atom pairs within {model.config.data.cutoff} Å)"
    return message
  return ""


def max_atoms_all_pairs(max_nodes: int, max_edges: int) -> int:
  """The largest n with n <= max_nodes and n(n-1) <= max_edges."""
  n = min(max_nodes, int((1 + (1 + 4 * max_edges) ** 0.5) / 2))
  while n > 0 and n * (n - 1) > max_edges:
    n -= 1
  return n


def training_coverage(model: TrainedModel) -> dict[str, list[int]]:
  """{"charges", "multiplicities"} of the run's training data, from its checkpoint's meta
  (`consist.train`); a checkpoint that does not record it is taken as neutral and closed-shell."""
  key = (str(Path(model.workdir).resolve()), model.step)
  if key not in _COVERAGE:
    with checkpoint.Checkpointer(model.workdir, read_only=True) as ckpt:
      meta = ckpt.meta(model.step)
    _COVERAGE[key] = dict(meta.get("coverage") or DEFAULT_COVERAGE)
  return _COVERAGE[key]


_COVERAGE: dict[tuple[str, int], dict[str, list[int]]] = {}


def coverage_problem(model: TrainedModel, charge: int, multiplicity: int) -> str:
  """"" if the training data had this charge and multiplicity, else what it had."""
  coverage = training_coverage(model)
  if charge in coverage["charges"] and multiplicity in coverage["multiplicities"]:
    return ""
  what = "a radical" if multiplicity > 1 and charge == 0 else "an ion" if multiplicity == 1 else "a charged radical"
  return (f"charge {charge:+d}, multiplicity {multiplicity} ({what}); the training data of {model.workdir} "
          f"has charges {coverage['charges']} and multiplicities {coverage['multiplicities']} only, so its "
          "structures would be guesses")


def check_supported(model: TrainedModel, molecule: Molecule, fidelity: str,
                    record: MoleculeRecord | None = None) -> None:
  """Raises MoleculeError for unknown elements or a molecule no bucket holds (edges too, given its
  record; without one, the atom count and, for all-pairs graphs, the edge count)."""
  problem = unknown_elements(model, molecule.atomic_numbers, fidelity)
  if problem:
    raise molecule.fail(REASON_ELEMENT, problem)
  problem = coverage_problem(model, molecule.charge, molecule.multiplicity)
  if problem:
    raise molecule.fail(REASON_CHARGE, problem)
  n = molecule.mol.GetNumAtoms()
  cutoff = model.config.data.cutoff
  if record is not None:
    n_edges = count_edges(record, cutoff)
  else:
    n_edges = n * (n - 1) if cutoff is None else None
  problem = size_problem(model, n, n_edges)
  if problem:
    raise molecule.fail(REASON_SIZE, problem)


def start_positions(molecule: Molecule, mode: str, seed: int) -> np.ndarray:
  """float64 [n, 3] Å: the input structure if given, else seeded ETKDGv3 (random-coordinate
  fallback), relaxed with MMFF94 in refine mode. In denoise / ddim mode the sampler starts from the
  prior; these positions only define a radius graph's edges (runs with a cutoff)."""
  if molecule.has_coordinates:
    return molecule.mol.GetConformer(0).GetPositions()
  mol = Chem.Mol(molecule.mol)
  params = rdDistGeom.ETKDGv3()
  params.randomSeed = molecule.seed(seed)
  with quiet_rdkit():
    ok = rdDistGeom.EmbedMolecule(mol, params) == 0
    if not ok:
      params.useRandomCoords = True
      ok = rdDistGeom.EmbedMolecule(mol, params) == 0
  if not ok:
    raise molecule.fail(REASON_EMBED, f"ETKDGv3 (seed {params.randomSeed}) found no conformer")
  positions = mol.GetConformer().GetPositions()
  if mode != "refine":
    return positions
  try:
    relaxed = get_level("mmff94").relax(molecule.atomic_numbers, positions, molecule.charge,
                                        molecule.multiplicity, bonds=molecule.mol, fmax=MMFF_FMAX,
                                        max_steps=MMFF_MAX_STEPS)
  except LevelError as e:
    raise molecule.fail(REASON_MMFF, str(e)) from e
  return relaxed.positions


def to_record(molecule: Molecule, positions: np.ndarray, fidelity: str) -> MoleculeRecord:
  """The record the model takes (no labels; energies reported at `fidelity`)."""
  bonds, orders = bonds_of(molecule.mol)
  record = MoleculeRecord(mol_id=molecule.name, atomic_numbers=molecule.atomic_numbers,
                          positions=np.asarray(positions, dtype=np.float64), charge=molecule.charge,
                          multiplicity=molecule.multiplicity, smiles=molecule.smiles, bonds=bonds,
                          bond_orders=orders, label_fidelity=fidelity)
  try:
    return record.validate(molecule.name)
  except RecordError as e:
    raise molecule.fail(REASON_PARSE, str(e)) from e


def sample_per_molecule(model: TrainedModel, prepared: Sequence[tuple[Molecule, MoleculeRecord]],
                        sampling, progress=None) -> list[np.ndarray]:
  """K structures [K, n, 3] (Å) per (molecule, record), in one batched pass; each molecule's noise
  comes from its own seed (`Molecule.seed(sampling.seed)`, from its canonical SMILES), so its
  structures do not depend on the other inputs or on its position among them."""
  return model.sample([r for _, r in prepared], sampling, progress=progress,
                      seeds=[molecule.seed(sampling.seed) for molecule, _ in prepared])

"""Batched structure prediction for many molecules, past the ones that cannot be predicted.

Per molecule: checks against the run (elements with a fitted reference energy, fits a shape bucket)
-> start structure (input coordinates, or seeded ETKDG, + MMFF94 in refine mode) -> record. Then in
chunks of molecules: K structures each from `TrainedModel.sample` (batched through the run's shape
buckets) and their model energies and forces; optionally each structure relaxed on the learned
energy with ASE BFGS through `ConsistCalculator`. A molecule that fails any step is reported with
its reason and skipped; the others are still predicted.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Sequence, TextIO

import ase
import ase.optimize
import numpy as np

from consist.calculator import ConsistCalculator
from consist.inference import Sampling, TrainedModel
from consist.predict import molecules, writers
from consist.predict.molecules import Molecule, MoleculeError
from consist.predict.writers import Structure

REASON_NONFINITE = "non-finite prediction"
# Atoms closer than this (Å) in a predicted structure are flagged in the summary (the shortest bond,
# H2, is 0.74 Å): a sign of an undertrained structure model, not a chemical structure.
OVERLAP_DISTANCE = 0.5


class Progress:
  """A one-line progress bar with rate and ETA (a line per 10% when the stream is not a terminal)."""

  def __init__(self, label: str, total: int, stream: TextIO | None = None):
    self.label, self.total, self.done = label, total, 0
    self._stream = stream or sys.stderr
    self._tty = hasattr(self._stream, "isatty") and self._stream.isatty()
    self._start = time.perf_counter()
    self._last_decile = -1

  def update(self, n: int = 1) -> None:
    self.done += n
    frac = self.done / max(self.total, 1)
    decile = int(10 * frac)
    if not self._tty and decile == self._last_decile and self.done < self.total:
      return
    self._last_decile = decile
    elapsed = time.perf_counter() - self._start
    rate = self.done / elapsed if elapsed > 0 else math.nan
    eta = (self.total - self.done) / rate if rate > 0 else math.nan
    bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
    line = f"{self.label} {self.done}/{self.total} [{bar}] {100 * frac:3.0f}% {rate:.1f}/s ETA {eta:.0f}s"
    self._stream.write(("\r" + line + ("\n" if self.done >= self.total else "")) if self._tty else line + "\n")
    self._stream.flush()


@dataclasses.dataclass
class Report:
  """Outcome of one prediction: structures in input order, failures with reasons."""

  structures: list[Structure]
  failures: list[MoleculeError]
  n_input: int
  sampling: Sampling
  relax_unconverged: int = 0
  seconds: float = 0.0
  n_overlapping: int = 0
  out: Path | None = None

  @property
  def n_predicted(self) -> int:
    return len({id(s.molecule) for s in self.structures})

  def summary(self) -> str:
    s = self.sampling
    head = (f"predicted {self.n_predicted} of {self.n_input} molecules ({s.samples} structure(s) each, "
            f"mode {s.mode}) in {self.seconds:.1f} s" + (f" -> {self.out}" if self.out else ""))
    lines = [head]
    if self.n_overlapping:
      lines.append(f"warning: {self.n_overlapping} structure(s) have atoms closer than {OVERLAP_DISTANCE} Å")
    if self.relax_unconverged:
      lines.append(f"{self.relax_unconverged} relaxation(s) stopped before fmax (see max_force in the output)")
    if self.failures:
      counts = collections.Counter(f.reason for f in self.failures)
      lines.append(f"{len(self.failures)} molecule(s) not predicted: "
                   + ", ".join(f"{n} {reason}" for reason, n in counts.most_common()))
      lines += [f"  {f.name}{'' if f.source == f.name else f' ({f.source})'}: {f.reason}: {f.detail}"
                for f in self.failures]
    return "\n".join(lines)


def _prepare(model: TrainedModel, molecule: Molecule, sampling: Sampling, fidelity: str):
  molecules.check_supported(model, molecule, fidelity)
  positions = molecules.start_positions(molecule, sampling.mode, sampling.seed)
  record = molecules.to_record(molecule, positions, fidelity)
  molecules.check_supported(model, molecule, fidelity, record)
  return record


def _relax(model: TrainedModel, structure: Structure, record, fmax: float, steps: int) -> tuple[Structure, bool]:
  atoms = ase.Atoms(numbers=record.atomic_numbers, positions=structure.positions)
  atoms.calc = ConsistCalculator(model, bonds=record.bonds, bond_orders=record.bond_orders,
                                 charge=record.charge, fidelity=record.label_fidelity)
  converged = bool(ase.optimize.BFGS(atoms, logfile=None, maxstep=0.1).run(fmax=fmax, steps=steps))
  return dataclasses.replace(structure, positions=np.array(atoms.positions), energy=atoms.get_potential_energy(),
                             forces=np.array(atoms.get_forces()), relaxed=True), converged


def predict(model: TrainedModel, inputs: Sequence[Molecule | MoleculeError], sampling: Sampling, *,
            relax: bool = False, fmax: float = 0.05, relax_steps: int = 500, chunk: int = 64,
            stream: TextIO | None = None) -> Report:
  """K structures (with model energies, eV, at the run's first fidelity) per input molecule.

  Args:
    model: the trained model.
    inputs: molecules, or the errors of inputs that could not be read (reported as failures).
    sampling: generation settings; chunk c samples with a seed derived from (sampling.seed, c).
    relax: polish every structure with ASE BFGS on the learned energy to `fmax` eV/Å (at most
      `relax_steps` steps).
    chunk: molecules per `TrainedModel.sample` call (the progress bar's step).
    stream: progress output (default stderr).
  """
  start = time.perf_counter()
  fidelity = model.fidelities[0]
  failures: list[MoleculeError] = []
  ready: list[tuple[Molecule, object]] = []
  bar = Progress("prepare", len(inputs), stream)
  for item in inputs:
    try:
      if isinstance(item, MoleculeError):
        raise item
      ready.append((item, _prepare(model, item, sampling, fidelity)))
    except MoleculeError as e:
      failures.append(e)
    bar.update()

  structures: list[Structure] = []
  sources = []  # the record of each structure (bond graph, charge) for relaxation
  bar = Progress("sample", len(ready), stream)
  for c in range(0, len(ready), chunk):
    part = ready[c:c + chunk]
    seed = int(np.random.SeedSequence([sampling.seed, c // chunk]).generate_state(1)[0] >> 1)
    samples = model.sample([r for _, r in part], dataclasses.replace(sampling, seed=seed))
    candidates = []
    for (molecule, record), positions in zip(part, samples):
      if not np.isfinite(positions).all():
        failures.append(molecule.fail(REASON_NONFINITE, "the model returned NaN/inf coordinates"))
        continue
      candidates += [(molecule, record, k, p) for k, p in enumerate(positions)]
    results = model.energy_and_forces([r.replace(positions=p) for _, r, _, p in candidates]) if candidates else []
    for (molecule, record, k, p), (energy, forces) in zip(candidates, results):
      structures.append(Structure(molecule, k, p, energy, forces, sampling.mode, relaxed=False))
      sources.append(record)
    bar.update(len(part))

  unconverged = 0
  if relax:
    bar = Progress("relax", len(structures), stream)
    for i, (structure, record) in enumerate(zip(structures, sources)):
      structures[i], converged = _relax(model, structure, record, fmax, relax_steps)
      unconverged += not converged
      bar.update()
  overlapping = sum(_min_distance(s.positions) < OVERLAP_DISTANCE for s in structures)
  return Report(structures, failures, len(inputs), sampling, unconverged, time.perf_counter() - start,
                overlapping)


def _min_distance(positions: np.ndarray) -> float:
  """Smallest interatomic distance, Å (inf for one atom)."""
  d = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
  d[np.diag_indices(len(d))] = np.inf
  return float(d.min())


def predict_to_file(model: TrainedModel, inputs: Sequence[Molecule | MoleculeError], out: str | Path,
                    sampling: Sampling, **kwargs) -> Report:
  """`predict`, then the structures written to `out` (.sdf / .xyz) atomically, if there are any."""
  out = writers.check_output_path(out)
  report = predict(model, inputs, sampling, **kwargs)
  if report.structures:
    report.out = writers.write_structures(out, report.structures)
  return report

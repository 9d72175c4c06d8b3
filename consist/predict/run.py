"""Batched structure prediction for many molecules, past the ones that cannot be predicted.

Per molecule: checks against the run (elements with a fitted reference energy, fits a shape bucket)
-> start structure (input coordinates, or seeded ETKDG, + MMFF94 in refine mode; in parallel
processes when many molecules need one) -> record. Then K structures per molecule from
`TrainedModel.sample` and their model energies and forces, or, with `relax`, each structure relaxed
on the learned energy (`consist.relax`, BFGS): both batched through the run's shape buckets, one
compilation per bucket. A molecule that fails any step is reported with its reason and skipped; the
others are still predicted.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import multiprocessing
import os
import time
from pathlib import Path
from typing import Sequence, TextIO

import numpy as np

from consist.inference import Sampling, TrainedModel
from consist.relax import RelaxSettings
from consist.predict import molecules, writers
from consist.predict.molecules import Molecule, MoleculeError
from consist.predict.writers import Structure
from consist.progress import Progress

REASON_NONFINITE = "non-finite prediction"
# Atoms closer than this (Å) in a predicted structure are flagged in the summary (the shortest bond,
# H2, is 0.74 Å): a sign of an undertrained structure model, not a chemical structure.
OVERLAP_DISTANCE = 0.5


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


# Start structures are built in worker processes when at least this many molecules need an RDKit
# embedding (a process start costs about a second; ETKDG + MMFF94 ~20-50 ms per small molecule).
PARALLEL_STARTS = 64


def _start(args: tuple[Molecule, str, int]) -> np.ndarray | tuple[str, str]:
  """Worker: start positions [n, 3] (Å), or (reason, detail) of the MoleculeError (which does not
  pickle)."""
  molecule, mode, seed = args
  try:
    return molecules.start_positions(molecule, mode, seed)
  except MoleculeError as e:
    return e.reason, e.detail


def _start_positions(todo: Sequence[Molecule], sampling: Sampling, workers: int, bar: "Progress"):
  """Start positions or (reason, detail) per molecule, in order; RDKit work in `workers` spawned
  processes (spawn: the parent holds JAX's threads, which fork would copy in an unsafe state)."""
  jobs = [(m, sampling.mode, sampling.seed) for m in todo]
  if workers <= 1:
    for job in jobs:
      result = _start(job)
      bar.update()
      yield result
    return
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
    for result in pool.map(_start, jobs, chunksize=4):
      bar.update()
      yield result


def _prepare(model: TrainedModel, items: Sequence[Molecule | MoleculeError], sampling: Sampling, fidelity: str,
             workers: int, stream: TextIO | None) -> tuple[list[tuple[Molecule, object]], list[MoleculeError]]:
  """(molecule, record) of every input that can be predicted, and the failures, in input order."""
  failures: list[tuple[int, MoleculeError]] = []
  checked: list[tuple[int, Molecule]] = []
  for i, item in enumerate(items):
    try:
      if isinstance(item, MoleculeError):
        raise item
      molecules.check_supported(model, item, fidelity)
      checked.append((i, item))
    except MoleculeError as e:
      failures.append((i, e))
  needs_rdkit = sum(not m.has_coordinates for _, m in checked)
  workers = min(workers, os.cpu_count() or 1) if needs_rdkit >= PARALLEL_STARTS else 1
  bar = Progress("prepare", len(items), stream=stream)
  bar.update(len(items) - len(checked))
  ready = []
  for (i, molecule), start in zip(checked, _start_positions([m for _, m in checked], sampling, workers, bar)):
    try:
      if isinstance(start, tuple):
        raise molecule.fail(*start)
      record = molecules.to_record(molecule, start, fidelity)
      molecules.check_supported(model, molecule, fidelity, record)
      ready.append((molecule, record))
    except MoleculeError as e:
      failures.append((i, e))
  return ready, [e for _, e in sorted(failures, key=lambda x: x[0])]


def predict(model: TrainedModel, inputs: Sequence[Molecule | MoleculeError], sampling: Sampling, *,
            relax: bool = False, fmax: float = 0.05, relax_steps: int = 500, workers: int = 2,
            stream: TextIO | None = None) -> Report:
  """K structures (with model energies, eV, at the run's first fidelity) per input molecule.

  Args:
    model: the trained model.
    inputs: molecules, or the errors of inputs that could not be read (reported as failures).
    sampling: generation settings (each molecule samples from its own seed: (seed, canonical SMILES)).
    relax: polish every structure on the learned energy (`consist.relax` BFGS, batched) to `fmax`
      eV/Å, at most `relax_steps` steps; structures that stop at the limit are counted in the report.
    workers: processes for the RDKit start structures when many molecules need one.
    stream: progress output (default stderr).
  """
  start = time.perf_counter()
  fidelity = model.fidelities[0]
  ready, failures = _prepare(model, inputs, sampling, fidelity, workers, stream)

  bar = Progress("sample", len(ready), stream=stream)
  samples = (molecules.sample_per_molecule(model, ready, sampling,
                                           progress=lambda done, _: bar.update(done - bar.done))
             if ready else [])
  candidates = []
  for (molecule, record), positions in zip(ready, samples):
    if not np.isfinite(positions).all():
      failures.append(molecule.fail(REASON_NONFINITE, "the model returned NaN/inf coordinates"))
      continue
    candidates += [(molecule, record.replace(positions=p), k) for k, p in enumerate(positions)]
  structures: list[Structure] = []
  unconverged = 0
  if relax:
    bar = Progress("relax", len(candidates), stream=stream)
    results = model.relax([r for _, r, _ in candidates], RelaxSettings(fmax=fmax, max_steps=relax_steps),
                          progress=lambda done, _: bar.update(done - bar.done))
    for (molecule, _, k), r in zip(candidates, results):
      structures.append(Structure(molecule, k, r.positions, r.energy, r.forces, sampling.mode, relaxed=True))
      unconverged += not r.converged
  else:
    results = model.energy_and_forces([r for _, r, _ in candidates]) if candidates else []
    for (molecule, record, k), (energy, forces) in zip(candidates, results):
      structures.append(Structure(molecule, k, record.positions, energy, forces, sampling.mode, relaxed=False))
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

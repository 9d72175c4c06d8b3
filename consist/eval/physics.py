"""Physics of predicted structures at the accurate level, and model-side diagnostics (BRIEF 5).

Accurate level (through `consist.levels`, the interface that built the data):
  energy_gap = E_acc(R_pred) - E_acc(R_ref_min)           eV    (< 0: R_pred found a lower minimum)
  force_rms  = sqrt(mean over atoms and xyz of F_acc^2)    eV/Å  (component RMS at R_pred)
  force_max  = max over atoms of |F_acc,i|                 eV/Å  (the `fmax` of a relaxation)
Model side (arrays in, no model code here):
  egap_phi = E_phi(R_pred) - E_phi(R_ref); a value below 0 means the model scores the prediction
  below the reference minimum (the optimality loss exploiting the energy model).
  `force_diagnostic`: the energy head's force error at the cheap structures against the accurate
  forces there, beside their RMS (= the RMSE of predicting zero): can consistency help at all?

Accurate evaluations run in a pool of spawned processes with OMP_NUM_THREADS=1 set before tblite /
PySCF load (BRIEF section 4: oversubscribed OpenMP made single points ~200x slower). A molecule or
sample that fails is reported with its reason and NaN values; the evaluation never aborts.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import multiprocessing
import os
from typing import Callable, Iterator, Sequence

import numpy as np

from consist.data.record import MoleculeRecord
from consist.eval import structure
from consist.levels import Level, get_level

ACCURATE_METRICS = ("energy_gap", "force_rms", "force_max")
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@dataclasses.dataclass(frozen=True)
class AccurateJob:
  """One molecule to evaluate: K predicted structures and the accurate-level reference minimum.

  pred_positions float [K, n, 3] Å; ref_positions float [n, 3] Å; ref_energy E_acc(ref) in eV or
  None (then computed); bonds int [b, 2] or None (only force fields use it).
  """

  mol_id: str
  atomic_numbers: np.ndarray
  pred_positions: np.ndarray
  ref_positions: np.ndarray
  ref_energy: float | None = None
  charge: int = 0
  multiplicity: int = 1
  bonds: np.ndarray | None = None

  @classmethod
  def from_record(cls, record: MoleculeRecord, pred_positions: np.ndarray,
                  level_name: str) -> "AccurateJob":
    """A job against the record's reference minimum; its `ref_energy` is reused if the record's
    `ref_fidelity` is `level_name` (else it is recomputed at that level)."""
    if record.ref_positions is None:
      raise ValueError(f"record {record.mol_id!r} has no reference minimum (ref_positions)")
    pred = np.asarray(pred_positions, dtype=np.float64)
    pred = pred[None] if pred.ndim == 2 else pred
    if pred.shape[1:] != (record.n_atoms, 3):
      raise ValueError(f"record {record.mol_id!r}: predictions of shape {pred.shape} for "
                       f"{record.n_atoms} atoms")
    same_level = record.ref_fidelity.lower() == level_name.lower()
    return cls(mol_id=record.mol_id, atomic_numbers=np.asarray(record.atomic_numbers),
               pred_positions=pred, ref_positions=np.asarray(record.ref_positions, np.float64),
               ref_energy=record.ref_energy if same_level else None, charge=record.charge,
               multiplicity=record.multiplicity, bonds=record.bonds)


@dataclasses.dataclass(frozen=True)
class AccurateResult:
  """Per-sample accurate-level metrics [K] (NaN where a sample failed) and the failure reasons."""

  mol_id: str
  energy_gap: np.ndarray
  force_rms: np.ndarray
  force_max: np.ndarray
  ref_energy: float
  failures: tuple[str, ...] = ()

  def metrics(self) -> dict[str, float]:
    """`<metric>_mean` / `<metric>_min` over the successful samples (NaN if none succeeded)."""
    return structure.aggregate_samples({k: getattr(self, k) for k in ACCURATE_METRICS})


def _reason(err: Exception) -> str:
  kind = getattr(err, "reason", type(err).__name__)
  return f"{kind}: {err}"


def evaluate_job(level: Level, job: AccurateJob) -> AccurateResult:
  """Accurate-level metrics of one molecule in this process; failures are caught and reported."""
  k = job.pred_positions.shape[0]
  gap, rms, fmax = np.full(k, np.nan), np.full(k, np.nan), np.full(k, np.nan)
  failures = []
  args = dict(charge=job.charge, multiplicity=job.multiplicity, bonds=job.bonds)
  ref_energy = job.ref_energy
  if ref_energy is None:
    try:
      ref_energy, _ = level.energy_forces(job.atomic_numbers, job.ref_positions, **args)
    except Exception as e:  # pylint: disable=broad-except (reported, never aborts the evaluation)
      failures.append(f"reference: {_reason(e)}")
      return AccurateResult(job.mol_id, gap, rms, fmax, float("nan"), tuple(failures))
  for s in range(k):
    try:
      energy, forces = level.energy_forces(job.atomic_numbers, job.pred_positions[s], **args)
    except Exception as e:  # pylint: disable=broad-except
      failures.append(f"sample {s}: {_reason(e)}")
      continue
    gap[s] = energy - ref_energy
    rms[s] = np.sqrt(np.mean(forces ** 2))
    fmax[s] = np.linalg.norm(forces, axis=1).max()
  return AccurateResult(job.mol_id, gap, rms, fmax, float(ref_energy), tuple(failures))


@contextlib.contextmanager
def single_threaded_env() -> Iterator[None]:
  """OMP/BLAS thread counts of 1 in os.environ while worker processes are spawned (they copy it)."""
  saved = {v: os.environ.get(v) for v in _THREAD_VARS}
  os.environ.update({v: "1" for v in _THREAD_VARS})
  try:
    yield
  finally:
    for v, old in saved.items():
      if old is None:
        os.environ.pop(v, None)
      else:
        os.environ[v] = old


_WORKER_LEVEL: Level | None = None


def _init_worker(level: Level) -> None:
  global _WORKER_LEVEL
  _WORKER_LEVEL = level


def _worker_job(job: AccurateJob) -> AccurateResult:
  return evaluate_job(_WORKER_LEVEL, job)


def evaluate_accurate(jobs: Sequence[AccurateJob], level: Level | str, *, workers: int = 2,
                      progress: Callable[[int, int], None] | None = None) -> list[AccurateResult]:
  """Accurate-level metrics of every job, in input order.

  Args:
    jobs: molecules with their predictions.
    level: a `consist.levels.Level` or its name ("gfn2-xtb").
    workers: spawned worker processes (OMP_NUM_THREADS=1 each); 0 runs in this process, whose
      thread settings are then the caller's.
    progress: called as progress(done, total) after each molecule.
  """
  level = get_level(level) if isinstance(level, str) else level
  results: list[AccurateResult | None] = [None] * len(jobs)
  done = 0

  def finish(i: int, result: AccurateResult) -> None:
    nonlocal done
    results[i] = result
    done += 1
    if progress is not None:
      progress(done, len(jobs))

  if workers <= 0:
    for i, job in enumerate(jobs):
      finish(i, evaluate_job(level, job))
    return results
  with single_threaded_env():
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker, initargs=(level,))
  with pool:
    futures = {pool.submit(_worker_job, job): i for i, job in enumerate(jobs)}
    for future in concurrent.futures.as_completed(futures):
      i = futures[future]
      try:
        result = future.result()
      except Exception as e:  # pylint: disable=broad-except (a worker died: report, go on)
        k = jobs[i].pred_positions.shape[0]
        nan = np.full(k, np.nan)
        result = AccurateResult(jobs[i].mol_id, nan, nan, nan, float("nan"),
                                (f"worker process failed: {type(e).__name__}: {e}",))
      finish(i, result)
  return results


def model_energy_metrics(e_phi_pred: np.ndarray, e_phi_ref: float) -> dict[str, float]:
  """Model diagnostic of one molecule from model energies (eV): e_phi_pred [K] at the predictions,
  e_phi_ref at the reference minimum.

  Returns egap_phi_mean / egap_phi_min (E_phi(R_pred) - E_phi(R_ref)), below_ref_frac (fraction of
  samples the model scores below the reference minimum), e_phi_pred_mean and e_phi_ref.
  """
  e = np.atleast_1d(np.asarray(e_phi_pred, dtype=np.float64))
  gap = e - float(e_phi_ref)
  out = structure.aggregate_samples({"egap_phi": gap})
  finite = gap[np.isfinite(gap)]
  out["below_ref_frac"] = float(np.mean(finite < 0)) if finite.size else float("nan")
  out["e_phi_pred_mean"] = float(np.mean(e[np.isfinite(e)])) if finite.size else float("nan")
  out["e_phi_ref"] = float(e_phi_ref)
  return out


@dataclasses.dataclass(frozen=True)
class ForceDiagnostic:
  """Model forces against accurate forces at the cheap structures (eV/Å, per force component).

  rmse / mae: model error pooled over all atoms; rms_accurate: RMS of the accurate forces (the
  RMSE of predicting zero); fraction_explained = 1 - MSE_err / MSE_acc (1 = exact, 0 = no better
  than zero forces, < 0 worse). per_molecule: the same four quantities [M] (NaN for skipped
  molecules); n_skipped: molecules left out for non-finite forces.
  """

  rmse: float
  mae: float
  rms_accurate: float
  fraction_explained: float
  n_molecules: int
  n_atoms: int
  n_skipped: int
  per_molecule: dict[str, np.ndarray]

  def to_json(self) -> dict:
    out = {k: getattr(self, k) for k in ("rmse", "mae", "rms_accurate", "fraction_explained",
                                         "n_molecules", "n_atoms", "n_skipped")}
    out["per_molecule"] = {k: [None if not np.isfinite(x) else float(x) for x in v]
                           for k, v in self.per_molecule.items()}
    return out


def force_diagnostic(model_forces: Sequence[np.ndarray],
                     accurate_forces: Sequence[np.ndarray]) -> ForceDiagnostic:
  """Can consistency help? Model forces [n_m, 3] vs accurate forces [n_m, 3] per molecule m."""
  if len(model_forces) != len(accurate_forces):
    raise ValueError(f"{len(model_forces)} model force arrays for {len(accurate_forces)} molecules")
  per = {k: np.full(len(model_forces), np.nan)
         for k in ("rmse", "mae", "rms_accurate", "fraction_explained")}
  sq_err = abs_err = sq_acc = 0.0
  n_comp = n_atoms = n_mol = 0
  for m, (fm, fa) in enumerate(zip(model_forces, accurate_forces)):
    fm, fa = np.asarray(fm, np.float64), np.asarray(fa, np.float64)
    if fm.shape != fa.shape or fa.ndim != 2 or fa.shape[1] != 3:
      raise ValueError(f"molecule {m}: model forces {fm.shape} vs accurate forces {fa.shape}")
    if not (np.isfinite(fm).all() and np.isfinite(fa).all()):
      continue
    err = fm - fa
    mse, mse_acc = np.mean(err ** 2), np.mean(fa ** 2)
    per["rmse"][m], per["rms_accurate"][m] = np.sqrt(mse), np.sqrt(mse_acc)
    per["mae"][m] = np.mean(np.abs(err))
    per["fraction_explained"][m] = 1.0 - mse / mse_acc if mse_acc > 0 else np.nan
    sq_err += np.sum(err ** 2)
    abs_err += np.sum(np.abs(err))
    sq_acc += np.sum(fa ** 2)
    n_comp, n_atoms, n_mol = n_comp + err.size, n_atoms + fa.shape[0], n_mol + 1
  if n_comp == 0:
    raise ValueError("no molecule with finite model and accurate forces")
  return ForceDiagnostic(
      rmse=float(np.sqrt(sq_err / n_comp)), mae=float(abs_err / n_comp),
      rms_accurate=float(np.sqrt(sq_acc / n_comp)),
      fraction_explained=float(1.0 - sq_err / sq_acc) if sq_acc > 0 else float("nan"),
      n_molecules=n_mol, n_atoms=n_atoms, n_skipped=len(model_forces) - n_mol, per_molecule=per)

"""Evaluation of a trained model and of the baselines on the molecules of one split (BRIEF 5).

  result = evaluate(workdir, data, "test", Sampling(mode="refine", samples=4), EvalSettings())

Molecules: one record per mol_id, the equilibrium record (the cheap-level minimum) that carries the
accurate-level reference minimum `ref_positions` (`evaluation_records`).

Per-molecule metrics (lists [M] in molecule order; NaN where a molecule failed, its reasons listed
under `failures`), of K structures per molecule:
  structure  rmsd, rmsd_heavy, rmsd_sym, rmsd_heavy_sym, bond_mae, dmae (Å), each `_mean` and `_min`
             over the K samples (`consist.eval.structure`);
  accurate   energy_gap = E_acc(R_pred) - E_acc(R_ref) (eV), force_rms and force_max of the accurate
             forces at R_pred (eV/Å), `_mean` / `_min` (`consist.eval.physics`), over the samples
             that are not broken (`geometry_broken`: atoms < 0.5 Å apart or a bond > 3 Å; NaN if all
             are); broken_frac: the fraction of broken samples; valid_frac: the fraction whose
             bonds perceived from the coordinates alone (RDKit DetermineConnectivity) are exactly
             the molecular graph;
  model      (scored with a model) egap_phi_mean / _min = E_phi(R_pred) - E_phi(R_ref) (eV),
             below_ref_frac, e_phi_pred_mean, e_phi_ref, and model_force_rmse: the energy head's
             force RMSE (per component, eV/Å) at the cheap structure against the accurate forces
             there (the record's force labels). The RMS of those accurate forces is the "cheap"
             baseline's force_rms_mean; `force_diagnostic` pools both over the split.
Baselines (one structure per molecule, no model): "cheap", the record's own positions; "etkdg",
RDKit ETKDGv3 embedding without any relaxation, built from the record's atoms and bond graph (atom
order kept; stereo centres and double bonds assigned from the cheap structure so the same
stereoisomer is embedded), seeded per molecule by (seed, mol_id). With a model: "relax", the cheap
structure relaxed on the learned energy (`consist.relax` BFGS, batched; BRIEF 3: the baseline refine
mode has to beat), with per-molecule relax_steps, relax_fmax (eV/Å) and relax_converged metrics,
molecules stopped at the step limit listed under failures, and its wall time.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from rdkit import Chem
from rdkit.Chem import AllChem

from consist.data.record import MoleculeRecord
from consist.data.store import Store, open_dataset
from consist.eval import physics, structure
from consist.inference import Sampling, TrainedModel
from consist.levels import check_level_name, mmff
from consist.progress import Progress
from consist.relax import RelaxSettings

BASELINES = ("cheap", "etkdg")
MODEL_BASELINES = ("relax",)  # need the trained model
# A predicted structure with atoms closer than MIN_DISTANCE or a bond longer than MAX_BOND (Å) is
# "broken" (covalent bonds of organic molecules stay below ~2.2 Å; 0.5 Å is below any bond).
MIN_DISTANCE, MAX_BOND = 0.5, 3.0
MODEL_METRICS = ("egap_phi_mean", "egap_phi_min", "below_ref_frac", "e_phi_pred_mean", "e_phi_ref",
                 "model_force_rmse")


class EvaluationError(ValueError):
  """Bad evaluation input; the message names the workdir, dataset or split at fault."""


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """How predictions are scored.

  Attributes:
    level: accurate level of theory (`consist.levels.get_level` name) of the energy gap / forces.
    workers: processes for the accurate level (OMP_NUM_THREADS=1 each); 0 = in this process.
    max_molecules: evaluate an evenly spaced subset of this many molecules (0 = all).
    etkdg_seed: seed of the ETKDG baseline.
  """

  level: str = "gfn2-xtb"
  workers: int = 2
  max_molecules: int = 0
  etkdg_seed: int = 0

  def __post_init__(self):
    try:
      check_level_name(self.level)
    except ValueError as e:
      raise ValueError(f"level: {e}") from None
    if self.workers < 0 or self.max_molecules < 0:
      raise ValueError(f"workers and max_molecules must be >= 0, got {self.workers}, "
                       f"{self.max_molecules}")


# --------------------------------------------------------------------------------------- molecules


def evaluation_records(store: Store, *, where: str, max_molecules: int = 0) -> list[MoleculeRecord]:
  """One record per mol_id: the equilibrium record with a reference minimum, in split order.

  max_molecules > 0 keeps an evenly spaced subset. Raises EvaluationError (naming `where`) if the
  split has no such record.
  """
  chosen: dict[str, MoleculeRecord] = {}
  for i in range(len(store)):
    record = store[i]
    if record.is_equilibrium and record.ref_positions is not None and record.mol_id not in chosen:
      chosen[record.mol_id] = record
  if not chosen:
    raise EvaluationError(f"{where}: no equilibrium record with a reference minimum (ref_positions) "
                          f"among its {len(store)} records; evaluate a val/test split built with "
                          "reference minima")
  records = list(chosen.values())
  if max_molecules and max_molecules < len(records):
    keep = np.unique(np.linspace(0, len(records) - 1, max_molecules).round().astype(np.int64))
    records = [records[i] for i in keep]
  return records


def etkdg_structure(record: MoleculeRecord, seed: int) -> np.ndarray:
  """RDKit ETKDGv3 embedding [n, 3] (Å, no relaxation) of the record's molecule, atom order kept.

  Raises ValueError naming the molecule if its graph cannot be perceived or embedding fails.
  """
  where = f"etkdg: mol_id={record.mol_id!r}"
  if record.bonds is None:
    raise ValueError(f"{where}: the record has no bond graph")
  try:
    mol = mmff.molecule_graph(record.atomic_numbers, record.positions, record.charge, record.bonds)
  except Exception as e:  # pylint: disable=broad-except (LevelError or RDKit's own errors)
    raise ValueError(f"{where}: {e}") from e
  Chem.AssignStereochemistryFrom3D(mol)
  mol.RemoveAllConformers()
  params = AllChem.ETKDGv3()
  params.randomSeed = zlib.crc32(f"{seed}:{record.mol_id}".encode()) & 0x7FFFFFFF
  if AllChem.EmbedMolecule(mol, params) != 0:
    params.useRandomCoords = True  # RDKit's fallback for molecules the eigenvalue start fails on
    if AllChem.EmbedMolecule(mol, params) != 0:
      raise ValueError(f"{where}: ETKDG embedding failed")
  return np.asarray(mol.GetConformer().GetPositions(), np.float64)


def baseline_predictions(records: Sequence[MoleculeRecord], name: str, *, seed: int = 0,
                         progress: Callable[[int, int], None] | None = None
                         ) -> tuple[list[np.ndarray | None], dict[str, list[str]]]:
  """(structures [1, n, 3] per record, None where it failed; {mol_id: reasons}) of a baseline."""
  if name not in BASELINES:
    raise ValueError(f"unknown baseline {name!r}; expected one of {BASELINES}")
  preds: list[np.ndarray | None] = []
  failures: dict[str, list[str]] = {}
  for i, record in enumerate(records):
    if name == "cheap":
      preds.append(np.asarray(record.positions, np.float64)[None])
    else:
      try:
        preds.append(etkdg_structure(record, seed)[None])
      except ValueError as e:
        preds.append(None)
        failures.setdefault(record.mol_id, []).append(str(e))
    if progress is not None:
      progress(i + 1, len(records))
  return preds, failures


# ----------------------------------------------------------------------------------------- scoring


@dataclasses.dataclass
class Evaluation:
  """Per-molecule metrics {name: [M]} of one set of predictions, and failures {mol_id: reasons}."""

  metrics: dict[str, list[float]]
  failures: dict[str, list[str]]

  def summary(self) -> dict[str, dict[str, float | int | None]]:
    """{metric: {mean, median, n, n_failed}} over the molecules with a finite value."""
    out = {}
    for name, values in self.metrics.items():
      v = np.asarray(values, np.float64)
      finite = v[np.isfinite(v)]
      out[name] = {"mean": _json_float(finite.mean()) if finite.size else None,
                   "median": _json_float(np.median(finite)) if finite.size else None,
                   "n": int(finite.size), "n_failed": int(v.size - finite.size)}
    return out

  def to_json(self) -> dict[str, Any]:
    return {"summary": self.summary(),
            "metrics": {k: [_json_float(x) for x in v] for k, v in self.metrics.items()},
            "failures": self.failures}

  @classmethod
  def from_json(cls, data: dict[str, Any]) -> "Evaluation":
    return cls(metrics={k: [math.nan if x is None else float(x) for x in v]
                        for k, v in data["metrics"].items()},
               failures={k: list(v) for k, v in data.get("failures", {}).items()})


def _json_float(x) -> float | None:
  x = float(x)
  return x if math.isfinite(x) else None


def geometry_broken(pred: np.ndarray, bonds: np.ndarray | None) -> np.ndarray:
  """bool [K]: a sample of pred [K, n, 3] has two atoms closer than MIN_DISTANCE or a bond of the
  molecular graph longer than MAX_BOND (Å)."""
  n = pred.shape[1]
  broken = np.zeros(pred.shape[0], bool)
  if n > 1:
    i, j = np.triu_indices(n, k=1)
    broken |= np.linalg.norm(pred[:, i] - pred[:, j], axis=-1).min(axis=1) < MIN_DISTANCE
  if bonds is not None and len(bonds):
    b = np.asarray(bonds, np.int64)
    broken |= np.linalg.norm(pred[:, b[:, 0]] - pred[:, b[:, 1]], axis=-1).max(axis=1) > MAX_BOND
  return broken


def _finite_samples(pred: np.ndarray | None) -> np.ndarray | None:
  """The finite samples of pred [K, n, 3], or None if there are none."""
  if pred is None:
    return None
  keep = np.isfinite(pred).all(axis=(1, 2))
  return pred[keep] if keep.any() else None


def score_predictions(records: Sequence[MoleculeRecord], predictions: Sequence[np.ndarray | None],
                      settings: EvalSettings, *, model: TrainedModel | None = None,
                      failures: dict[str, list[str]] | None = None, label: str = "",
                      show_progress: bool = True) -> Evaluation:
  """Structure, accurate-level and (with `model`) model metrics of K structures per record.

  predictions: [K, n, 3] (Å) per record, or None where generating it failed (its metrics are NaN;
    `failures` holds the reasons). Non-finite samples are dropped and reported.
  """
  if len(predictions) != len(records):
    raise ValueError(f"{len(predictions)} predictions for {len(records)} molecules")
  failures = {k: list(v) for k, v in (failures or {}).items()}
  preds = []
  for record, pred in zip(records, predictions):
    finite = _finite_samples(pred)
    if pred is not None and (finite is None or finite.shape[0] < pred.shape[0]):
      kept = 0 if finite is None else finite.shape[0]
      failures.setdefault(record.mol_id, []).append(
          f"{pred.shape[0] - kept} of {pred.shape[0]} predicted structures are not finite")
    preds.append(finite)
  valid = [i for i, p in enumerate(preds) if p is not None]
  m = len(records)
  metrics: dict[str, list[float]] = {}

  def put(name: str, i: int, value: float) -> None:
    metrics.setdefault(name, [math.nan] * m)[i] = float(value)

  bar = Progress(f"{label} structure metrics", enabled=show_progress)
  for done, i in enumerate(valid, 1):
    r = records[i]
    for name, value in structure.molecule_structure_metrics(r.atomic_numbers, r.bonds, preds[i],
                                                            r.ref_positions).items():
      put(name, i, value)
    bar(done, len(valid))
  for name in structure.STRUCTURE_METRICS:
    for stat in ("mean", "min"):
      metrics.setdefault(f"{name}_{stat}", [math.nan] * m)

  # Broken geometries are not sent to the accurate level (meaningless there, and an SCF on them
  # takes seconds); their fraction is the `broken_frac` metric.
  whole = {}
  for i in valid:
    broken = geometry_broken(preds[i], records[i].bonds)
    put("broken_frac", i, broken.mean())
    if records[i].bonds is not None:
      put("valid_frac", i, structure.connectivity_valid(
          records[i].atomic_numbers, records[i].bonds, preds[i], records[i].charge).mean())
    if broken.all():
      failures.setdefault(records[i].mol_id, []).append(
          f"every predicted structure is broken (an atom pair < {MIN_DISTANCE} Å or a bond > "
          f"{MAX_BOND} Å): no accurate-level metrics")
    else:
      whole[i] = preds[i][~broken]
  metrics.setdefault("broken_frac", [math.nan] * m)
  metrics.setdefault("valid_frac", [math.nan] * m)
  jobs = [physics.AccurateJob.from_record(records[i], p, settings.level) for i, p in whole.items()]
  results = physics.evaluate_accurate(jobs, settings.level, workers=settings.workers,
                                      progress=Progress(f"{label} {settings.level}",
                                                        enabled=show_progress))
  for i, result in zip(whole, results):
    for name, value in result.metrics().items():
      put(name, i, value)
    if result.failures:
      failures.setdefault(records[i].mol_id, []).extend(f"{settings.level}: {f}"
                                                        for f in result.failures)
  for name in physics.ACCURATE_METRICS:
    for stat in ("mean", "min"):
      metrics.setdefault(f"{name}_{stat}", [math.nan] * m)

  if model is not None:
    _model_metrics(model, [records[i] for i in valid], [preds[i] for i in valid], valid, put,
                   show_progress=show_progress, label=label)
    for name in MODEL_METRICS:
      metrics.setdefault(name, [math.nan] * m)
  return Evaluation(metrics, failures)


def _model_metrics(model: TrainedModel, records: Sequence[MoleculeRecord],
                   preds: Sequence[np.ndarray], index: Sequence[int], put, *, show_progress: bool,
                   label: str) -> None:
  """E_phi diagnostics of the predictions and the force error at the cheap structures."""
  at_pred = [r.replace(positions=p[k]) for r, p in zip(records, preds) for k in range(p.shape[0])]
  at_ref = [r.replace(positions=r.ref_positions) for r in records]
  energies = model.energy_and_forces(at_pred + at_ref + list(records),
                                     progress=Progress(f"{label} model energies",
                                                       enabled=show_progress))
  start = 0
  n = len(at_pred)
  for j, (r, p) in enumerate(zip(records, preds)):
    e_pred = np.array([e for e, _ in energies[start:start + p.shape[0]]])
    start += p.shape[0]
    for name, value in physics.model_energy_metrics(e_pred, energies[n + j][0]).items():
      put(name, index[j], value)
    if r.forces is not None:
      err = energies[n + len(records) + j][1] - np.asarray(r.forces, np.float64)
      put("model_force_rmse", index[j], np.sqrt(np.mean(err ** 2)))


def force_diagnostic(model: TrainedModel,
                     records: Sequence[MoleculeRecord]) -> physics.ForceDiagnostic | None:
  """The energy head's forces at the cheap structures vs the records' accurate force labels
  (None if no record has force labels)."""
  labelled = [r for r in records if r.forces is not None]
  if not labelled:
    return None
  model_forces = [f for _, f in model.energy_and_forces(labelled)]
  return physics.force_diagnostic(model_forces, [np.asarray(r.forces, np.float64) for r in labelled])


# ------------------------------------------------------------------------------------- entry point


def open_split(data: str | Path, split: str) -> Store:
  """The split's Store; EvaluationError naming the dataset and split if absent."""
  try:
    dataset = open_dataset(data)
  except (OSError, ValueError) as e:
    raise EvaluationError(f"--data {data}: cannot open the dataset: {e}") from e
  if split not in dataset.splits:
    raise EvaluationError(f"--data {data}: no split {split!r} (splits: {sorted(dataset.splits)})")
  return dataset[split]


def load_model(workdir: str | Path) -> TrainedModel:
  """TrainedModel.load with an EvaluationError naming the workdir on failure."""
  try:
    return TrainedModel.load(workdir)
  except (OSError, ValueError) as e:
    raise EvaluationError(f"--workdir {workdir}: cannot load a trained model: {e}") from e


def check_fidelities(model: TrainedModel, records: Sequence[MoleculeRecord], where: str) -> None:
  """Raises EvaluationError if a record's label fidelity is unknown to the model's energy head."""
  unknown = sorted({r.label_fidelity for r in records if r.label_fidelity} - set(model.fidelities))
  if unknown:
    raise EvaluationError(f"{where}: label fidelities {unknown} are unknown to the model of "
                          f"{model.workdir} (trained on {model.fidelities})")


def evaluate_model(model: TrainedModel, records: Sequence[MoleculeRecord], sampling: Sampling,
                   settings: EvalSettings, *, show_progress: bool = True) -> Evaluation:
  """Every metric of the model's K structures per molecule in `sampling.mode`."""
  preds = model.sample(records, sampling,
                       progress=Progress(f"{sampling.mode} sampling", enabled=show_progress))
  return score_predictions(records, preds, settings, model=model, label=sampling.mode,
                           show_progress=show_progress)


def evaluate_baseline(records: Sequence[MoleculeRecord], name: str, settings: EvalSettings, *,
                      model: TrainedModel | None = None, show_progress: bool = True) -> Evaluation:
  """Every metric of a baseline's structures (model diagnostics only when `model` is given)."""
  preds, failures = baseline_predictions(records, name, seed=settings.etkdg_seed,
                                         progress=Progress(f"{name} structures",
                                                           enabled=show_progress))
  return score_predictions(records, preds, settings, model=model, failures=failures, label=name,
                           show_progress=show_progress)


def _cpu_model() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def provenance() -> dict[str, Any]:
  """Command line, machine and date (the caller may replace "command" with its launcher's)."""
  import jax  # pylint: disable=g-import-not-at-top (already loaded through consist.inference)

  return {"command": " ".join([Path(sys.executable).name, *sys.argv]),
          "machine": f"{platform.node()}: {_cpu_model()}, {os.cpu_count()} CPUs, jax "
                     f"{jax.__version__} on {jax.default_backend()} ({jax.device_count()} devices), "
                     f"python {platform.python_version()}",
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def relax_predictions(model: TrainedModel, records: Sequence[MoleculeRecord], relax: RelaxSettings, *,
                      progress: Callable[[int, int], None] | None = None
                      ) -> tuple[list[np.ndarray], dict[str, list[str]], dict[str, list[float]], float]:
  """(structures [1, n, 3] per record, {mol_id: reasons} of molecules stopped at the step limit,
  per-molecule {relax_steps, relax_fmax, relax_converged}, wall seconds incl. compilation) of the
  records' own (cheap) positions relaxed on the learned energy."""
  t0 = time.perf_counter()
  out = model.relax(records, relax, progress=progress)
  seconds = time.perf_counter() - t0
  failures = {r.mol_id: [f"relaxation on the learned energy stopped at {o.steps} steps with fmax "
                         f"{o.fmax:.3g} eV/Å > {relax.fmax}"] for r, o in zip(records, out) if not o.converged}
  metrics = {"relax_steps": [float(o.steps) for o in out], "relax_fmax": [o.fmax for o in out],
             "relax_converged": [float(o.converged) for o in out]}
  return [o.positions[None] for o in out], failures, metrics, seconds


def evaluate_relax_baseline(model: TrainedModel, records: Sequence[MoleculeRecord], settings: EvalSettings,
                            relax: RelaxSettings = RelaxSettings(), *,
                            show_progress: bool = True) -> tuple[Evaluation, float]:
  """(every metric of the "relax" baseline, its relaxation wall time in s, compilation included)."""
  preds, failures, extra, seconds = relax_predictions(
      model, records, relax, progress=Progress("relax on the learned energy", enabled=show_progress))
  evaluation = score_predictions(records, preds, settings, model=model, failures=failures, label="relax",
                                 show_progress=show_progress)
  evaluation.metrics.update(extra)
  return evaluation, seconds


def evaluate(workdir: str | Path, data: str | Path, split: str, sampling: Sampling,
             settings: EvalSettings, *, baselines: Sequence[str] = BASELINES + MODEL_BASELINES,
             relax: RelaxSettings = RelaxSettings(), meta: dict[str, Any] | None = None,
             show_progress: bool = True) -> dict[str, Any]:
  """The `launch.evaluate` result: the model and the baselines on the molecules of a split.

  Returns a JSON-able dict: meta (provenance updated with `meta`), mol_ids, n_atoms, model
  {sampling, step, summary, metrics, failures}, force_diagnostic, baselines {name: {summary,
  metrics, failures}; "relax" also {settings, seconds, molecules_per_s}}.
  """
  t0 = time.perf_counter()
  where = f"--data {data} --split {split}"
  records = evaluation_records(open_split(data, split), where=where,
                               max_molecules=settings.max_molecules)
  model = load_model(workdir)
  check_fidelities(model, records, where)
  try:
    model.resolve(sampling)
  except ValueError as e:
    raise EvaluationError(f"--workdir {workdir}: {e}") from e
  model_eval = evaluate_model(model, records, sampling, settings, show_progress=show_progress)
  diagnostic = force_diagnostic(model, records)
  out = {
      "meta": {**provenance(), "workdir": str(Path(workdir).resolve()), "step": model.step,
               "data": str(Path(data).resolve()), "split": split,
               "settings": dataclasses.asdict(settings), **(meta or {})},
      "mol_ids": [r.mol_id for r in records],
      "n_atoms": [r.n_atoms for r in records],
      "model": {"sampling": dataclasses.asdict(model.resolve(sampling)), "step": model.step, **model_eval.to_json()},
      "force_diagnostic": None if diagnostic is None else diagnostic.to_json(),
      "baselines": {name: evaluate_baseline(records, name, settings, model=model,
                                            show_progress=show_progress).to_json()
                    for name in baselines if name in BASELINES},
  }
  if "relax" in baselines:
    evaluation, seconds = evaluate_relax_baseline(model, records, settings, relax,
                                                  show_progress=show_progress)
    out["baselines"]["relax"] = {**evaluation.to_json(), "settings": dataclasses.asdict(relax),
                                 "seconds": round(seconds, 2),
                                 "molecules_per_s": round(len(records) / seconds, 2)}
  out["meta"]["wall_s"] = round(time.perf_counter() - t0, 1)
  return out

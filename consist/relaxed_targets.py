"""Minima of a run's learned energy as the structure targets of `optimality_form="relaxed"`.

Every equilibrium record of the chosen splits is relaxed from its own (cheap-level) structure on
the energy model of a trained run (`TrainedModel.relax`: batched BFGS by default,
`consist.relax`), and the dataset is written again with the minimum found as the record's
`ref_positions` (`ref_fidelity` = `RELAXED_TAG`, `ref_energy` = the learned energy there, eV).
Records that did not converge, whose minimum fails the record checks (overlapping atoms: an
undertrained energy model), or that are not equilibrium structures carry no reference. The loss
Kabsch-aligns a minimum onto its record's structure (`consist.losses.optimality.aligned_minimum`).
Every other field is copied unchanged; the source dataset is never modified.

The targets belong to one energy model: the dataset's attrs record its fingerprint, and the
structure model trained toward them must keep that energy model frozen (stage 2 with
`loss.energy_weight = loss.forces_weight = 0`, as configs/pretrained.py:consistency).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from consist import relax
from consist.data.record import RecordError
from consist.data.store import DatasetWriter, open_dataset
from consist.eval.structure import kabsch_rmsd
from consist.inference import Progress, TrainedModel
from consist.losses.optimality import RELAXED_TAG


def relaxed_records(model: TrainedModel, records: Sequence, settings: relax.RelaxSettings,
                    progress: Progress | None = None) -> tuple[list, dict]:
  """(records with the learned minima as references, stats) of one split's records."""
  eq = [i for i, r in enumerate(records) if r.is_equilibrium]
  relaxed = model.relax([records[i] for i in eq], settings, progress=progress) if eq else []
  out = [r.replace(ref_positions=None, ref_fidelity="", ref_energy=None) for r in records]
  moved, rejected = [], 0
  for i, result in zip(eq, relaxed):
    if not result.converged:
      continue
    target = out[i].replace(ref_positions=result.positions.astype(np.float32), ref_fidelity=RELAXED_TAG,
                            ref_energy=float(result.energy))
    try:  # a minimum with overlapping atoms (an undertrained energy model) is no target
      out[i] = target.validate()
    except RecordError:
      rejected += 1
      continue
    moved.append(kabsch_rmsd(result.positions, records[i].positions))
  stats = {"records": len(records), "equilibrium": len(eq),
           "converged": int(sum(r.converged for r in relaxed)), "rejected": rejected,
           "mean_steps": float(np.mean([r.steps for r in relaxed])) if relaxed else 0.0,
           "mean_rmsd_to_start_A": float(np.mean(moved)) if moved else 0.0}
  return out, stats


def write_relaxed_targets(model: TrainedModel, source: str | Path, dest: str | Path,
                          splits: Sequence[str], settings: relax.RelaxSettings = relax.RelaxSettings(),
                          *, fingerprint: str = "", log: Callable[[str], None] = print,
                          progress_for: Callable[[str], Progress | None] = lambda split: None) -> Path:
  """Writes `splits` of dataset `source` with the learned minima as references to `dest` (once,
  atomically: an existing complete dataset at `dest` is reused). Returns `dest`."""
  dest = Path(dest)
  if (dest / "dataset.json").exists():
    return dest
  dataset = open_dataset(source)
  missing = [s for s in splits if s not in dataset.splits]
  if missing:
    raise ValueError(f"{source}: no split(s) {missing}; splits are {sorted(dataset.splits)}")
  attrs = {"derived_from": str(Path(source).resolve()), "model": str(model.workdir), "step": model.step,
           "energy_model_fingerprint": fingerprint,
           "relaxed_targets": {"method": settings.method, "fmax": settings.fmax,
                               "max_steps": settings.max_steps}}
  written = {}
  for split in splits:
    store = dataset[split]
    t0 = time.perf_counter()
    records, stats = relaxed_records(model, [store[i] for i in range(len(store))], settings,
                                     progress_for(split))
    stats["wall_s"] = round(time.perf_counter() - t0, 1)
    log(f"{split}: {stats['converged']} of {stats['equilibrium']} equilibrium records relaxed to "
        f"fmax {settings.fmax} eV/Å ({stats['rejected']} of them rejected: overlapping atoms; mean "
        f"{stats['mean_steps']:.1f} steps, RMSD to the start {stats['mean_rmsd_to_start_A']:.3f} Å) "
        f"in {stats['wall_s']} s")
    written[split] = (records, stats)
  attrs["relaxed_targets"]["splits"] = {s: st for s, (_, st) in written.items()}
  with DatasetWriter(dest, overwrite=True, attrs=attrs) as writer:
    for split, (records, _) in written.items():
      out = writer.split(split)
      for i, record in enumerate(records):
        out.append(record, where=f"{source}:{split}[{i}]")
  return dest

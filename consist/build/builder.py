"""Parallel, resumable dataset build: plan -> journaled chunks -> one consist dataset.

The work directory holds `plan.json` (settings, source checksum, the ordered molecule list with its
split) and `chunks/chunk-NNNNN.pkl`, one atomically written file of per-molecule results per chunk.
A killed build re-run with the same plan skips finished chunks; molecules are processed in a fixed
order with per-molecule seeds, so the assembled dataset equals that of an uninterrupted build.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import multiprocessing
import os
import pickle
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

from consist.build import sources
from consist.build.molecule import BuildSettings, MoleculeBuilder, MoleculeResult
from consist.build.split import SPLIT_METHODS

PLAN = "plan.json"
CHUNK_DIR = "chunks"


@dataclasses.dataclass(frozen=True)
class BuildSpec:
  """What to build: the first `n_molecules` (0 = all) of the source with <= `max_heavy_atoms` (0 = any)."""

  source: str
  out: str
  workdir: str
  n_molecules: int = 0
  max_heavy_atoms: int = 0
  split_method: str = "scaffold"
  split_fractions: tuple[tuple[str, float], ...] = (("train", 0.8), ("val", 0.1), ("test", 0.1))
  settings: BuildSettings = BuildSettings()
  chunk_size: int = 16
  workers: int = 2

  def __post_init__(self):
    names = [k for k, _ in self.split_fractions]
    if names[0] in self.settings.ref_splits:
      raise ValueError(f"split {names[0]!r} (the training split) must not get reference minima")
    if self.split_method not in SPLIT_METHODS:
      raise ValueError(f"split_method {self.split_method!r}: expected one of {sorted(SPLIT_METHODS)}")
    unknown = set(self.settings.ref_splits) - set(names)
    if unknown:
      raise ValueError(f"ref_splits {sorted(unknown)} are not among the splits {names}")


def _sha256(path: Path) -> str:
  return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_plan(spec: BuildSpec) -> dict[str, Any]:
  """The deterministic plan: molecules in source order with their scaffold split."""
  molecules = sources.read_smiles_source(Path(spec.source))
  if spec.max_heavy_atoms:
    molecules = [(s, m) for s, m in molecules if sources.heavy_atoms(s) <= spec.max_heavy_atoms]
  if spec.n_molecules:
    molecules = molecules[:spec.n_molecules]
  fractions = dict(spec.split_fractions)
  splits = SPLIT_METHODS[spec.split_method][0]([s for s, _ in molecules], fractions,
                                               spec.settings.seed)
  plan = {
      "source": str(spec.source),
      "source_sha256": _sha256(Path(spec.source)),
      "settings": spec.settings.to_json(),
      "split_fractions": fractions,
      "chunk_size": spec.chunk_size,
      "molecules": [[s, m, sp] for (s, m), sp in zip(molecules, splits)],
  }
  return json.loads(json.dumps(plan))  # as it reads back from plan.json (tuples -> lists)


def load_or_create_plan(spec: BuildSpec) -> dict[str, Any]:
  """Creates workdir/plan.json, or checks that an existing one matches this spec (resume)."""
  workdir = Path(spec.workdir)
  plan = make_plan(spec)
  path = workdir / PLAN
  if path.exists():
    old = json.loads(path.read_text())
    if old != plan:
      changed = sorted(k for k in plan if old.get(k) != plan[k])
      raise ValueError(f"{workdir}: journal was started with a different plan ({', '.join(changed)} "
                       "differ); use another --workdir or delete this one to start over")
    return old
  (workdir / CHUNK_DIR).mkdir(parents=True, exist_ok=True)
  _atomic_write(path, json.dumps(plan, indent=0).encode())
  return plan


def _atomic_write(path: Path, data: bytes) -> None:
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _chunks(plan: dict[str, Any]) -> list[list[list[str]]]:
  mols, size = plan["molecules"], plan["chunk_size"]
  return [mols[i:i + size] for i in range(0, len(mols), size)]


def _chunk_path(workdir: Path, index: int) -> Path:
  return workdir / CHUNK_DIR / f"chunk-{index:05d}.pkl"


_WORKER: MoleculeBuilder | None = None


def _init_worker(settings: BuildSettings) -> None:
  global _WORKER
  _WORKER = MoleculeBuilder(settings)


def _run_chunk(args: tuple[str, int, list[list[str]]]) -> tuple[int, int, int, float]:
  workdir, index, molecules = args
  results = [_WORKER(smiles, mol_id, split) for smiles, mol_id, split in molecules]
  _atomic_write(_chunk_path(Path(workdir), index), pickle.dumps(results, protocol=5))
  failed = sum(bool(r.failure) for r in results)
  return index, len(results) - failed, failed, sum(r.seconds for r in results)


def run_chunks(spec: BuildSpec, plan: dict[str, Any], log: Callable[[str], None] = print) -> None:
  """Computes every chunk without a journal file, over `spec.workers` processes."""
  workdir = Path(spec.workdir)
  chunks = _chunks(plan)
  todo = [(str(workdir), i, c) for i, c in enumerate(chunks) if not _chunk_path(workdir, i).exists()]
  log(f"{len(chunks) - len(todo)}/{len(chunks)} chunks already journaled in {workdir}; "
      f"{len(todo)} to compute with {spec.workers} worker(s)")
  if not todo:
    return
  # tblite / PySCF use OpenMP: one thread per worker, set before they load in the children.
  os.environ["OMP_NUM_THREADS"] = "1"
  start, done_mols, done, ok, failed = time.time(), 0, 0, 0, 0
  total_mols = sum(len(c) for _, _, c in todo)
  if spec.workers <= 1:
    _init_worker(spec.settings)
    results = map(_run_chunk, todo)
    pool = None
  else:
    pool = multiprocessing.get_context("spawn").Pool(spec.workers, _init_worker, (spec.settings,))
    results = pool.imap_unordered(_run_chunk, todo)
  try:
    for index, n_ok, n_failed, _ in results:
      done += 1
      ok, failed = ok + n_ok, failed + n_failed
      done_mols += n_ok + n_failed
      elapsed = time.time() - start
      eta = elapsed / done_mols * (total_mols - done_mols)
      log(f"chunk {index:5d} done: {done}/{len(todo)} chunks, {done_mols}/{total_mols} molecules "
          f"({ok} ok, {failed} failed), {elapsed:.0f} s elapsed, ETA {eta:.0f} s")
  finally:
    if pool is not None:
      pool.close()
      pool.join()


def load_results(spec: BuildSpec, plan: dict[str, Any]) -> list[MoleculeResult]:
  """All per-molecule results in plan order (every chunk must be journaled)."""
  workdir = Path(spec.workdir)
  out = []
  for i, chunk in enumerate(_chunks(plan)):
    path = _chunk_path(workdir, i)
    if not path.exists():
      raise FileNotFoundError(f"{path}: chunk {i} not computed yet; run the build to finish it")
    results = pickle.loads(path.read_bytes())
    if [r.mol_id for r in results] != [m for _, m, _ in chunk]:
      raise ValueError(f"{path}: molecules do not match plan.json (stale journal?)")
    out.extend(results)
  return out


def _versions() -> dict[str, str]:
  out = {}
  for pkg in ("consist", "rdkit", "tblite", "ase", "numpy", "pyscf"):
    try:
      out[pkg] = metadata.version(pkg)
    except metadata.PackageNotFoundError:
      pass
  return out


def dataset_attrs(spec: BuildSpec, plan: dict[str, Any], results: Sequence[MoleculeResult],
                  header: Sequence[str]) -> dict[str, Any]:
  """Levels, settings, seeds, provenance and failure counts recorded with the dataset."""
  failures = [r for r in results if r.failure]
  per_split = collections.Counter(r.split for r in results if not r.failure)
  s = spec.settings
  return {
      "builder": "consist.build (python -m launch.build_dataset)",
      "levels": {"cheap": s.cheap, "accurate": s.accurate,
                 "structure_label": f"{s.cheap} minimum from seeded ETKDGv3 embedding",
                 "energy_forces": f"{s.accurate} at every stored structure",
                 "reference_minima": f"{s.accurate} relaxation from the {s.cheap} structure "
                                     f"(splits {list(s.ref_splits)}, fmax {s.ref_fmax} eV/Å)"},
      "settings": plan["settings"],
      "split": {"method": SPLIT_METHODS[spec.split_method][1],
                "fractions": plan["split_fractions"], "molecules": dict(sorted(per_split.items()))},
      "source": {"path": plan["source"], "sha256": plan["source_sha256"], "n_molecules_planned": len(plan["molecules"]),
                 "header": list(header)},
      "versions": _versions(),
      "failures": {
          "counts": dict(sorted(collections.Counter(r.failure for r in failures).items())),
          "molecules": [[r.mol_id, r.smiles, r.split, r.failure, r.detail] for r in failures],
      },
  }


def source_header(path: Path) -> list[str]:
  with open(path, encoding="utf-8") as f:
    return [line[1:].strip() for line in f if line.startswith("#")]


def assemble(spec: BuildSpec, plan: dict[str, Any], *, overwrite: bool = False) -> dict[str, Any]:
  """Writes the dataset from the journal (atomically; nothing appears at `out` on failure)."""
  from consist.data.store import DatasetWriter  # pylint: disable=g-import-not-at-top
  results = load_results(spec, plan)
  attrs = dataset_attrs(spec, plan, results, source_header(Path(spec.source)))
  with DatasetWriter(spec.out, overwrite=overwrite, attrs=attrs) as ds:
    for name in plan["split_fractions"]:
      ds.split(name)
    for r in results:
      for k, rec in enumerate(r.records):
        if r.split not in spec.settings.ref_splits and rec.ref_positions is not None:
          raise AssertionError(f"{r.mol_id}: reference minimum in split {r.split!r}")
        ds.split(r.split).append(rec, where=f"{spec.workdir}: {r.mol_id} sample {k}")
  return attrs


def build(spec: BuildSpec, *, overwrite: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Plan (or resume), compute missing chunks, assemble the dataset; returns its attrs."""
  plan = load_or_create_plan(spec)
  run_chunks(spec, plan, log)
  attrs = assemble(spec, plan, overwrite=overwrite)
  log(f"wrote {spec.out}: molecules per split {attrs['split']['molecules']}, "
      f"failures {attrs['failures']['counts']}")
  return attrs

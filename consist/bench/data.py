"""Data-layer benchmark: store write throughput, batching throughput, padding efficiency.

On a synthetic set of random molecules with a realistic size distribution (5-40 atoms, drug-like
elements, tree-shaped bond graphs, 1.0-1.5 Å bonds): the stored record content is arbitrary, the
sizes and array shapes (what the data layer's cost depends on) are those of QM9 / PubChemQC-like data.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np

from consist.data.record import MoleculeRecord

ELEMENTS = np.array([1, 6, 7, 8, 9, 16, 17])
ELEMENT_WEIGHTS = np.array([0.45, 0.33, 0.08, 0.08, 0.02, 0.02, 0.02])
# Made-up per-element energies (eV) for synthetic labels: E = sum_Z n_Z e_Z + noise.
SYNTHETIC_ELEMENT_ENERGY = {1: -13.6, 6: -1029.8, 7: -1485.3, 8: -2042.6, 9: -2713.7, 16: -10831.2,
                            17: -12577.0}


def synthetic_molecule(rng: np.random.Generator, n_atoms: int, mol_id: str, *,
                       fidelity: str = "synthetic") -> MoleculeRecord:
  """A random tree-shaped molecule: atom k bonds to an earlier atom at 1.0-1.5 Å, no two atoms
  closer than 0.9 Å; energy from `SYNTHETIC_ELEMENT_ENERGY` plus 0.1 eV noise; random forces."""
  z = rng.choice(ELEMENTS, size=n_atoms, p=ELEMENT_WEIGHTS).astype(np.int64)
  pos = np.zeros((n_atoms, 3))
  bonds = []
  for k in range(1, n_atoms):
    while True:
      parent = int(rng.integers(k))
      direction = rng.normal(size=3)
      candidate = pos[parent] + rng.uniform(1.0, 1.5) * direction / np.linalg.norm(direction)
      if np.linalg.norm(pos[:k] - candidate, axis=-1).min() > 0.9:
        break
    pos[k] = candidate
    bonds.append((parent, k))
  bonds_arr = np.asarray(bonds, dtype=np.int64).reshape(-1, 2)
  orders = rng.choice(np.array([1.0, 1.5, 2.0, 3.0]), size=len(bonds), p=[0.7, 0.15, 0.1, 0.05])
  energy = sum(SYNTHETIC_ELEMENT_ENERGY[int(a)] for a in z) + rng.normal(scale=0.1)
  return MoleculeRecord(
      mol_id=mol_id, atomic_numbers=z, positions=pos, bonds=bonds_arr, bond_orders=orders,
      energy=float(energy), forces=rng.normal(size=(n_atoms, 3)), is_equilibrium=bool(rng.random() < 0.5),
      structure_fidelity="synthetic", label_fidelity=fidelity)


def synthetic_sizes(rng: np.random.Generator, n: int, min_atoms: int = 5, max_atoms: int = 40) -> np.ndarray:
  """Atom counts skewed like drug-like sets (mode ~18, long tail to `max_atoms`)."""
  return np.clip(np.round(rng.gamma(6.0, 3.2, size=n)), min_atoms, max_atoms).astype(np.int64)


def synthetic_records(n: int, seed: int = 0, *, min_atoms: int = 5, max_atoms: int = 40,
                      fidelities: tuple[str, ...] = ("synthetic",)) -> list[MoleculeRecord]:
  """`n` random molecules (two conformations share each mol_id), fidelities assigned in turn."""
  rng = np.random.default_rng(seed)
  sizes = synthetic_sizes(rng, n, min_atoms, max_atoms)
  return [synthetic_molecule(rng, int(s), f"synth-{i // 2}", fidelity=fidelities[i % len(fidelities)])
          for i, s in enumerate(sizes)]


def _padding_efficiency(pipe) -> dict:
  """Real / padded slots over one training epoch's plan (no record is read)."""
  plan = pipe.plan(0)
  used = plan.order[:plan.batch_start[plan.step_batches.size]]
  budgets = [pipe.buckets.budgets[b] for b in plan.step_bucket]
  node_slots = pipe.n_devices * sum(b.n_node for b in budgets)
  edge_slots = pipe.n_devices * sum(b.n_edge for b in budgets)
  graph_slots = pipe.n_devices * sum(b.n_graph - 1 for b in budgets)
  return {
      "buckets": [b.to_json() for b in pipe.buckets.budgets],
      "steps_per_epoch": plan.n_steps,
      "molecules_per_epoch": int(len(used)),
      "dropped_molecules": int(len(plan.order) - len(used)),
      "node_efficiency": float(pipe.n_atoms[used].sum() / node_slots) if node_slots else 0.0,
      "edge_efficiency": float(pipe.n_edges[used].sum() / edge_slots) if edge_slots else 0.0,
      "graph_slot_efficiency": float(len(used) / graph_slots) if graph_slots else 0.0,
      "bucket_use": np.bincount(plan.step_bucket, minlength=len(pipe.buckets.budgets)).tolist(),
  }


def run(quick: bool) -> dict:
  """Store write / read throughput, batching throughput and padding efficiency on synthetic data."""
  from consist.data.batching import batch_records
  from consist.data.budgets import Buckets, estimate_budget, make_buckets
  from consist.data.pipeline import InputPipeline, pack_greedy
  from consist.data.store import StoreWriter, open_store

  n_records = 2_000 if quick else 20_000
  graphs_per_device, n_devices = 16, 8
  t0 = time.perf_counter()
  records = synthetic_records(n_records, seed=0)
  out: dict = {"n_records": n_records, "n_atoms": int(sum(r.n_atoms for r in records)),
               "atoms_per_molecule": {"min": int(min(r.n_atoms for r in records)),
                                      "mean": float(np.mean([r.n_atoms for r in records])),
                                      "max": int(max(r.n_atoms for r in records))},
               "graphs_per_device": graphs_per_device, "devices": n_devices,
               "generate_s": time.perf_counter() - t0}
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    with StoreWriter(f"{tmp}/train") as writer:
      for i, r in enumerate(records):
        writer.append(r, where=f"synthetic record {i}")
    write_s = time.perf_counter() - t0
    out["store_write_molecules_per_s"] = n_records / write_s
    store = open_store(f"{tmp}/train")
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(store), size=min(5_000, n_records))
    t0 = time.perf_counter()
    for i in idx:
      store[int(i)]
    out["store_random_read_molecules_per_s"] = len(idx) / (time.perf_counter() - t0)

    n_atoms = store.n_atoms
    sample = [store[int(i)] for i in idx[:2_000]]
    single = estimate_budget(n_atoms, graphs_per_device)
    sizes = np.array([r.n_atoms for r in sample])
    starts = pack_greedy(sizes, sizes * (sizes - 1), single.n_graph - 1, single.n_node - 1, single.n_edge)
    t0 = time.perf_counter()
    for s, e in zip(starts[:-1], starts[1:]):
      batch_records(sample[s:e], single, fidelities=["synthetic"])
    n_batched = len(sample)
    out["batch_records_molecules_per_s"] = n_batched / (time.perf_counter() - t0)

    fidelities = store.fidelities
    variants = {"single_budget": Buckets((single,)),
                "buckets_3": make_buckets(n_atoms, graphs_per_device, n_buckets=3)}
    for name, buckets in variants.items():
      pipe = InputPipeline(store, buckets, fidelities=fidelities, process_index=0, process_count=1,
                           local_device_count=n_devices)
      out[name] = _padding_efficiency(pipe)
    pipe = InputPipeline(store, variants["buckets_3"], fidelities=fidelities, process_index=0,
                         process_count=1, local_device_count=n_devices)
    t0 = time.perf_counter()
    it = pipe.train_iterator()
    n_steps = min(pipe.steps_per_epoch(0), 20 if quick else 100)
    n_mol = sum(int((next(it).record_index >= 0).sum()) for _ in range(n_steps))
    out["pipeline_molecules_per_s"] = n_mol / (time.perf_counter() - t0)
    out["pipeline_steps_timed"] = n_steps
  return out

"""Padding molecular records into fixed-shape `GraphBatch`es (STYLE lesson 2; conventions in types.py).

A `Budget` is the static shape of one device's sub-batch. Real content occupies the leading slots;
the rest is padding: at least one padding node and one padding graph are always present (the last
graph is the padding graph that owns every padding node, and padding edges connect the last node to
itself so their length is exactly 0). Budgets are per device; `stack_device_batches` adds the leading
device axis.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from consist.data.graph import record_to_graph
from consist.data.record import MoleculeRecord
from consist.data.reference import EnergyReference
from consist.types import GraphBatch

_FIELDS = tuple(f.name for f in dataclasses.fields(GraphBatch))


@dataclasses.dataclass(frozen=True, order=True)
class Budget:
  """Static per-device batch shape. Holds up to n_node - 1 real atoms, n_edge real edges and
  n_graph - 1 real molecules (one node and one graph are reserved for padding)."""

  n_node: int
  n_edge: int
  n_graph: int

  def __post_init__(self):
    if self.n_node < 2 or self.n_graph < 2 or self.n_edge < 0:
      raise ValueError(f"{self}: need n_node >= 2, n_graph >= 2 (one of each is padding), n_edge >= 0")

  def fits(self, n_node: int, n_edge: int, n_graph: int) -> bool:
    """Whether real content of these sizes fits (leaving the padding node and graph)."""
    return n_node <= self.n_node - 1 and n_edge <= self.n_edge and n_graph <= self.n_graph - 1

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict) -> "Budget":
    return cls(n_node=int(d["n_node"]), n_edge=int(d["n_edge"]), n_graph=int(d["n_graph"]))


def empty_batch(budget: Budget) -> GraphBatch:
  """An all-padding batch (numpy leaves) following the conventions of `consist.types`."""
  n, e, g = budget.n_node, budget.n_edge, budget.n_graph
  return GraphBatch(
      atomic_numbers=np.zeros(n, np.int32),
      positions=np.zeros((n, 3), np.float32),
      node_mask=np.zeros(n, bool),
      node_graph=np.full(n, g - 1, np.int32),
      senders=np.full(e, n - 1, np.int32),
      receivers=np.full(e, n - 1, np.int32),
      edge_mask=np.zeros(e, bool),
      bond_order=np.zeros(e, np.float32),
      bond_hops=np.zeros(e, np.int32),
      graph_mask=np.zeros(g, bool),
      n_node=np.asarray([0] * (g - 1) + [n], np.int32),
      charge=np.zeros(g, np.int32),
      fidelity=np.zeros(g, np.int32),
      energy=np.zeros(g, np.float32),
      energy_mask=np.zeros(g, bool),
      forces=np.zeros((n, 3), np.float32),
      forces_mask=np.zeros(g, bool),
      is_equilibrium=np.zeros(g, bool),
      ref_positions=np.zeros((n, 3), np.float32),
      ref_mask=np.zeros(g, bool),
  )


def _fidelity_index(record: MoleculeRecord, index: dict[str, int], i: int) -> int:
  """Index of the record's label fidelity; 0 for records without energy/force labels."""
  if not record.label_fidelity:
    return 0
  if record.label_fidelity not in index:
    raise ValueError(f"record {i} (mol_id={record.mol_id!r}): label fidelity {record.label_fidelity!r} "
                     f"not in the fidelity vocabulary {list(index)}")
  return index[record.label_fidelity]


def batch_records(records: Sequence[MoleculeRecord], budget: Budget, *, fidelities: Sequence[str],
                  energy_reference: EnergyReference | None = None,
                  cutoff: float | None = None) -> GraphBatch:
  """Pads `records` into one device's `GraphBatch` with numpy leaves (no device axis).

  Args:
    records: molecules, in graph order.
    budget: the static shape; must fit all records plus one padding node and graph.
    fidelities: vocabulary that `GraphBatch.fidelity` indexes (`Dataset.fidelities`).
    energy_reference: subtracted from energies in float64 before the float32 cast; without it the
      raw total energy is stored (float32: only for small test energies).
    cutoff: radius graph cutoff in Å; None = all intra-molecular pairs.

  Raises:
    ValueError: the records do not fit the budget (naming the first molecule that overflows it), or
      a label fidelity is not in the vocabulary.
  """
  empty = empty_batch(budget)
  out = {k: np.array(getattr(empty, k)) for k in _FIELDS}
  fid_index = {f: i for i, f in enumerate(fidelities)}
  node0, edge0 = 0, 0
  for g, record in enumerate(records):
    n = record.n_atoms
    graph = record_to_graph(record, cutoff=cutoff)
    e = graph.n_edge
    if not budget.fits(node0 + n, edge0 + e, g + 1):
      raise ValueError(
          f"record {g} (mol_id={record.mol_id!r}, {n} atoms, {e} edges) does not fit {budget} after "
          f"{g} molecules with {node0} atoms and {edge0} edges (one node and one graph are padding)")
    nodes, edges = slice(node0, node0 + n), slice(edge0, edge0 + e)
    out["atomic_numbers"][nodes] = record.atomic_numbers
    out["positions"][nodes] = record.positions
    out["node_mask"][nodes] = True
    out["node_graph"][nodes] = g
    out["senders"][edges] = graph.senders + node0
    out["receivers"][edges] = graph.receivers + node0
    out["edge_mask"][edges] = True
    out["bond_order"][edges] = graph.bond_order
    out["bond_hops"][edges] = graph.bond_hops
    out["graph_mask"][g] = True
    out["n_node"][g] = n
    out["charge"][g] = record.charge
    f = _fidelity_index(record, fid_index, g)
    out["fidelity"][g] = f
    if record.energy is not None:
      e_ref = 0.0 if energy_reference is None else energy_reference.energy(record.atomic_numbers, f)
      out["energy"][g] = np.float32(np.float64(record.energy) - e_ref)
      out["energy_mask"][g] = True
    if record.forces is not None:
      out["forces"][nodes] = record.forces
      out["forces_mask"][g] = True
    out["is_equilibrium"][g] = record.is_equilibrium
    if record.ref_positions is not None:
      out["ref_positions"][nodes] = record.ref_positions
      out["ref_mask"][g] = True
    node0, edge0 = node0 + n, edge0 + e
  out["n_node"][-1] = budget.n_node - node0
  return GraphBatch(**out)


def stack_device_batches(batches: Sequence[GraphBatch]) -> GraphBatch:
  """Stacks per-device batches of one budget along a new leading device axis [D, ...]."""
  if not batches:
    raise ValueError("stack_device_batches: no batches")
  shapes = {(b.num_nodes, b.num_edges, b.num_graphs) for b in batches}
  if len(shapes) != 1:
    raise ValueError(f"stack_device_batches: batches have different budgets (n_node, n_edge, n_graph) "
                     f"{sorted(shapes)}; pad every device's sub-batch to the same budget")
  return GraphBatch(**{k: np.stack([getattr(b, k) for b in batches]) for k in _FIELDS})

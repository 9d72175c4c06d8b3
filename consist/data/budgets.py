"""Padding budgets and shape buckets from dataset statistics (STYLE lesson 2).

Everything here works on per-record size arrays (`Store.n_atoms`, memory-mapped, and edge counts
derived from it), never on decoded records, so it scales to PubChemQC-sized stores.

  * `estimate_budget`: one budget for `graphs_per_device` molecules: node and edge caps at a
    percentile of the sizes of random groups of that many molecules (like flax's ogbg_molpcba
    `estimate_padding_budget_for_batch_size`, which uses the mean), never below the largest molecule.
  * `make_buckets`: a few (2-4) budgets spaced geometrically between a low and a high percentile of
    those group sizes; the largest always fits the largest molecule. The pipeline packs each device
    batch greedily into the largest bucket, then pads it to the smallest bucket that holds it, so a run
    compiles at most `len(buckets)` shapes and light batches are not padded to the heaviest case.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np

from consist.data.batching import Budget
from consist.data.graph import count_edges
from consist.data.record import MoleculeRecord

NODE_MULTIPLE = 8
EDGE_MULTIPLE = 64


def full_graph_edge_counts(n_atoms: np.ndarray) -> np.ndarray:
  """int64 [n]: directed edges of the all-pairs graph, n(n-1) per molecule."""
  n = np.asarray(n_atoms, dtype=np.int64)
  return n * (n - 1)


def cutoff_edge_counts(records: Sequence[MoleculeRecord], cutoff: float) -> np.ndarray:
  """int64 [len(records)]: exact directed-edge counts of the radius graphs (reads every record)."""
  return np.fromiter((count_edges(records[i], cutoff) for i in range(len(records))), dtype=np.int64,
                     count=len(records))


def estimate_cutoff_edge_counts(n_atoms: np.ndarray, records: Sequence[MoleculeRecord], cutoff: float, *,
                                n_sample: int = 1000, quantile: float = 0.95, seed: int = 0) -> np.ndarray:
  """int64 [n]: per-record edge estimates for radius graphs from a random sample of records.

  Neighbours per atom are measured on `n_sample` records; each record's estimate is its atom count
  times the `quantile` of that per-atom neighbour count, capped at n(n-1). Good for sizing budgets;
  the pipeline packs with exact counts (`cutoff_edge_counts`).
  """
  n_atoms = np.asarray(n_atoms, dtype=np.int64)
  rng = np.random.default_rng(seed)
  sample = rng.choice(len(records), size=min(n_sample, len(records)), replace=False)
  per_atom = [count_edges(records[int(i)], cutoff) / records[int(i)].n_atoms for i in sample]
  k = float(np.quantile(per_atom, quantile))
  return np.minimum(np.ceil(n_atoms * k).astype(np.int64), full_graph_edge_counts(n_atoms))


def _round_up(x: float, multiple: int) -> int:
  return int(multiple * math.ceil(x / multiple))


def _group_sums(n_atoms: np.ndarray, n_edges: np.ndarray, graphs_per_device: int, n_groups: int,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Node and edge totals of `n_groups` random groups of `graphs_per_device` molecules."""
  rng = np.random.default_rng(seed)
  pick = rng.integers(0, len(n_atoms), size=(n_groups, graphs_per_device))
  return n_atoms[pick].sum(axis=1), n_edges[pick].sum(axis=1)


def _sizes(n_atoms, n_edges) -> tuple[np.ndarray, np.ndarray]:
  n_atoms = np.asarray(n_atoms, dtype=np.int64)
  n_edges = full_graph_edge_counts(n_atoms) if n_edges is None else np.asarray(n_edges, dtype=np.int64)
  if n_atoms.ndim != 1 or n_atoms.shape != n_edges.shape or n_atoms.size == 0:
    raise ValueError(f"need matching non-empty 1-D size arrays, got n_atoms {n_atoms.shape}, "
                     f"n_edges {n_edges.shape}")
  return n_atoms, n_edges


def estimate_budget(n_atoms: np.ndarray, graphs_per_device: int, *, n_edges: np.ndarray | None = None,
                    percentile: float = 90.0, n_groups: int = 2000, seed: int = 0) -> Budget:
  """One budget for `graphs_per_device` molecules per device.

  Args:
    n_atoms: int [n] atoms per record (`Store.n_atoms`).
    graphs_per_device: target molecules per device batch (n_graph = this + 1 padding graph).
    n_edges: int [n] edges per record; None = all-pairs graphs, n(n-1).
    percentile: cap of the node / edge totals of random groups; batches above it hold fewer graphs.
  """
  n_atoms, n_edges = _sizes(n_atoms, n_edges)
  nodes, edges = _group_sums(n_atoms, n_edges, graphs_per_device, n_groups, seed)
  n_node = max(np.percentile(nodes, percentile), n_atoms.max()) + 1
  n_edge = max(np.percentile(edges, percentile), n_edges.max())
  return Budget(_round_up(n_node, NODE_MULTIPLE), _round_up(n_edge, EDGE_MULTIPLE), graphs_per_device + 1)


@dataclasses.dataclass(frozen=True)
class Buckets:
  """A few budgets (increasing in n_node and n_edge, equal n_graph); a device batch is padded to the
  smallest that holds it. JSON-able (stored with the dataset / run)."""

  budgets: tuple[Budget, ...]

  def __post_init__(self):
    if not self.budgets:
      raise ValueError("Buckets: need at least one budget")
    b = self.budgets
    if any(x.n_node > y.n_node or x.n_edge > y.n_edge or x.n_graph != y.n_graph for x, y in zip(b, b[1:])):
      raise ValueError(f"Buckets must increase in n_node and n_edge and share n_graph: {b}")

  @property
  def largest(self) -> Budget:
    return self.budgets[-1]

  def bucket_of(self, n_node, n_edge) -> np.ndarray:
    """int [...]: index of the smallest bucket holding this real content (len(budgets) if none)."""
    caps_node = np.asarray([b.n_node - 1 for b in self.budgets])
    caps_edge = np.asarray([b.n_edge for b in self.budgets])
    return np.maximum(np.searchsorted(caps_node, n_node, side="left"),
                      np.searchsorted(caps_edge, n_edge, side="left"))

  def check_fits(self, n_atoms: np.ndarray, n_edges: np.ndarray,
                 mol_id_of: Callable[[int], str] | None = None) -> None:
    """Raises ValueError naming the first molecule (index, mol_id, n_atoms) the largest bucket cannot hold."""
    too_big = (np.asarray(n_atoms) > self.largest.n_node - 1) | (np.asarray(n_edges) > self.largest.n_edge)
    big = np.flatnonzero(too_big)
    if big.size:
      i = int(big[0])
      mol = f", mol_id={mol_id_of(i)!r}" if mol_id_of is not None else ""
      raise ValueError(f"molecule {i}{mol} with {int(n_atoms[i])} atoms and {int(n_edges[i])} edges does "
                       f"not fit the largest bucket {self.largest} ({big.size} such molecules); "
                       f"enlarge the buckets or use a radius cutoff")

  def to_json(self) -> dict:
    return {"budgets": [b.to_json() for b in self.budgets]}

  @classmethod
  def from_json(cls, d: dict) -> "Buckets":
    return cls(tuple(Budget.from_json(b) for b in d["budgets"]))


def make_buckets(n_atoms: np.ndarray, graphs_per_device: int, *, n_edges: np.ndarray | None = None,
                 n_buckets: int = 3, low_percentile: float = 50.0, high_percentile: float = 99.0,
                 n_groups: int = 2000, seed: int = 0) -> Buckets:
  """`n_buckets` budgets geometric between the `low_percentile` and `high_percentile` totals of random
  groups of `graphs_per_device` molecules; the largest never below the largest molecule."""
  if n_buckets < 1:
    raise ValueError(f"n_buckets must be >= 1, got {n_buckets}")
  n_atoms, n_edges = _sizes(n_atoms, n_edges)
  nodes, edges = _group_sums(n_atoms, n_edges, graphs_per_device, n_groups, seed)
  top_node = max(np.percentile(nodes, high_percentile), n_atoms.max()) + 1
  top_edge = max(np.percentile(edges, high_percentile), n_edges.max())
  if n_buckets == 1:
    node_sizes, edge_sizes = [top_node], [top_edge]
  else:
    low_node = min(np.percentile(nodes, low_percentile) + 1, top_node)
    low_edge = min(np.percentile(edges, low_percentile), top_edge)
    node_sizes = np.geomspace(low_node, top_node, n_buckets)
    edge_sizes = np.geomspace(max(low_edge, 1), max(top_edge, 1), n_buckets)
  budgets = sorted({Budget(_round_up(n, NODE_MULTIPLE), _round_up(e, EDGE_MULTIPLE), graphs_per_device + 1)
                    for n, e in zip(node_sizes, edge_sizes)})
  return Buckets(tuple(budgets))

"""Grain-based multi-host input pipeline: packing plan, per-host slices, checkpointable iterators.

How an epoch is built (the same on every host, so SPMD programs agree on step count and shapes):
  1. order: a permutation of all record indices from `np.random.default_rng([seed, epoch])`
     (training) or 0..n-1 (evaluation);
  2. greedy packing over that order into device batches: fill with up to n_graph - 1 molecules until
     the next molecule would overflow the largest bucket (`pack_greedy`, from the memory-mapped
     `Store.n_atoms` and edge counts only: no record is decoded);
  3. each device batch gets the smallest bucket that holds it; for training, device batches are sorted
     by bucket inside windows of `window_steps` steps and cut into steps of D_global device batches
     (so devices of one step mostly need the same bucket), and the steps of a window are shuffled;
     the step's bucket is the largest of its device batches. Training drops the last incomplete step;
     evaluation keeps every record, filling the last step with all-padding device batches;
  4. host p owns device slots [p * D_local, (p + 1) * D_local) of every step and reads only those
     records (`host_device_batches`).

Why not `grain.DataLoader` with an `IndexSampler` + `ShardByJaxProcess`: that samples and shards
*records*, but a step here is a packed group whose membership depends on the global packing plan, and
all hosts must agree on the number of steps and each step's bucket. So the plan is ours, and grain
provides what it is good at: a random-access `MapDataset` over the steps of an epoch (sliced to resume
mid-epoch) whose elements are built in background threads (`to_iter_dataset(ReadOptions)`). The
checkpointable state is then just {"epoch", "step"} (+ fingerprint fields checked on restore): the
plan is a pure function of (seed, epoch), so restoring rebuilds it and continues with exactly the
next batch, whatever was prefetched.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from consist.data.batching import batch_records, empty_batch, stack_device_batches
from consist.data.budgets import Buckets, cutoff_edge_counts, full_graph_edge_counts
from consist.data.reference import EnergyReference
from consist.types import GraphBatch

STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class EpochPlan:
  """The global packing plan of one epoch.

  Attributes:
    order: int64 [m] record indices in packing order.
    batch_start: int64 [b + 1] offsets into `order`: device batch k holds order[start[k]:start[k+1]].
    step_batches: int64 [steps, D_global] device batch of each device slot, -1 = all-padding.
    step_bucket: int64 [steps] bucket index of each step.
  """

  order: np.ndarray
  batch_start: np.ndarray
  step_batches: np.ndarray
  step_bucket: np.ndarray

  @property
  def n_steps(self) -> int:
    return int(self.step_batches.shape[0])

  def records_of(self, device_batch: int) -> np.ndarray:
    if device_batch < 0:
      return np.zeros(0, np.int64)
    return self.order[self.batch_start[device_batch]:self.batch_start[device_batch + 1]]


def pack_greedy(n_node: np.ndarray, n_edge: np.ndarray, max_graphs: int, max_nodes: int,
                max_edges: int) -> np.ndarray:
  """Greedy packing of molecules, in the given order, into batches of at most `max_graphs`
  molecules, `max_nodes` atoms and `max_edges` edges: a batch closes when the next molecule would not
  fit. Returns int64 [b + 1] batch offsets. O(b log m): binary searches in cumulative sums.

  Raises:
    ValueError: a single molecule exceeds the caps (callers check earlier, naming it).
  """
  m = len(n_node)
  cum_node = np.concatenate([[0], np.cumsum(n_node, dtype=np.int64)])
  cum_edge = np.concatenate([[0], np.cumsum(n_edge, dtype=np.int64)])
  starts = [0]
  s = 0
  while s < m:
    end = min(m, s + max_graphs,
              int(np.searchsorted(cum_node, cum_node[s] + max_nodes, side="right")) - 1,
              int(np.searchsorted(cum_edge, cum_edge[s] + max_edges, side="right")) - 1)
    if end <= s:
      raise ValueError(f"molecule at packing position {s} ({n_node[s]} atoms, {n_edge[s]} edges) exceeds "
                       f"{max_nodes} atoms / {max_edges} edges")
    starts.append(end)
    s = end
  return np.asarray(starts, dtype=np.int64)


def plan_epoch(n_atoms: np.ndarray, n_edges: np.ndarray, buckets: Buckets, n_devices: int, *, seed: int,
               epoch: int, shuffle: bool = True, drop_remainder: bool = True,
               window_steps: int = 16) -> EpochPlan:
  """The global plan of one epoch over all records (see the module docstring).

  Args:
    n_atoms, n_edges: int [n] per-record sizes.
    buckets: the budgets; every molecule must fit the largest (`Buckets.check_fits`).
    n_devices: D_global, device batches per step.
    seed, epoch: the plan is a pure function of these (and the sizes).
    shuffle: permute records and group device batches by bucket (training); else keep file order.
    drop_remainder: drop the last incomplete step (training); else pad it with empty device batches.
    window_steps: steps per bucket-sorting window (training).
  """
  rng = np.random.default_rng([seed, epoch])
  n = len(n_atoms)
  order = rng.permutation(n).astype(np.int64) if shuffle else np.arange(n, dtype=np.int64)
  top = buckets.largest
  batch_start = pack_greedy(np.asarray(n_atoms)[order], np.asarray(n_edges)[order], top.n_graph - 1,
                            top.n_node - 1, top.n_edge)
  cum_node = np.concatenate([[0], np.cumsum(np.asarray(n_atoms)[order], dtype=np.int64)])
  cum_edge = np.concatenate([[0], np.cumsum(np.asarray(n_edges)[order], dtype=np.int64)])
  batch_bucket = buckets.bucket_of(np.diff(cum_node[batch_start]), np.diff(cum_edge[batch_start]))
  n_batches = len(batch_start) - 1
  if drop_remainder:
    ids = np.arange(n_batches - n_batches % n_devices, dtype=np.int64)
    steps = []
    for w in range(0, len(ids), window_steps * n_devices):
      window = ids[w:w + window_steps * n_devices]
      window = window[np.argsort(batch_bucket[window], kind="stable")].reshape(-1, n_devices)
      steps.append(window[rng.permutation(len(window))] if shuffle else window)
    step_batches = np.concatenate(steps) if steps else np.zeros((0, n_devices), np.int64)
  else:
    n_steps = -(-n_batches // n_devices)
    step_batches = np.full(n_steps * n_devices, -1, np.int64)
    step_batches[:n_batches] = np.arange(n_batches)
    step_batches = step_batches.reshape(n_steps, n_devices)
  padded = np.where(step_batches >= 0, batch_bucket[np.maximum(step_batches, 0)], 0)
  step_bucket = padded.max(axis=1) if len(padded) else np.zeros(0, np.int64)
  return EpochPlan(order, batch_start, step_batches, step_bucket.astype(np.int64))


def host_device_batches(plan: EpochPlan, step: int, process_index: int,
                        process_count: int) -> list[np.ndarray]:
  """Record indices of each of this host's device slots at `step` (the only records it reads)."""
  n_devices = plan.step_batches.shape[1]
  if n_devices % process_count:
    raise ValueError(f"{n_devices} devices per step do not split evenly over {process_count} processes")
  local = n_devices // process_count
  slots = plan.step_batches[step, process_index * local:(process_index + 1) * local]
  return [plan.records_of(int(k)) for k in slots]


@dataclasses.dataclass(frozen=True)
class HostBatch:
  """One step's data on this host.

  Attributes:
    graphs: GraphBatch with numpy leaves [D_local, ...] (one padded sub-batch per local device).
    record_index: int64 [D_local, n_graph] source index of each graph, -1 for padding graphs.
    epoch, step: position of this batch (step within the epoch).
    bucket: index of the budget in `Buckets.budgets`.
  """

  graphs: GraphBatch
  record_index: np.ndarray
  epoch: int
  step: int
  bucket: int


class InputPipeline:
  """Packed, padded, per-host batches over a random-access record source (a `Store` or a list).

  Args:
    source: `__len__`, `__getitem__ -> MoleculeRecord`, and ideally `n_atoms` (int [n]); without
      `n_atoms` the sizes are read from every record once.
    buckets: budgets (`consist.data.budgets.make_buckets` / `estimate_budget` in a 1-tuple).
    fidelities: the fidelity vocabulary (`Dataset.fidelities`).
    energy_reference: subtracted from energies (float64) before batching.
    cutoff: radius graph cutoff in Å, None = all pairs.
    n_edges: int [n] exact edge counts; default n(n-1), or counted once when `cutoff` is set.
    seed: shuffling seed.
    process_index, process_count, local_device_count: default from jax; D_global = count * local.
    num_threads, prefetch: grain background threads / buffered steps.
  """

  def __init__(self, source: Sequence, buckets: Buckets, *, fidelities: Sequence[str],
               energy_reference: EnergyReference | None = None, cutoff: float | None = None,
               n_edges: np.ndarray | None = None, seed: int = 0, window_steps: int = 16,
               process_index: int | None = None, process_count: int | None = None,
               local_device_count: int | None = None, num_threads: int = 2, prefetch: int = 4):
    self.source = source
    self.buckets = buckets
    self.fidelities = tuple(fidelities)
    self.energy_reference = energy_reference
    self.cutoff = cutoff
    self.seed = int(seed)
    self.window_steps = window_steps
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    self.local_device_count = jax.local_device_count() if local_device_count is None else local_device_count
    self.n_devices = self.process_count * self.local_device_count
    self.read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    n_atoms = getattr(source, "n_atoms", None)
    if n_atoms is None:
      n_atoms = np.fromiter((source[i].n_atoms for i in range(len(source))), np.int64, count=len(source))
    self.n_atoms = np.asarray(n_atoms, dtype=np.int64)
    if n_edges is None:
      n_edges = full_graph_edge_counts(self.n_atoms) if cutoff is None else cutoff_edge_counts(source, cutoff)
    self.n_edges = np.asarray(n_edges, dtype=np.int64)
    if self.n_edges.shape != self.n_atoms.shape:
      raise ValueError(f"n_edges has shape {self.n_edges.shape}, expected {self.n_atoms.shape}")
    buckets.check_fits(self.n_atoms, self.n_edges, lambda i: source[i].mol_id)
    self._plans: dict[tuple[int, bool], EpochPlan] = {}

  def plan(self, epoch: int, *, train: bool = True) -> EpochPlan:
    """The global plan of `epoch` (cached for the latest epoch of each kind)."""
    key = (epoch, train)
    if key not in self._plans:
      self._plans = {k: v for k, v in self._plans.items() if k[1] != train}
      self._plans[key] = plan_epoch(self.n_atoms, self.n_edges, self.buckets, self.n_devices, seed=self.seed,
                                    epoch=epoch, shuffle=train, drop_remainder=train,
                                    window_steps=self.window_steps)
    return self._plans[key]

  def steps_per_epoch(self, epoch: int = 0) -> int:
    return self.plan(epoch).n_steps

  def load_step(self, plan: EpochPlan, epoch: int, step: int) -> HostBatch:
    """Reads and pads this host's records of `step` (numpy)."""
    budget = self.buckets.budgets[int(plan.step_bucket[step])]
    graphs, index = [], np.full((self.local_device_count, budget.n_graph), -1, np.int64)
    for d, idx in enumerate(host_device_batches(plan, step, self.process_index, self.process_count)):
      records = [self.source[int(i)] for i in idx]
      graphs.append(batch_records(records, budget, fidelities=self.fidelities,
                                  energy_reference=self.energy_reference, cutoff=self.cutoff)
                    if records else empty_batch(budget))
      index[d, :len(idx)] = idx
    return HostBatch(stack_device_batches(graphs), index, epoch, step, int(plan.step_bucket[step]))

  def _epoch_steps(self, epoch: int, start: int, train: bool) -> Iterator[HostBatch]:
    plan = self.plan(epoch, train=train)
    ds = grain.MapDataset.range(plan.n_steps)[start:].map(lambda s: self.load_step(plan, epoch, int(s)))
    return iter(ds.to_iter_dataset(self.read_options))

  def train_iterator(self, state: dict | None = None) -> "TrainIterator":
    """Endless shuffled iterator over epochs; `state` from `TrainIterator.state` resumes exactly."""
    return TrainIterator(self, state)

  def eval_iterator(self) -> Iterator[HostBatch]:
    """Every record exactly once in source order; the last step is filled with padding graphs. Use
    `HostBatch.record_index` to map predictions back."""
    return self._epoch_steps(0, 0, train=False)

  def fingerprint(self) -> dict[str, Any]:
    return {"version": STATE_VERSION, "seed": self.seed, "n_records": len(self.n_atoms),
            "n_devices": self.n_devices, "buckets": self.buckets.to_json()}


class TrainIterator:
  """Iterator of training `HostBatch`es whose `state` (a small JSON-able dict) names the next batch."""

  def __init__(self, pipeline: InputPipeline, state: dict | None = None):
    self._pipeline = pipeline
    self._epoch, self._step = 0, 0
    if state is not None:
      expected = pipeline.fingerprint()
      diff = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
      if diff:
        raise ValueError(f"input pipeline state does not match this pipeline (saved, current): {diff}")
      self._epoch, self._step = int(state["epoch"]), int(state["step"])
    self._it: Iterator[HostBatch] | None = None

  @property
  def state(self) -> dict[str, Any]:
    """{"epoch", "step"} of the next batch, plus the fingerprint checked on restore."""
    return {**self._pipeline.fingerprint(), "epoch": self._epoch, "step": self._step}

  def __iter__(self) -> "TrainIterator":
    return self

  def __next__(self) -> HostBatch:
    if self._step >= self._pipeline.steps_per_epoch(self._epoch):
      if self._step == 0:
        raise ValueError(f"epoch {self._epoch} has no complete step: {len(self._pipeline.n_atoms)} records "
                         f"do not fill {self._pipeline.n_devices} device batches")
      self._epoch, self._step, self._it = self._epoch + 1, 0, None
    if self._it is None:
      self._it = self._pipeline._epoch_steps(self._epoch, self._step, train=True)
    batch = next(self._it)
    assert (batch.epoch, batch.step) == (self._epoch, self._step)
    self._step += 1
    return batch


def to_global(batch: GraphBatch, mesh: jax.sharding.Mesh, axis: str = "data") -> GraphBatch:
  """Host-local [D_local, ...] numpy leaves -> global jax arrays [D_global, ...] sharded on `axis`."""
  sharding = NamedSharding(mesh, P(axis))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)

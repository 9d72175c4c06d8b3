"""A small real world for trainer tests: random molecules with Morse-pair labels and a tiny flax model.

The model is an invariant pairwise-distance energy (per-pair MLP of a Gaussian radial basis and the
two elements, summed per graph) with forces = -dE/dR by jax.grad — small enough that the parallel and
checkpoint tests compile in seconds, yet a real model trained by the real train step.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from consist.data.batching import Budget, batch_records, stack_device_batches
from consist.data.record import MoleculeRecord
from consist.types import GraphBatch

ELEMENTS = (1, 6, 8)
FIDELITY = "toy-morse"


def morse_energy_forces(z: np.ndarray, pos: np.ndarray) -> tuple[float, np.ndarray]:
  """Morse pair energy (eV) with element-dependent rest lengths, and its forces (eV/Å)."""
  r0 = 0.7 + 0.05 * (z[:, None] + z[None, :]) ** 0.5
  d = pos[:, None, :] - pos[None, :, :]
  r = np.linalg.norm(d, axis=-1)
  np.fill_diagonal(r, 1.0)
  x = np.exp(-1.5 * (r - r0))
  pair = (1.0 - x) ** 2 - 1.0
  np.fill_diagonal(pair, 0.0)
  de_dr = 2.0 * (1.0 - x) * 1.5 * x
  np.fill_diagonal(de_dr, 0.0)
  forces = -np.sum((de_dr / r)[:, :, None] * d, axis=1)
  return 0.5 * float(pair.sum()), forces


def toy_records(n: int, seed: int, *, min_atoms: int = 3, max_atoms: int = 7) -> list[MoleculeRecord]:
  """`n` random molecules (a random walk of 1.0-1.5 Å steps), every 3rd with force labels."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    k = int(rng.integers(min_atoms, max_atoms + 1))
    while True:
      steps = rng.normal(size=(k, 3))
      steps *= rng.uniform(1.0, 1.5, size=(k, 1)) / np.linalg.norm(steps, axis=1, keepdims=True)
      pos = np.cumsum(steps, axis=0)
      r = np.linalg.norm(pos[:, None] - pos[None], axis=-1) + 10 * np.eye(k)
      if r.min() > 0.9:
        break
    z = rng.choice(ELEMENTS, size=k).astype(np.int32)
    energy, forces = morse_energy_forces(z, pos)
    out.append(MoleculeRecord(
        mol_id=f"toy-{seed}-{i}", atomic_numbers=z, positions=pos.astype(np.float32), energy=energy,
        forces=forces.astype(np.float32) if i % 3 == 0 else None, label_fidelity=FIDELITY,
        is_equilibrium=i % 2 == 0, structure_fidelity=FIDELITY).validate(f"toy_records[{i}]"))
  return out


def device_batches(records, budget: Budget, n_devices: int, graphs_per_device: int) -> GraphBatch:
  """The first n_devices * graphs_per_device records as a [n_devices, ...] numpy batch."""
  subs = [batch_records(records[d * graphs_per_device:(d + 1) * graphs_per_device], budget,
                        fidelities=[FIDELITY]) for d in range(n_devices)]
  return stack_device_batches(subs)


class ToyEnergy(nn.Module):
  """E(G, R) = sum over real directed edges of MLP(rbf(|r_ij|), emb(Z_i), emb(Z_j)) / 2 per graph."""

  features: int = 16

  @nn.compact
  def __call__(self, batch: GraphBatch, positions: jax.Array) -> jax.Array:
    d = positions[batch.senders] - positions[batch.receivers]
    r2 = jnp.sum(d * d, axis=-1)
    safe = jnp.where(batch.edge_mask, r2, 1.0)
    r = jnp.sqrt(safe)
    centers = jnp.linspace(0.5, 5.0, 8)
    rbf = jnp.exp(-4.0 * (r[:, None] - centers[None, :]) ** 2)
    emb = nn.Embed(10, self.features)
    zi, zj = emb(batch.atomic_numbers[batch.senders]), emb(batch.atomic_numbers[batch.receivers])
    h = nn.Dense(self.features)(rbf) * (zi + zj)
    h = nn.Dense(1)(nn.silu(nn.Dense(self.features)(nn.silu(h))))[:, 0]
    h = jnp.where(batch.edge_mask, h, 0.0)
    edge_graph = batch.node_graph[batch.senders]
    return 0.5 * jax.ops.segment_sum(h, edge_graph, num_segments=batch.num_graphs)


MODEL = ToyEnergy()


def init_fn(rng: jax.Array, batch: GraphBatch):
  return MODEL.init(rng, batch, batch.positions)


def energy_and_forces(params, batch: GraphBatch):
  def total(pos):
    e = MODEL.apply(params, batch, pos)
    return jnp.sum(jnp.where(batch.graph_mask, e, 0.0)), e

  (_, energy), grad = jax.value_and_grad(total, has_aux=True)(batch.positions)
  return energy, -grad


def _masked_mean(per_graph, mask):
  return jnp.sum(jnp.where(mask, per_graph, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def loss_fn(params, batch: GraphBatch, rng: jax.Array):
  """Energy MSE + force MSE (per-graph means); the key jitters the energy weight to exercise rng."""
  energy, forces = energy_and_forces(params, batch)
  e_mse = _masked_mean((energy - batch.energy) ** 2, batch.energy_mask & batch.graph_mask)
  err = jnp.sum((forces - batch.forces) ** 2, axis=-1) / 3.0
  f_graph = jax.ops.segment_sum(jnp.where(batch.node_mask, err, 0.0), batch.node_graph,
                                num_segments=batch.num_graphs) / jnp.maximum(batch.n_node, 1)
  f_mse = _masked_mean(f_graph, batch.forces_mask & batch.graph_mask)
  w = 1.0 + 0.1 * jax.random.uniform(rng)
  return w * e_mse + f_mse, {"energy_mse": e_mse, "forces_mse": f_mse}


def metrics_fn(params, batch: GraphBatch, rng: jax.Array):
  return loss_fn(params, batch, rng)[1]


def write_synthetic_dataset(path, *, per_molecule: int = 6, forces: bool = True, seed: int = 0,
                            energy_outlier: int | None = None) -> str:
  """A small dataset of the synthetic world (consist.synthetic) through the real DatasetWriter:
  train = cheap minima + off-equilibrium kicks, val = cheap minima (+ kicks of another seed).
  `energy_outlier`: index of a train record whose energy becomes 1e9 eV (the largest the store
  accepts: finite, but its squared error times a large weight overflows float32)."""
  from consist import synthetic  # noqa: PLC0415  (RDKit embedding; only the trainer tests need it)
  from consist.data.store import DatasetWriter  # noqa: PLC0415

  world = synthetic.make_world(seed=seed)
  rng = np.random.default_rng(seed)
  train = world.equilibrium_records() + world.off_equilibrium_records(per_molecule, rng)
  val = world.equilibrium_records() + world.off_equilibrium_records(1, np.random.default_rng(seed + 1))
  if energy_outlier is not None:
    train[energy_outlier] = train[energy_outlier].replace(energy=1e9)
  with DatasetWriter(path, attrs={"source": "tests: synthetic world"}) as writer:
    for name, records in (("train", train), ("val", val)):
      split = writer.split(name)
      for i, r in enumerate(records):
        split.append(r if forces else r.replace(forces=None), where=f"{name}[{i}]")
  return str(path)

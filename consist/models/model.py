"""`Model`: shared encoder + energy head + structure head, and pure functions over its params.

The params tree is `{"encoder": ..., "energy_head": ..., "structure_head": ...}`, so losses can
route gradients by subtree (`consist.losses.total`). Energy queries run the encoder at t = 0 with
the "energy" task; structure queries at the diffusion time with the "structure" task.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from consist.models.config import ModelConfig
from consist.models.encoder import TASK_ENERGY, TASK_STRUCTURE, Encoder
from consist.models.heads import EnergyHead, StructureHead
from consist.types import GraphBatch

PARAM_SUBTREES = ("encoder", "energy_head", "structure_head")


class Model(nn.Module):
  config: ModelConfig

  def setup(self):
    self.encoder = Encoder(self.config)
    self.energy_head = EnergyHead(self.config)
    self.structure_head = StructureHead(self.config)

  def energy(self, batch: GraphBatch, positions_N3: jax.Array) -> jax.Array:
    """Energy [G], eV (0 on padding graphs)."""
    t_G = jnp.zeros(batch.graph_mask.shape, positions_N3.dtype)
    return self.energy_head(batch, self.encoder(batch, positions_N3, t_G, TASK_ENERGY))

  def structure(self, batch: GraphBatch, positions_N3: jax.Array, t_G: jax.Array) -> jax.Array:
    """Raw structure-head output [N, 3] at (noisy) positions in Å and diffusion time t [G]."""
    return self.structure_head(batch, self.encoder(batch, positions_N3, t_G, TASK_STRUCTURE),
                               positions_N3)

  def __call__(self, batch: GraphBatch, positions_N3: jax.Array, t_G: jax.Array):
    return self.energy(batch, positions_N3), self.structure(batch, positions_N3, t_G)


def model_for_dataset(config: ModelConfig, fidelities: Sequence[str]) -> Model:
  """`config`'s model with one energy offset per fidelity of the dataset (at least one)."""
  return Model(dataclasses.replace(config, num_fidelities=max(len(fidelities), 1)))


def init_params(model: Model, rng: jax.Array, batch: GraphBatch) -> dict:
  """Params for `model`, shaped by one (device) batch."""
  positions = jnp.asarray(batch.positions)
  t_G = jnp.zeros(batch.graph_mask.shape, positions.dtype)
  return model.init(rng, batch, positions, t_G)["params"]


def energy(model: Model, params: dict, batch: GraphBatch, positions_N3: jax.Array) -> jax.Array:
  """Energy [G], eV, at `positions_N3` (Å)."""
  return model.apply({"params": params}, batch, positions_N3, method=Model.energy)


def energy_and_forces(model: Model, params: dict, batch: GraphBatch,
                      positions_N3: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(energy [G] eV, forces [N, 3] eV/Å); forces = -d(sum of energies)/dR by `jax.value_and_grad`.

  Padding graphs contribute 0 to the sum, and padding nodes get force 0.
  """
  positions = batch.positions if positions_N3 is None else positions_N3

  def total(pos):
    e_G = energy(model, params, batch, pos)
    return jnp.sum(e_G), e_G

  (_, e_G), grad = jax.value_and_grad(total, has_aux=True)(positions)
  return e_G, jnp.where(batch.node_mask[:, None], -grad, 0.0)


def structure_output(model: Model, params: dict, batch: GraphBatch, positions_N3: jax.Array,
                     t_G: jax.Array) -> jax.Array:
  """Raw structure-head output [N, 3] (eps or x0 displacement, see `ModelConfig.prediction`)."""
  return model.apply({"params": params}, batch, positions_N3, t_G, method=Model.structure)

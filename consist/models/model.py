"""`Model`: the energy model + the structure model (encoder + head), and pure functions over params.

The params tree is `{"energy_model": ..., "encoder": ..., "structure_head": ...}`, plus, with
`ModelConfig.level_params == "increment"`, `"level_increment": {"<l>": {"encoder": ...,
"structure_head": ...}}` for each structure level l >= 1, so losses can route gradients by subtree
(`consist.losses.total`). The energy model (`consist.models.mace.MACE`)
does not depend on the diffusion time; the structure encoder is conditioned on it and, with
`ModelConfig.trunk == "shared"`, also reads the energy model's node features.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from consist.models.config import ModelConfig
from consist.models.encoder import Encoder
from consist.models.heads import StructureHead
from consist.models.mace import MACE
from consist.types import GraphBatch

STRUCTURE_SUBTREES = ("encoder", "structure_head")
LEVEL_INCREMENT = "level_increment"


class Model(nn.Module):
  config: ModelConfig

  def setup(self):
    self.energy_model = MACE(self.config.energy, self.config.num_fidelities)
    self.encoder = Encoder(self.config)
    self.structure_head = StructureHead(self.config)

  def energy(self, batch: GraphBatch, positions_N3: jax.Array) -> jax.Array:
    """Energy [G], eV relative to the dataset's reference (0 on padding graphs)."""
    return self.energy_model(batch, positions_N3)

  def structure(self, batch: GraphBatch, positions_N3: jax.Array, t_G: jax.Array,
                level_G: jax.Array | None = None) -> jax.Array:
    """Raw structure-head output [N, 3] at (noisy) positions in Å, diffusion time t [G] and
    structure level [G] (None: level 0)."""
    shared = None
    if self.config.trunk == "shared":
      shared = self.energy_model.features(batch, positions_N3)
    return self.structure_head(batch, self.encoder(batch, positions_N3, t_G, level_G, shared),
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
  params = model.init(rng, batch, positions, t_G)["params"]
  if model.config.level_params == "increment":
    zeros = {k: jax.tree.map(jnp.zeros_like, params[k]) for k in STRUCTURE_SUBTREES}
    params = dict(params, **{LEVEL_INCREMENT: {str(l): zeros for l in range(1, model.config.structure_levels)}})
  return params



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


def level_params(params: dict, level: int) -> dict:
  """The params level `level` runs with: with level increments, the structure model's plus the
  level's increment (level 0: its own); the increments themselves are dropped."""
  increments = params.get(LEVEL_INCREMENT)
  if increments is None:
    return params
  params = {k: v for k, v in params.items() if k != LEVEL_INCREMENT}
  if level == 0:
    return params
  inc = increments[str(level)]
  return dict(params, **{k: jax.tree.map(jnp.add, params[k], inc[k]) for k in STRUCTURE_SUBTREES})


def structure_output(model: Model, params: dict, batch: GraphBatch, positions_N3: jax.Array,
                     t_G: jax.Array, level: int = 0) -> jax.Array:
  """Raw structure-head output [N, 3] (eps, x0 displacement or F: `ModelConfig.prediction`) at
  structure level `level` (every graph)."""
  level_G = jnp.full(t_G.shape, level, jnp.int32) if model.config.structure_levels > 1 else None
  return model.apply({"params": level_params(params, level)}, batch, positions_N3, t_G, level_G,
                     method=Model.structure)

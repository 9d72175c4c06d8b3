"""The structure head (equivariant per-atom 1o vector) and per-graph reductions."""

from __future__ import annotations

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp

from consist.models.config import ModelConfig
from consist.models.encoder import Interaction, edge_features, gated_irreps, hidden_irreps
from consist.types import GraphBatch


def segment_sum_graphs(values_N: jax.Array, batch: GraphBatch) -> jax.Array:
  """Sum of per-node values (leading axis N) over each graph's real nodes -> [G, ...]."""
  mask = batch.node_mask.reshape(batch.node_mask.shape + (1,) * (values_N.ndim - 1))
  return jax.ops.segment_sum(jnp.where(mask, values_N, 0), batch.node_graph,
                             num_segments=batch.num_graphs)


def remove_mean(vectors_N3: jax.Array, batch: GraphBatch) -> jax.Array:
  """Subtracts each graph's mean over its real atoms (the centroid); padding rows become 0."""
  counts = jnp.maximum(segment_sum_graphs(jnp.ones_like(vectors_N3[:, 0]), batch), 1.0)
  means = segment_sum_graphs(vectors_N3, batch) / counts[:, None]
  return jnp.where(batch.node_mask[:, None], vectors_N3 - means[batch.node_graph], 0.0)


class StructureHead(nn.Module):
  """Per-atom 1o vector [N, 3] (xyz), centroid removed per graph, 0 on padding nodes.

  Has its own message-passing layer over the (noisy) geometry, so consistency terms restricted to
  the structure head ("structure_head" routing) still have the capacity to move structures.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, batch: GraphBatch, features: e3nn.IrrepsArray,
               positions_N3: jax.Array) -> jax.Array:
    irreps = hidden_irreps(self.config)
    sh, edge_scalars, edge_weight = edge_features(self.config, batch, positions_N3)
    x = Interaction(self.config, name="interaction")(features, sh, edge_scalars, edge_weight,
                                                     batch.senders, batch.receivers)
    x = e3nn.flax.Linear(gated_irreps(irreps), force_irreps_out=True, name="hidden")(x)
    x = e3nn.gate(x, even_act=jax.nn.silu, even_gate_act=jax.nn.sigmoid)
    vectors = e3nn.flax.Linear("1x1o", force_irreps_out=True, name="out")(x).array
    return remove_mean(vectors, batch)

"""Per-molecule normalisation: segment mean over a graph's real atoms, mean over labelled graphs."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from consist.models.heads import segment_sum_graphs
from consist.types import GraphBatch


def graph_mean(values_N: jax.Array, batch: GraphBatch) -> jax.Array:
  """Mean of per-node values [N] over each graph's real atoms -> [G] (0 for empty graphs)."""
  counts = segment_sum_graphs(jnp.ones_like(values_N), batch)
  return segment_sum_graphs(values_N, batch) / jnp.maximum(counts, 1.0)


def masked_mean(values_G: jax.Array, mask_G: jax.Array) -> jax.Array:
  """Mean of values over graphs where mask is True; 0 when no graph has the label."""
  mask = mask_G.astype(values_G.dtype)
  return jnp.sum(jnp.where(mask_G, values_G, 0.0)) / jnp.maximum(jnp.sum(mask), 1.0)


def num_atoms(batch: GraphBatch, dtype=jnp.float32) -> jax.Array:
  """Real atoms per graph [G]."""
  return segment_sum_graphs(jnp.ones(batch.node_mask.shape, dtype), batch)

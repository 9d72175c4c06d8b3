"""The structure model's E(3)-equivariant encoder: message passing over a `GraphBatch` (e3nn-jax).

Inputs per node: atom type (embedding) and, with a shared trunk, the energy model's invariant node
features; per edge: bond order (one-hot + value), with `topology_hops` the pair's topological
distance (one-hot of 2 ... topology_hops bonds apart, and a flag for further), distance (Gaussian
radial basis) and direction
(spherical harmonics up to `max_l`, `1o` in xyz order); per graph: the diffusion time t (sinusoidal
embedding) and the structure level asked for (`ModelConfig.structure_levels`), added to the initial
node scalars. Output: per-node irreps
`channels x 0e + vector_channels x (1o + 2e + ...)`.

Padding: padding edges have length exactly 0 and padding nodes sit at the origin. Distances use a
double-`where` safe norm, so values, gradients and second derivatives w.r.t. positions are finite;
padding edges carry no message (`edge_mask`), and padding nodes never send to real nodes.
"""

from __future__ import annotations

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp

from consist.data.record import MAX_Z
from consist.models.config import ModelConfig
from consist.types import GraphBatch

# Bond-order categories of `GraphBatch.bond_order` (0 = not bonded, 1.5 = aromatic).
BOND_ORDERS = (0.0, 1.0, 1.5, 2.0, 3.0)


def hidden_irreps(config: ModelConfig) -> e3nn.Irreps:
  """`channels x 0e + vector_channels x 1o + vector_channels x 2e ...` (parity (-1)^l)."""
  terms = [f"{config.channels}x0e"]
  terms += [f"{config.vector_channels}x{l}{'e' if l % 2 == 0 else 'o'}"
            for l in range(1, config.max_l + 1)]
  return e3nn.Irreps("+".join(terms))


def gated_irreps(irreps: e3nn.Irreps) -> e3nn.Irreps:
  """Irreps that `e3nn.gate` maps to `irreps`: the scalars, one gate per non-scalar, non-scalars."""
  scalars = irreps.filter(keep=["0e"])
  vectors = irreps.filter(drop=["0e"])
  return (scalars + e3nn.Irreps(f"{vectors.num_irreps}x0e") + vectors).simplify()


def safe_edge_geometry(vectors_E3: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(lengths [E] in Å, unit vectors [E, 3]); zero-length edges give length 0 and vector 0.

  Double `where`: the square root only ever sees positive arguments, so derivatives of any order
  are finite at zero-length (padding) edges.
  """
  r2 = jnp.sum(vectors_E3**2, axis=-1)
  nonzero = r2 > 0.0
  r2_safe = jnp.where(nonzero, r2, 1.0)
  lengths = jnp.where(nonzero, jnp.sqrt(r2_safe), 0.0)
  units = vectors_E3 / jnp.sqrt(r2_safe)[:, None]
  return lengths, units


def time_embedding(t_G: jax.Array, num_frequencies: int) -> jax.Array:
  """Sinusoidal embedding of t in [0, 1]: [G] -> [G, 2 * num_frequencies]."""
  freqs = jnp.pi * 2.0 ** jnp.arange(num_frequencies, dtype=t_G.dtype)
  angles = t_G[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def edge_features(config: ModelConfig, batch: GraphBatch, positions_N3: jax.Array):
  """(spherical harmonics [E, irreps], edge scalars [E, F], edge weight [E]) at positions (Å).

  Edge scalars: Gaussian radial basis of the length + bond-order one-hot + bond order (+ with
  `topology_hops` H: one-hot of 2 ... H bonds apart, and a flag for pairs further apart). Weight: 1
  on bonded edges (and on pairs up to H bonds apart), the smooth cutoff envelope on the others, 0 on
  padding edges: a noised structure keeps its local topology whatever its distances.
  """
  dtype = positions_N3.dtype
  vectors = positions_N3[batch.receivers] - positions_N3[batch.senders]
  lengths, units = safe_edge_geometry(vectors)
  sh = e3nn.spherical_harmonics(e3nn.Irreps.spherical_harmonics(config.max_l), units,
                                normalize=False, normalization="component")
  centers = jnp.linspace(0.0, config.cutoff, config.num_radial, dtype=dtype)
  width = config.cutoff / config.num_radial
  radial = jnp.exp(-(((lengths[:, None] - centers[None, :]) / width) ** 2))
  bond_one_hot = (batch.bond_order[:, None] == jnp.asarray(BOND_ORDERS)[None, :]).astype(dtype)
  parts = [radial, bond_one_hot, batch.bond_order[:, None].astype(dtype)]
  bonded = batch.bond_order > 0
  if config.topology_hops > 1:
    hops = jnp.arange(2, config.topology_hops + 1)
    parts += [(batch.bond_hops[:, None] == hops[None, :]).astype(dtype),
              (batch.bond_hops > config.topology_hops)[:, None].astype(dtype)]
    bonded = bonded | ((batch.bond_hops > 0) & (batch.bond_hops <= config.topology_hops))
  edge_scalars = jnp.concatenate(parts, axis=-1)
  envelope = e3nn.poly_envelope(5, 2)(lengths / config.cutoff)
  edge_weight = jnp.where(bonded, 1.0, envelope) * batch.edge_mask
  return sh, edge_scalars, edge_weight


class Interaction(nn.Module):
  """One message-passing layer: x_j (x) Y(r_ij) weighted by an MLP of the edge scalars, gated."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: e3nn.IrrepsArray, sh: e3nn.IrrepsArray, edge_scalars: jax.Array,
               edge_weight: jax.Array, senders: jax.Array, receivers: jax.Array) -> e3nn.IrrepsArray:
    cfg = self.config
    out_irreps = hidden_irreps(cfg)
    gate_in = gated_irreps(out_irreps)
    x_mixed = e3nn.flax.Linear(x.irreps, name="pre_linear")(x)
    messages = e3nn.tensor_product(x_mixed[senders], sh, filter_ir_out=out_irreps)
    weights = e3nn.flax.MultiLayerPerceptron(
        (cfg.radial_hidden, messages.irreps.num_irreps), act=jax.nn.silu,
        output_activation=False, name="radial_mlp")(edge_scalars)
    messages = messages * (weights * edge_weight[:, None])
    aggregated = e3nn.scatter_sum(messages, dst=receivers, output_size=x.shape[0])
    aggregated = aggregated / jnp.sqrt(cfg.avg_num_neighbors)
    y = (e3nn.flax.Linear(gate_in, force_irreps_out=True, name="message_linear")(aggregated)
         + e3nn.flax.Linear(gate_in, force_irreps_out=True, name="self_linear")(x))
    y = e3nn.gate(y, even_act=jax.nn.silu, even_gate_act=jax.nn.sigmoid)
    if y.irreps == x.irreps:
      y = y + x
    return y


class Encoder(nn.Module):
  """Call with (batch, positions [N, 3] Å, t [G], level [G] int or None (= 0), optional extra node
  scalars [N, F])."""

  config: ModelConfig

  @nn.compact
  def __call__(self, batch: GraphBatch, positions_N3: jax.Array, t_G: jax.Array,
               level_G: jax.Array | None = None,
               node_features: jax.Array | None = None) -> e3nn.IrrepsArray:
    cfg = self.config
    dtype = positions_N3.dtype
    # Node scalars: atom type (+ projected extra features) + time conditioning of the node's graph.
    h = nn.Embed(MAX_Z + 1, cfg.channels, name="atom_embedding")(batch.atomic_numbers).astype(dtype)
    if node_features is not None:
      h = h + nn.Dense(cfg.channels, name="node_features")(node_features.astype(dtype))
    cond = e3nn.flax.MultiLayerPerceptron((cfg.channels, cfg.channels), act=jax.nn.silu,
                                          output_activation=False, name="time_mlp")(
        time_embedding(t_G.astype(dtype), cfg.time_frequencies))
    if cfg.structure_levels > 1:
      # Level l > 0: a learned offset of the conditioning, zero at init (level 0 has none).
      offsets = self.param("level_embedding", nn.initializers.zeros,
                           (cfg.structure_levels - 1, cfg.channels), dtype)
      if level_G is not None:
        table = jnp.concatenate([jnp.zeros((1, cfg.channels), dtype), offsets.astype(dtype)])
        cond = cond + table[level_G]
    h = h + cond[batch.node_graph].astype(dtype)
    x = e3nn.IrrepsArray(f"{cfg.channels}x0e", h)

    sh, edge_scalars, edge_weight = edge_features(cfg, batch, positions_N3)
    for i in range(cfg.num_layers):
      x = Interaction(cfg, name=f"interaction_{i}")(
          x, sh, edge_scalars, edge_weight, batch.senders, batch.receivers)
    return x

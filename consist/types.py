"""The padded graph batch every model, loss and train step consumes.

Shapes: N = node budget, E = edge budget, G = graph budget (at least one padding graph). On the
train path every leaf gets a leading device axis `[D, ...]`: each device's sub-batch is padded to the
same budget and the sub-batches are stacked (STYLE lesson 2). Model and loss code sees one device's
sub-batch (no leading axis) inside `shard_map`.

Padding conventions (relied on by all code, tested in tests/test_batching.py):
  * padding nodes have `atomic_numbers == 0`, `node_mask == False`, positions 0, and belong to the
    last graph (`node_graph == G - 1`), which is always a padding graph;
  * padding edges have `edge_mask == False` and connect the last node (a padding node) to itself,
    so their length is exactly 0 — model code must be NaN-safe there;
  * labels of padding graphs / nodes are 0 and their `*_mask` False;
  * `energy` is the total energy minus the fitted per-element / per-fidelity reference
    (`consist.data.reference.EnergyReference`), computed in float64 on the host, stored float32.
"""

from __future__ import annotations

import flax.struct
import jax


@flax.struct.dataclass
class GraphBatch:
  """One (or, with a leading axis, D stacked) padded batch of molecular graphs."""

  # --- nodes [N] ---
  atomic_numbers: jax.Array  # int32 [N], 0 for padding
  positions: jax.Array  # float32 [N, 3], Å
  node_mask: jax.Array  # bool [N]
  node_graph: jax.Array  # int32 [N], graph index of each node
  # --- edges [E] (directed; both directions present) ---
  senders: jax.Array  # int32 [E]
  receivers: jax.Array  # int32 [E]
  edge_mask: jax.Array  # bool [E]
  bond_order: jax.Array  # float32 [E]: 0 = not bonded, 1, 1.5 (aromatic), 2, 3
  bond_hops: jax.Array  # int32 [E]: bonds on the shortest path between the pair (1 = bonded), 0 = none
  # --- graphs [G] ---
  graph_mask: jax.Array  # bool [G]
  n_node: jax.Array  # int32 [G]
  charge: jax.Array  # int32 [G]
  fidelity: jax.Array  # int32 [G]: index of label_fidelity in the dataset's fidelity vocabulary
  # --- labels (each with its availability mask) ---
  energy: jax.Array  # float32 [G], eV, relative to the fitted reference
  energy_mask: jax.Array  # bool [G]
  forces: jax.Array  # float32 [N, 3], eV/Å
  forces_mask: jax.Array  # bool [G]: the graph has force labels
  is_equilibrium: jax.Array  # bool [G]: positions are a (cheap-level) minimum -> structure label
  ref_positions: jax.Array  # float32 [N, 3], Å: reference minimum (evaluation only), else 0
  ref_mask: jax.Array  # bool [G]

  @property
  def num_nodes(self) -> int:
    return self.atomic_numbers.shape[-1]

  @property
  def num_edges(self) -> int:
    return self.senders.shape[-1]

  @property
  def num_graphs(self) -> int:
    return self.graph_mask.shape[-1]

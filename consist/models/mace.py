"""The energy model: a MACE-class E(3)-equivariant interatomic potential (e3nn-jax bases, flax.linen).

Per layer (Batatia et al., NeurIPS 2022, "MACE"), for atoms i with element z_i:
  1. two-body messages  A_i = sum_j R(r_ij) (h_j (x) Y(r_ij)) / avg_num_neighbors: a channel-wise
     tensor product of the sender's features with the spherical harmonics Y (l <= `max_l_edge`),
     each path weighted per edge by an MLP of a Bessel radial basis times a smooth polynomial cutoff
     envelope, then a channel-mixing linear per l;
  2. the higher-body-order basis B_i: an element-dependent *symmetric contraction* of A_i with
     itself up to order `correlation` (ACE), channel by channel, onto the hidden irreps;
  3. h_i <- linear(B_i) + element-dependent linear(h_i) (residual);
  4. a per-atom energy readout (linear on the scalars; an MLP after the last layer).
E = sum_i (scale * sum_layers readout_i + shift) + fidelity offset. `scale` (the force labels' RMS),
`shift` (the mean per-atom energy left by the float64 per-element least-squares reference) and
`avg_num_neighbors` are statistics of the training data (`consist.models.statistics`).

Features are held per angular momentum l as arrays [N, channels, 2l + 1] in e3nn's real basis (`1o`
in xyz order) with natural parity (-1)^l only: tensor-product paths are kept when l1 + l2 + l3 is
even, so no pseudo-tensors arise and energies are invariant under reflections too.

The symmetric contraction is evaluated as a sparse polynomial: for one channel, the order-nu product
of A with itself projected on e3nn's reduced symmetric basis U_nu is a fixed linear map of the
distinct degree-nu monomials of A's 9 components (9 + 45 + 165 for l <= 2 and nu <= 3). That map is
sparse (35 nonzero coefficients for l_out = 0, 88 for l_out = 1, out of 219 x paths x (2l + 1)), so
each output component is written out as its few monomial terms, each monomial built once from its
prefix: elementwise products of [N, C] slices, which XLA fuses, forward and backward (17x faster
with its gradient on the CPU than gathering all 219 monomials for a dense matmul, whose gradient is
a scatter). The element-dependent path weights are applied after it.

Padding: padding edges have length 0 and are masked; every edge at or beyond `cutoff` carries
nothing (the envelope and its derivatives vanish there), so any edge set containing the pairs within
the cutoff (radius graph or all pairs) gives the same energy.
"""

from __future__ import annotations

import functools
import itertools
from typing import Sequence

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from consist.data.record import MAX_Z
from consist.models.config import EnergyModelConfig
from consist.types import GraphBatch


def irrep(l: int) -> e3nn.Irrep:
  """The natural-parity irrep of degree l (0e, 1o, 2e, ...)."""
  return e3nn.Irrep(l, (-1) ** l)


Features = dict  # {l: [N, C, 2l + 1]}


# --- geometry --------------------------------------------------------------------------------------

def edge_geometry(positions_N3: jax.Array, senders: jax.Array, receivers: jax.Array,
                  edge_mask: jax.Array, config: EnergyModelConfig):
  """(spherical harmonics {l: [E, 2l + 1]}, radial basis [E, num_bessel], envelope [E]).

  The envelope is 0 on padding edges and at or beyond the cutoff. Every quantity is finite, with
  finite derivatives of any order, at zero-length (padding) edges.
  """
  vectors = positions_N3[receivers] - positions_N3[senders]
  r2 = jnp.sum(vectors**2, axis=-1)
  inside = edge_mask & (r2 > 0.0) & (r2 < config.cutoff**2)
  r = jnp.sqrt(jnp.where(inside, r2, 1.0))
  units = vectors / r[:, None]
  sh = e3nn.spherical_harmonics(e3nn.Irreps.spherical_harmonics(config.max_l_edge), units,
                                normalize=False, normalization="component").array
  sh_by_l = {l: sh[:, l * l:(l + 1) * (l + 1)] for l in range(config.max_l_edge + 1)}
  x = r / config.cutoff
  n = jnp.arange(1, config.num_bessel + 1, dtype=r.dtype)
  bessel = jnp.sqrt(2.0 / config.cutoff) * jnp.sin(jnp.pi * n[None, :] * x[:, None]) / r[:, None]
  p = config.envelope_p
  envelope = (1.0 - (p + 1) * (p + 2) / 2 * x**p + p * (p + 2) * x ** (p + 1)
              - p * (p + 1) / 2 * x ** (p + 2))
  envelope = jnp.where(inside, envelope, 0.0)
  return sh_by_l, bessel, envelope


# --- small equivariant layers over {l: [N, C, 2l + 1]} ----------------------------------------------

class ChannelLinear(nn.Module):
  """Mixes channels per l (no bias, e3nn normalisation 1/sqrt(fan-in)); equivariant."""

  out_channels: int
  ls: Sequence[int]

  @nn.compact
  def __call__(self, x: Features) -> Features:
    out = {}
    for l in self.ls:
      if l not in x:
        continue
      fan_in = x[l].shape[1]
      w = self.param(f"w{l}", nn.initializers.normal(1.0), (fan_in, self.out_channels),
                     x[l].dtype)
      out[l] = jnp.einsum("ncm,cd->ndm", x[l], w) / np.sqrt(fan_in)
    return out


class ElementLinear(nn.Module):
  """Channel mixing per l with element-dependent weights W[z] (MACE's skip tensor product)."""

  out_channels: int
  ls: Sequence[int]

  @nn.compact
  def __call__(self, x: Features, atomic_numbers: jax.Array) -> Features:
    out = {}
    for l in self.ls:
      if l not in x:
        continue
      fan_in = x[l].shape[1]
      w = self.param(f"w{l}", nn.initializers.normal(1.0), (MAX_Z + 1, fan_in, self.out_channels),
                     x[l].dtype)
      # Elementwise product + sum, not a dot with batch dimension n: XLA's CPU backend runs a
      # batched dot as one tiny matmul per batch element, ~10x slower here.
      out[l] = jnp.sum(x[l][:, :, None, :] * w[atomic_numbers][:, :, :, None], axis=1) / np.sqrt(fan_in)
    return out


# --- the symmetric contraction -----------------------------------------------------------------------

@functools.cache
def _monomials(dim: int, degree: int) -> tuple[tuple[int, ...], ...]:
  """Sorted index tuples i1 <= ... <= i_degree over `dim` components."""
  return tuple(itertools.combinations_with_replacement(range(dim), degree))


@functools.cache
def symmetric_basis(max_l_in: int, correlation: int, l_out: int) -> tuple[np.ndarray, int]:
  """(M [n_monomials, paths, 2 l_out + 1] float64, paths) for one output degree.

  Row order: the monomials of degree 1, 2, ..., `correlation` of the `(max_l_in + 1)^2` components of
  A (order of `_monomials`); column p, m: path p of any order onto component m of `irrep(l_out)`.
  Each entry is the sum of e3nn's reduced symmetric basis U_nu over the index permutations of the
  monomial, so that  sum_{i..k} U[i..k] A_i ... A_k = sum_monomials M A_i ... A_k.
  """
  irreps_in = e3nn.Irreps([(1, irrep(l)) for l in range(max_l_in + 1)])
  dim = irreps_in.dim
  blocks = []
  for nu in range(1, correlation + 1):
    u = e3nn.reduced_symmetric_tensor_product_basis(irreps_in, nu, keep_ir=[irrep(l_out)])
    u_arr = np.asarray(u.array, dtype=np.float64)  # [dim]*nu + [mul * (2 l_out + 1)]
    mul = u.irreps.num_irreps
    monos = _monomials(dim, nu)
    m = np.zeros((len(monos), mul * (2 * l_out + 1)))
    for row, idx in enumerate(monos):
      for perm in set(itertools.permutations(idx)):
        m[row] += u_arr[perm]
    blocks.append(m.reshape(len(monos), mul, 2 * l_out + 1))
  paths = sum(b.shape[1] for b in blocks)
  rows = sum(b.shape[0] for b in blocks)
  out = np.zeros((rows, paths, 2 * l_out + 1))
  r = p = 0
  for b in blocks:
    out[r:r + b.shape[0], p:p + b.shape[1]] = b
    r, p = r + b.shape[0], p + b.shape[1]
  return out, paths


@functools.cache
def sparse_symmetric_basis(max_l_in: int, correlation: int, l_out: int
                           ) -> tuple[tuple[tuple[tuple[int, ...], float], ...], ...]:
  """`symmetric_basis` as a sparse polynomial: terms[p * (2 l_out + 1) + m] = ((monomial, coefficient),
  ...) of path p, component m, a monomial being its sorted index tuple over A's components."""
  basis, paths = symmetric_basis(max_l_in, correlation, l_out)
  dim = (max_l_in + 1) ** 2
  rows = [idx for nu in range(1, correlation + 1) for idx in _monomials(dim, nu)]
  columns = basis.reshape(len(rows), paths * (2 * l_out + 1))
  return tuple(tuple((rows[q], float(columns[q, k])) for q in np.flatnonzero(np.abs(columns[:, k]) > 1e-12))
               for k in range(columns.shape[1]))


def contract_symmetric(a_NCD: jax.Array, max_l_in: int, correlation: int, l_out: int,
                       memo: dict | None = None) -> jax.Array:
  """[N, C, paths, 2 l_out + 1]: every path of every order 1..correlation of the symmetric product of
  A [N, C, (max_l_in + 1)^2] (channel by channel) onto `irrep(l_out)`, before path weights.
  `memo` keeps the monomials across calls on the same A (one call per output degree)."""
  memo = {} if memo is None else memo
  # One split (its gradient: one concatenate, not a zero-padded copy per component).
  components = [x[..., 0] for x in jnp.split(a_NCD, a_NCD.shape[-1], axis=-1)]

  def monomial(idx: tuple[int, ...]) -> jax.Array:
    if idx not in memo:
      last = components[idx[-1]]
      memo[idx] = last if len(idx) == 1 else monomial(idx[:-1]) * last
    return memo[idx]

  terms = sparse_symmetric_basis(max_l_in, correlation, l_out)
  columns = [sum((c * monomial(idx) for idx, c in column), jnp.zeros_like(components[0]))
             for column in terms]
  n, c = a_NCD.shape[:2]
  return jnp.stack(columns, axis=-1).reshape(n, c, -1, 2 * l_out + 1)


class SymmetricContraction(nn.Module):
  """B_l[n, c] = sum_p W_l[z_n, p, c] (U_p . A[n, c]^{(x) nu_p}) for each output degree l."""

  correlation: int
  ls_out: Sequence[int]

  @nn.compact
  def __call__(self, a: Features, atomic_numbers: jax.Array) -> Features:
    max_l_in = max(a)
    a_NCD = jnp.concatenate([a[l] for l in range(max_l_in + 1)], axis=-1)
    channels = a_NCD.shape[1]
    memo: dict = {}
    out = {}
    for l in self.ls_out:
      b = contract_symmetric(a_NCD, max_l_in, self.correlation, l, memo)  # [N, C, P, 2l + 1]
      paths = b.shape[2]
      w = self.param(f"w{l}", nn.initializers.normal(1.0 / np.sqrt(paths)),
                     (MAX_Z + 1, paths, channels), a_NCD.dtype)
      w_NCP = jnp.swapaxes(w[atomic_numbers], 1, 2)
      out[l] = jnp.sum(b * w_NCP[..., None], axis=2)  # not a batched dot (see ElementLinear)
    return out


# --- the interaction ------------------------------------------------------------------------------

@functools.cache
def tp_paths(ls_in: tuple[int, ...], max_l_edge: int) -> tuple[tuple[int, int, int], ...]:
  """(l_node, l_edge, l_out) with l_out <= max_l_edge and natural parity (l1 + l2 + l3 even)."""
  return tuple((l1, l2, l3) for l1 in ls_in for l2 in range(max_l_edge + 1)
               for l3 in range(abs(l1 - l2), min(l1 + l2, max_l_edge) + 1) if (l1 + l2 + l3) % 2 == 0)


class Interaction(nn.Module):
  """One MACE layer: messages A, symmetric contraction, residual; returns (h_new, energy [N])."""

  config: EnergyModelConfig
  ls_out: tuple[int, ...]
  last: bool

  @nn.compact
  def __call__(self, h: Features, atomic_numbers, sh, bessel, envelope, senders, receivers):
    cfg = self.config
    c = cfg.channels
    num_nodes = atomic_numbers.shape[0]
    skip = ElementLinear(c, self.ls_out, name="skip")(h, atomic_numbers)
    h_up = ChannelLinear(c, tuple(sorted(h)), name="linear_up")(h)
    paths = tp_paths(tuple(sorted(h)), cfg.max_l_edge)
    radial = bessel
    for i, width in enumerate(cfg.radial_hidden):
      radial = jax.nn.silu(nn.Dense(width, name=f"radial_{i}")(radial))
    weights = nn.Dense(len(paths) * c, name="radial_out")(radial) * envelope[:, None]
    # Per-path slices by one split (its gradient is one concatenate, not a zero-padded copy per path).
    weights = [w[:, 0, :] for w in jnp.split(weights.reshape(-1, len(paths), c), len(paths), axis=1)]
    sent = {l1: h_up[l1][senders] for l1 in h_up}  # [E, C, 2l1+1]
    by_l: dict[int, list] = {}
    for p, (l1, l2, l3) in enumerate(paths):
      cg = jnp.asarray(e3nn.clebsch_gordan(l1, l2, l3) * np.sqrt(2 * l3 + 1), h_up[l1].dtype)
      g = jnp.einsum("mnk,en->emk", cg, sh[l2])  # [E, 2l1+1, 2l3+1]
      # Elementwise product + sum over m: a batched dot over edges is slow on XLA's CPU backend
      # (and unrolling the sum over m was slower still: docs/DEVLOG.md, session 8).
      msg = jnp.sum(sent[l1][:, :, :, None] * g[:, None, :, :], axis=2)
      msg = msg * weights[p][:, :, None]
      by_l.setdefault(l3, []).append(msg)
    a = {l: jax.ops.segment_sum(jnp.concatenate(msgs, axis=1), receivers, num_segments=num_nodes)
         / cfg.avg_num_neighbors for l, msgs in by_l.items()}
    a = ChannelLinear(c, tuple(sorted(a)), name="linear_a")(a)
    b = SymmetricContraction(cfg.correlation, self.ls_out, name="product")(a, atomic_numbers)
    b = ChannelLinear(c, self.ls_out, name="linear_b")(b)
    h_new = {l: b[l] + skip[l] if l in skip else b[l] for l in self.ls_out}
    scalars = h_new[0][:, :, 0]
    if self.last:
      hidden = jax.nn.silu(nn.Dense(cfg.readout_hidden, name="readout_hidden")(scalars))
      energy = nn.Dense(1, name="readout")(hidden)[:, 0]
    else:
      energy = nn.Dense(1, use_bias=False, name="readout")(scalars)[:, 0]
    return h_new, energy


class MACE(nn.Module):
  """Per-graph energy [G] in eV (0 on padding graphs), relative to the dataset's reference.

  Call with (batch, positions [N, 3] Å). `features` gives the last layer's invariant node features
  [N, channels] instead (for a structure model that shares the trunk).
  """

  config: EnergyModelConfig
  num_fidelities: int = 1

  def setup(self):
    cfg = self.config
    self.embedding = nn.Embed(MAX_Z + 1, cfg.channels, name="embedding")
    layers = []
    for i in range(cfg.num_layers):
      last = i == cfg.num_layers - 1
      ls_out = (0,) if last else tuple(range(cfg.max_l_hidden + 1))
      layers.append(Interaction(cfg, ls_out, last, name=f"interaction_{i}"))
    self.layers = layers
    self.element_reference = nn.Embed(MAX_Z + 1, 1, embedding_init=nn.initializers.zeros,
                                      name="element_reference")
    self.fidelity_offset = nn.Embed(self.num_fidelities, 1, embedding_init=nn.initializers.zeros,
                                    name="fidelity_offset")

  def _trunk(self, batch: GraphBatch, positions_N3: jax.Array):
    cfg = self.config
    if not cfg.resolved:
      raise ValueError("EnergyModelConfig: avg_num_neighbors and scale are unset (0); the trainer "
                       "sets them from the training data (consist.models.statistics)")
    sh, bessel, envelope = edge_geometry(positions_N3, batch.senders, batch.receivers,
                                         batch.edge_mask, cfg)
    h = {0: self.embedding(batch.atomic_numbers).astype(positions_N3.dtype)[:, :, None]}
    atom_energy = jnp.zeros(positions_N3.shape[:1], positions_N3.dtype)
    for layer in self.layers:
      h, e = layer(h, batch.atomic_numbers, sh, bessel, envelope, batch.senders, batch.receivers)
      atom_energy = atom_energy + e
    return h, atom_energy

  def __call__(self, batch: GraphBatch, positions_N3: jax.Array) -> jax.Array:
    _, atom_energy = self._trunk(batch, positions_N3)
    cfg = self.config
    atom_energy = (cfg.scale * atom_energy + cfg.shift
                   + self.element_reference(batch.atomic_numbers)[:, 0].astype(atom_energy.dtype))
    atom_energy = jnp.where(batch.node_mask, atom_energy, 0.0)
    energy = jax.ops.segment_sum(atom_energy, batch.node_graph, num_segments=batch.num_graphs)
    energy = energy + self.fidelity_offset(batch.fidelity)[:, 0].astype(energy.dtype)
    return jnp.where(batch.graph_mask, energy, 0.0)

  def features(self, batch: GraphBatch, positions_N3: jax.Array) -> jax.Array:
    """Invariant node features [N, channels] of the last layer (0 on padding nodes)."""
    h, _ = self._trunk(batch, positions_N3)
    return jnp.where(batch.node_mask[:, None], h[0][:, :, 0], 0.0)

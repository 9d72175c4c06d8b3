"""Batched geometry optimisation on a learned (or any) energy, in JAX, over a padded `GraphBatch`.

Two ways in:

  * `relax` / `make_relaxer`: one jitted call (a `jax.lax.while_loop`) relaxes every molecule of one
    batch; it ends when all have finished. It compiles once per batch shape and settings.

        relaxer = make_relaxer(functools.partial(model_lib.energy_and_forces, model))
        result = relaxer(params, batch, batch.positions, settings=RelaxSettings(fmax=0.05))

  * `StreamRelaxer`: a stream of molecules (records) through one fixed-shape batch that is **refilled**
    as molecules finish: the loop leaves the device whenever a molecule converges (or hits the step
    limit, or needs a new neighbour list), the host swaps finished molecules out for the next ones
    (their optimiser state travels with them) and the same compiled loop goes on. A batch never waits
    for its slowest molecule, and a stream compiles once. With a finite `cutoff` the batch holds a
    radius graph at cutoff + `skin`, rebuilt for a molecule only once one of its atoms has moved
    more than skin / 2 since the last build, so the energy is exactly that of the all-pairs graph
    for any model that ignores pairs beyond its cutoff.

Per molecule g, independently of the others (all reductions are per-graph segment sums):
  * each iteration evaluates energy and forces, then either finishes the molecule (fmax_g = max_i
    |F_i| < `settings.fmax` eV/Å: converged; or `max_steps` steps taken: reported unconverged) or
    takes one optimiser step. A finished molecule is frozen (its positions, energy and forces never
    change again). Padding graphs count as finished from the start and padding nodes never move.
  * "bfgs" (default): BFGS on a dense Hessian per molecule ([3n, 3n], in a [3A, 3A] slot), started
    from Lindh's model Hessian (`consist.model_hessian`) plus `lindh_shift` times the identity, or
    from `alpha` times the identity; ASE's `BFGS`
    update, no line search; the step H^-1 F by a Cholesky solve (a few ms per batch, against
    ~100 ms for the energy), scaled so no atom moves more than `max_step` Å; a pair with s.y <= 0
    is not used for the update.
  * "fire": FIRE (Bitzek et al., PRL 97, 170201 (2006)) as ASE's `FIRE` runs it: unit masses,
    velocity mixing and time-step adaptation per molecule, the molecule's whole displacement capped
    at `max_step` Å per step. Time is in ASE units (Å sqrt(amu/eV), ~10.2 fs).
  * "lbfgs": L-BFGS without line search, like ASE's `LBFGS`: initial inverse Hessian 1/`alpha`
    (Å²/eV), `memory` pairs per molecule, the step scaled so no atom moves more than `max_step` Å. A
    pair with non-positive curvature (s.y <= 0) is dropped and a step that raised the energy clears
    the molecule's history (a restart).

Results hold final positions, energies, forces, fmax, steps taken and the convergence flag per
molecule (molecules that hit the step limit are reported, not hidden), and optionally the whole
trajectory. Measured speeds and the choice of defaults: docs/DEVLOG.md, sessions 5, 6 and 9. On the
learned energy the methods stop at different points of its flat torsional valleys (fmax holds
anywhere there), so the start Hessian decides how far they travel along the torsions. On 160 val
molecules (GFN2-xTB minima; MMFF94: RMSD 0.219 Å, gap 0.196 eV): BFGS from Lindh's Hessian as
published (shift 0.2 eV/Å²) 12.8 steps, RMSD 0.229 Å (it travels 0.24 Å, mostly along torsions),
gap 0.068 eV; with the shift 5 eV/Å² (default) 12.4 steps, RMSD 0.192 Å, gap 0.064 eV; FIRE 43
steps, RMSD 0.200 Å, gap 0.060 eV.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from consist import model_hessian
from consist.data.graph import bond_hop_matrix, cutoff_graph_edges, edge_bond_orders, full_graph_edges
from consist.types import GraphBatch

METHODS = ("bfgs", "fire", "lbfgs")
HESSIANS = ("lindh", "identity")
# energy_forces(params, batch, positions [N, 3] Å) -> (energy [G] eV, forces [N, 3] eV/Å).
EnergyForces = Callable[[Any, GraphBatch, jax.Array], tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class RelaxSettings:
  """How molecules are relaxed (hashable: a static argument of the jitted loop).

  Attributes:
    method: "bfgs", "fire" or "lbfgs".
    fmax: convergence threshold on the max atomic force, eV/Å.
    max_steps: step limit per molecule.
    max_step: FIRE: largest displacement norm of a molecule per step; (L-)BFGS: of an atom (Å).
    dt, dt_max, n_min, f_inc, f_dec, alpha_start, f_alpha: FIRE parameters (ASE's defaults).
    memory: L-BFGS history length.
    alpha: initial Hessian guess alpha * identity (eV/Å², ASE's 70) of L-BFGS, and of BFGS with
      hessian="identity".
    hessian: BFGS's initial Hessian: "lindh" (`consist.model_hessian`) or "identity".
    lindh_shift: eV/Å² added to the diagonal of Lindh's Hessian: a floor on the curvature BFGS
      assumes along the soft torsions, so its first steps along them stay short.
    trajectory: also return positions after every step.
  """

  method: str = "bfgs"
  fmax: float = 0.05
  max_steps: int = 500
  max_step: float = 0.2
  dt: float = 0.1
  dt_max: float = 1.0
  n_min: int = 5
  f_inc: float = 1.1
  f_dec: float = 0.5
  alpha_start: float = 0.1
  f_alpha: float = 0.99
  memory: int = 20
  alpha: float = 70.0
  hessian: str = "lindh"
  lindh_shift: float = 5.0
  trajectory: bool = False

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"method: must be one of {METHODS}, got {self.method!r}")
    if self.hessian not in HESSIANS:
      raise ValueError(f"hessian: must be one of {HESSIANS}, got {self.hessian!r}")
    if (self.fmax <= 0 or self.max_steps < 0 or self.max_step <= 0 or self.memory < 1
        or self.lindh_shift <= 0):
      raise ValueError(f"need fmax > 0, max_steps >= 0, max_step > 0, memory >= 1, lindh_shift > 0; "
                       f"got {self}")


@flax.struct.dataclass
class RelaxResult:
  """Per-molecule outcome of one batched relaxation (padding graphs: unconverged, 0 steps).

  Attributes:
    positions: [N, 3] Å final positions (padding nodes unchanged).
    energy: [G] eV at `positions`.
    forces: [N, 3] eV/Å at `positions` (0 on padding nodes).
    fmax: [G] eV/Å max atomic force at `positions` (0 for padding graphs).
    steps: [G] int32 steps the molecule moved.
    converged: [G] bool, fmax < settings.fmax.
    trajectory: [max_steps + 1, N, 3] Å positions after 0..max_steps steps (frames after a molecule
      finished repeat its final positions), or None.
    loop_steps: scalar int32, max over molecules of `steps`.
  """

  positions: jax.Array
  energy: jax.Array
  forces: jax.Array
  fmax: jax.Array
  steps: jax.Array
  converged: jax.Array
  trajectory: jax.Array | None
  loop_steps: jax.Array


def graph_sum(x_N: jax.Array, batch: GraphBatch) -> jax.Array:
  """[G] per-graph sum of a per-node quantity [N] (padding nodes must already be 0)."""
  return jax.ops.segment_sum(x_N, batch.node_graph, num_segments=batch.num_graphs)


def graph_fmax(forces_N3: jax.Array, batch: GraphBatch) -> jax.Array:
  """[G] max atomic force norm per graph, eV/Å (0 for graphs without real atoms)."""
  norm = jnp.where(batch.node_mask, jnp.sqrt(jnp.sum(forces_N3 ** 2, axis=-1)), 0.0)
  return jnp.maximum(jax.ops.segment_max(norm, batch.node_graph, num_segments=batch.num_graphs), 0.0)


def _dot(a_N3: jax.Array, b_N3: jax.Array, batch: GraphBatch) -> jax.Array:
  """[G] per-graph dot product of two [N, 3] fields."""
  return graph_sum(jnp.sum(a_N3 * b_N3, axis=-1), batch)


def _nodes(x_G: jax.Array, batch: GraphBatch) -> jax.Array:
  """[N, 1] per-graph value broadcast to each node (for [N, 3] arithmetic)."""
  return x_G[batch.node_graph][:, None]


def _safe_div(a, b):
  return jnp.where(b > 0, a / jnp.where(b > 0, b, 1.0), 0.0)


def _cap(length_G: jax.Array, max_length: float) -> jax.Array:
  """[G] factor scaling a step of `length_G` down to at most `max_length` (1 if it is shorter)."""
  return jnp.where(length_G > max_length, max_length / jnp.maximum(length_G, max_length), 1.0)


def _cap_atom_step(dr: jax.Array, batch: GraphBatch, max_step: float) -> jax.Array:
  atom_step = jnp.where(batch.node_mask, jnp.sqrt(jnp.sum(dr ** 2, axis=-1)), 0.0)
  longest = jnp.maximum(jax.ops.segment_max(atom_step, batch.node_graph, num_segments=batch.num_graphs), 0.0)
  return dr * _nodes(_cap(longest, max_step), batch)


# ------------------------------------------------------------------------------ state layout
# The loop state is a flat dict; each entry's layout says how it is split into molecules and packed
# back (`StreamRelaxer`) and how a per-graph selection applies to it:
#   node [N, ...], graph [G], hist_node [m, N, 3], hist_graph [m, G], dense [G, D, D].
_COMMON = {"pos": ("node", 0.0), "f": ("node", 0.0), "anchor": ("node", 0.0),
           "e": ("graph", 0.0), "fmax": ("graph", 0.0), "done": ("graph", False),
           "steps": ("graph", 0), "evals": ("graph", 0)}
_METHOD = {
    "fire": {"v": ("node", 0.0), "dt": ("graph", "dt"), "a": ("graph", "alpha_start"), "n_pos": ("graph", 0)},
    "lbfgs": {"s": ("hist_node", 0.0), "y": ("hist_node", 0.0), "rho": ("hist_graph", 0.0), "k": ("graph", 0),
              "r0": ("node", 0.0), "f0": ("node", 0.0), "e0": ("graph", 0.0)},
    "bfgs": {"hess": ("dense", 0.0), "r0": ("node", 0.0), "f0": ("node", 0.0)},
}


def state_layout(settings: RelaxSettings) -> dict[str, tuple[str, Any]]:
  """{key: (layout, fill value or the name of the settings field holding it)} of the loop state."""
  return {**_COMMON, **_METHOD[settings.method]}


def _fill(value, settings: RelaxSettings):
  return getattr(settings, value) if isinstance(value, str) else value


def _dtype(value, float_dtype):
  if isinstance(value, bool):
    return jnp.bool_
  return jnp.int32 if isinstance(value, int) else float_dtype


def _select(mask_G: jax.Array, new: dict, old: dict, batch: GraphBatch, layout: dict) -> dict:
  """new where the graph's mask is set, else old, entry by entry."""
  node = mask_G[batch.node_graph]
  out = {}
  for key, value in new.items():
    kind = layout[key][0]
    m = {"node": node, "graph": mask_G, "hist_node": node[None], "hist_graph": mask_G[None],
         "dense": mask_G}[kind]
    m = m.reshape(m.shape + (1,) * (value.ndim - m.ndim))
    out[key] = jnp.where(m, value, old[key])
  return out


# ----------------------------------------------------------------------------- dense blocks


def _dense_index(batch: GraphBatch, max_atoms: int) -> tuple[jax.Array, jax.Array]:
  """(idx [G, A]: node of the a-th atom of graph g, N where there is none; local [N]: a of each node)."""
  n_node = batch.n_node
  offset = jnp.cumsum(n_node) - n_node
  a = jnp.arange(max_atoms)
  real = (a[None] < n_node[:, None]) & batch.graph_mask[:, None]
  idx = jnp.where(real, offset[:, None] + a[None], batch.num_nodes)
  local = jnp.clip(jnp.arange(batch.num_nodes) - offset[batch.node_graph], 0, max_atoms - 1)
  return idx, local


def _to_dense(x_N3: jax.Array, idx: jax.Array) -> jax.Array:
  """[G, 3A] per-molecule vectors of a node field (0 beyond each molecule's atoms)."""
  padded = jnp.concatenate([x_N3, jnp.zeros((1, 3), x_N3.dtype)])
  return padded[idx].reshape(idx.shape[0], -1)


def _from_dense(d_GD: jax.Array, local: jax.Array, batch: GraphBatch) -> jax.Array:
  """[N, 3] node field from per-molecule vectors (0 on padding nodes)."""
  x = d_GD.reshape(d_GD.shape[0], -1, 3)[batch.node_graph, local]
  return jnp.where(batch.node_mask[:, None], x, 0.0)


# -------------------------------------------------------------------------------- optimisers


def _fire_step(st: dict, first: jax.Array, batch: GraphBatch, s: RelaxSettings) -> tuple[dict, jax.Array]:
  """(new FIRE entries, displacement [N, 3] Å) of every molecule (callers mask finished ones)."""
  forces, v, dt, a, n_pos = st["f"], st["v"], st["dt"], st["a"], st["n_pos"]
  vf = _dot(forces, v, batch)
  f_norm = jnp.sqrt(_dot(forces, forces, batch))
  v_norm = jnp.sqrt(_dot(v, v, batch))
  downhill = (vf > 0.0) | first  # the first step only accelerates from rest (ASE)
  mixed = (1.0 - _nodes(a, batch)) * v + _nodes(a * _safe_div(v_norm, f_norm), batch) * forces
  v = jnp.where(_nodes(downhill & ~first, batch), mixed, jnp.where(_nodes(downhill, batch), v, 0.0))
  speed_up = downhill & ~first & (n_pos > s.n_min)
  new_dt = jnp.where(speed_up, jnp.minimum(dt * s.f_inc, s.dt_max), dt)
  new_a = jnp.where(speed_up, a * s.f_alpha, a)
  new_dt = jnp.where(downhill, new_dt, dt * s.f_dec)
  new_a = jnp.where(downhill, new_a, s.alpha_start)
  n_pos = jnp.where(downhill & ~first, n_pos + 1, jnp.where(downhill, n_pos, 0))
  v = v + _nodes(new_dt, batch) * forces
  dr = _nodes(new_dt, batch) * v
  dr = dr * _nodes(_cap(jnp.sqrt(_dot(dr, dr, batch)), s.max_step), batch)
  return {"v": v, "dt": new_dt, "a": new_a, "n_pos": n_pos}, dr


def _lbfgs_step(st: dict, first: jax.Array, batch: GraphBatch, s: RelaxSettings) -> tuple[dict, jax.Array]:
  """(new L-BFGS entries, displacement [N, 3] Å): stores the molecule's last (s, y) pair in its own
  ring slot k % m, then the two-loop recursion over its history."""
  m = s.memory
  positions, forces, energy = st["pos"], st["f"], st["e"]
  ds = positions - st["r0"]
  dy = st["f0"] - forces  # y = g_new - g_old, g = -F
  sy = _dot(ds, dy, batch)
  store = ~first  # per graph
  slot = st["k"] % m  # [G]
  hit_G = (jnp.arange(m)[:, None] == slot[None]) & store[None]  # [m, G]
  hit_N = hit_G[:, batch.node_graph][..., None]
  s_hist = jnp.where(hit_N, ds[None], st["s"])
  y_hist = jnp.where(hit_N, dy[None], st["y"])
  rho = jnp.where(hit_G, jnp.where(sy > 0.0, _safe_div(1.0, sy), 0.0)[None], st["rho"])
  # A step that raised a molecule's energy restarts its history (steepest descent next).
  uphill = store & (energy > st["e0"] + 1e-6 * (1.0 + jnp.abs(st["e0"])))  # float32 noise
  rho = jnp.where(uphill[None, :], 0.0, rho)
  k = st["k"] + store.astype(jnp.int32)

  graph_ids = jnp.arange(batch.num_graphs)
  node_ids = jnp.arange(batch.num_nodes)
  q = -forces
  coef = []
  for j in range(m):  # newest to oldest
    i_G = (k - 1 - j) % m
    i_N = i_G[batch.node_graph]
    s_i, y_i, rho_i = s_hist[i_N, node_ids], y_hist[i_N, node_ids], rho[i_G, graph_ids]
    a_i = rho_i * _dot(s_i, q, batch)
    q = q - _nodes(a_i, batch) * y_i
    coef.append((s_i, y_i, rho_i, a_i))
  z = q / s.alpha
  for s_i, y_i, rho_i, a_i in reversed(coef):  # oldest to newest
    b = rho_i * _dot(y_i, z, batch)
    z = z + _nodes(a_i - b, batch) * s_i
  dr = _cap_atom_step(-z, batch, s.max_step)
  new = {"s": s_hist, "y": y_hist, "rho": rho, "k": k, "r0": positions, "f0": forces, "e0": energy}
  return new, dr


def _bfgs_step(st: dict, first: jax.Array, batch: GraphBatch, s: RelaxSettings) -> tuple[dict, jax.Array]:
  """(new BFGS entries, displacement [N, 3] Å): the Hessian update from the last step (ASE's BFGS
  formula, skipped unless s.y > 0), then dr = H^-1 F per molecule by a Cholesky solve. A molecule
  whose H has stopped being positive definite (float32 round-off) restarts from alpha * identity
  with a steepest-descent step F / alpha."""
  d_model = st["hess"].shape[-1]
  idx, local = _dense_index(batch, d_model // 3)
  x, g = _to_dense(st["pos"], idx), _to_dense(st["f"], idx)
  sv = x - _to_dense(st["r0"], idx)
  yv = _to_dense(st["f0"], idx) - g  # y = grad_new - grad_old
  h = st["hess"]
  hs = jnp.einsum("gij,gj->gi", h, sv)
  sy, shs = jnp.sum(sv * yv, axis=-1), jnp.sum(sv * hs, axis=-1)
  update = ~first & (sy > 0.0) & (shs > 0.0)
  inv = lambda v: 1.0 / jnp.where(update, v, 1.0)
  outer = lambda a, b: a[:, :, None] * b[:, None, :]
  h = jnp.where(update[:, None, None],
                h + inv(sy)[:, None, None] * outer(yv, yv) - inv(shs)[:, None, None] * outer(hs, hs), h)
  chol = jnp.linalg.cholesky(h)
  d = jax.scipy.linalg.cho_solve((chol, True), g[..., None])[..., 0]
  ok = jnp.all(jnp.isfinite(d), axis=-1) & (jnp.sum(d * g, axis=-1) > 0.0)
  h = jnp.where(ok[:, None, None], h, s.alpha * jnp.eye(d_model, dtype=h.dtype))
  d = jnp.where(ok[:, None], d, g / s.alpha)
  dr = _cap_atom_step(_from_dense(d, local, batch), batch, s.max_step)
  return {"hess": h, "r0": st["pos"], "f0": st["f"]}, dr


_STEP = {"fire": _fire_step, "lbfgs": _lbfgs_step, "bfgs": _bfgs_step}


# ------------------------------------------------------------------------------------- loop


def init_state(batch: GraphBatch, positions_N3: jax.Array, settings: RelaxSettings,
               hessian: jax.Array | None = None) -> dict:
  """The loop state of a batch whose molecules all start now (jittable). bfgs needs `hessian`
  [G, 3A, 3A] (A >= every molecule's atom count; `initial_hessians`)."""
  n, g = batch.num_nodes, batch.num_graphs
  dtype = positions_N3.dtype
  out = {}
  for key, (kind, fill) in state_layout(settings).items():
    value = _fill(fill, settings)
    shape = {"node": (n, 3), "graph": (g,), "hist_node": (settings.memory, n, 3),
             "hist_graph": (settings.memory, g), "dense": None}[kind]
    if shape is not None:
      out[key] = jnp.full(shape, value, _dtype(value, dtype))
  if settings.method == "bfgs":
    if hessian is None:
      raise ValueError("method 'bfgs' needs hessian [G, 3A, 3A] (relax.initial_hessians)")
    out["hess"] = jnp.asarray(hessian, dtype)
  out["pos"] = out["anchor"] = positions_N3
  out["done"] = ~batch.graph_mask
  return out


def run_loop(energy_forces: EnergyForces, params, batch: GraphBatch, state: dict, *,
             settings: RelaxSettings, max_iters, refill_at=None, skin=None,
             trajectory_len: int = 0) -> tuple[dict, jax.Array | None, jax.Array]:
  """Runs the loop from `state` until every molecule has finished, or `max_iters` iterations, or
  `refill_at` more real molecules have finished than at the start, or (with `skin`) an unfinished
  molecule has an atom more than skin / 2 from its `anchor` position (before it is evaluated there).

  Returns (state, trajectory [trajectory_len, N, 3]: positions after iteration i, or None,
  iterations run). max_iters, refill_at and skin are traced (changing them does not recompile).
  """
  s = settings
  node_mask = batch.node_mask[:, None]
  layout = state_layout(s)
  refill_at = jnp.asarray(batch.num_graphs + 1 if refill_at is None else refill_at, jnp.int32)
  half_skin2 = jnp.asarray(jnp.inf if skin is None else (skin / 2.0) ** 2, state["pos"].dtype)
  finished0 = jnp.sum(state["done"] & batch.graph_mask)
  traj0 = (jnp.zeros((trajectory_len, batch.num_nodes, 3), state["pos"].dtype) if trajectory_len else None)

  def cond(carry):
    st, it, _ = carry
    finished = jnp.sum(st["done"] & batch.graph_mask)
    moved2 = jnp.sum((st["pos"] - st["anchor"]) ** 2, axis=-1)
    far = jnp.any(batch.node_mask & ~st["done"][batch.node_graph] & (moved2 > half_skin2))
    return ((it < max_iters) & ~jnp.all(st["done"]) & (finished - finished0 < refill_at) & ~far)

  def body(carry):
    st, it, traj = carry
    active = ~st["done"]
    e, f = energy_forces(params, batch, st["pos"])
    f = jnp.where(node_mask, f, 0.0)
    st = {**st, **_select(active, {"e": e, "f": f, "fmax": graph_fmax(f, batch)}, st, batch, layout)}
    finish = active & ((st["fmax"] < s.fmax) | (st["steps"] >= s.max_steps))
    move = active & ~finish
    new, dr = _STEP[s.method](st, st["steps"] == 0, batch, s)
    new["pos"] = st["pos"] + jnp.where(node_mask, dr, 0.0)
    new["steps"] = st["steps"] + 1
    st = {**st, **_select(move, new, st, batch, layout)}
    st["done"] = st["done"] | finish
    st["evals"] = st["evals"] + active.astype(jnp.int32)
    if traj is not None:
      traj = jax.lax.dynamic_update_index_in_dim(traj, st["pos"], jnp.minimum(it, trajectory_len - 1), 0)
    return st, it + 1, traj

  st, iters, traj = jax.lax.while_loop(cond, body, (state, jnp.zeros((), jnp.int32), traj0))
  return st, traj, iters


def relax(energy_forces: EnergyForces, params, batch: GraphBatch, positions_N3: jax.Array | None = None,
          *, settings: RelaxSettings = RelaxSettings(), hessian: jax.Array | None = None) -> RelaxResult:
  """Relaxes every real molecule of `batch` on `energy_forces` in one loop (module docstring).

  Args:
    energy_forces: (params, batch, positions [N, 3] Å) -> (energy [G] eV, forces [N, 3] eV/Å).
    params: passed through to `energy_forces` (traced: new params do not recompile).
    batch: one device's padded batch (no leading device axis); its edges are used as they are.
    positions_N3: start positions, Å; default `batch.positions`.
    settings: method, thresholds and limits (static).
    hessian: bfgs: [G, 3A, 3A] initial Hessians (`initial_hessians`).
  """
  s = settings
  pos0 = jnp.asarray(batch.positions if positions_N3 is None else positions_N3)
  state = init_state(batch, pos0, s, hessian)
  st, traj, _ = run_loop(energy_forces, params, batch, state, settings=s, max_iters=s.max_steps + 1,
                         trajectory_len=s.max_steps + 1 if s.trajectory else 0)
  if traj is not None:  # frame i = positions after i steps; after a molecule finished, its final ones
    traj = jnp.concatenate([pos0[None], traj[:-1]])
    frame = jnp.arange(s.max_steps + 1)[:, None, None]
    traj = jnp.where(frame > st["steps"][batch.node_graph][None, :, None], st["pos"][None], traj)
  real = batch.graph_mask
  return RelaxResult(positions=st["pos"], energy=st["e"], forces=st["f"],
                     fmax=jnp.where(real, st["fmax"], 0.0), steps=st["steps"],
                     converged=real & (st["fmax"] < s.fmax), trajectory=traj,
                     loop_steps=jnp.max(st["steps"]))


def make_relaxer(energy_forces: EnergyForces):
  """`relax` on `energy_forces`, jitted: fn(params, batch, positions, settings=..., hessian=None)
  -> RelaxResult. Compiles once per batch shape and settings (`fn._cache_size()` counts them)."""

  def fn(params, batch, positions_N3, settings: RelaxSettings = RelaxSettings(), hessian=None):
    return relax(energy_forces, params, batch, positions_N3, settings=settings, hessian=hessian)

  return jax.jit(fn, static_argnames=("settings",))


def hessian_block(atomic_numbers: np.ndarray, positions: np.ndarray, settings: RelaxSettings) -> np.ndarray:
  """[3n, 3n] float64 initial Hessian of one molecule for BFGS (eV/Å^2)."""
  if settings.hessian == "lindh":
    return model_hessian.lindh_hessian(atomic_numbers, positions, eps=settings.lindh_shift)
  return settings.alpha * np.eye(3 * len(atomic_numbers))


def _embed(block: np.ndarray, out: np.ndarray) -> None:
  """Writes a molecule's block into its [3A, 3A] slot; the identity on the unused dimensions keeps
  the slot's matrix positive definite (forces are 0 there, so they never move)."""
  out[:] = np.eye(out.shape[0], dtype=out.dtype)
  out[:block.shape[0], :block.shape[1]] = block


def initial_hessians(batch: GraphBatch, settings: RelaxSettings = RelaxSettings(), positions_N3=None,
                     max_atoms: int | None = None) -> np.ndarray:
  """float32 [G, 3A, 3A] initial Hessians of the molecules of one (host) batch for BFGS; A =
  `max_atoms` (default: the largest molecule); the identity for padding graphs."""
  n_node, real = np.asarray(batch.n_node), np.asarray(batch.graph_mask)
  z = np.asarray(batch.atomic_numbers)
  pos = np.asarray(batch.positions if positions_N3 is None else positions_N3, np.float64)
  a = max_atoms or int(n_node[real].max(initial=1))
  if (n_node[real] > a).any():
    raise ValueError(f"initial_hessians: a molecule has {n_node[real].max()} atoms > max_atoms {a}")
  out = np.zeros((len(n_node), 3 * a, 3 * a), np.float32)
  start = 0
  for g, n in enumerate(n_node):
    _embed(hessian_block(z[start:start + n], pos[start:start + n], settings) if real[g] else np.zeros((0, 0)),
           out[g])
    start += n
  return out


# ------------------------------------------------------------------------- refilled streams


@dataclasses.dataclass(frozen=True)
class MoleculeRelaxation:
  """One molecule relaxed by `StreamRelaxer` (host arrays).

  Attributes:
    positions: [n, 3] Å final structure; forces: [n, 3] eV/Å there.
    energy: energy_forces' energy there (eV; the model's, without any reference).
    fmax: max atomic force there, eV/Å; converged: fmax < settings.fmax.
    steps: optimiser steps taken (settings.max_steps if it did not converge).
    evaluations: energy + forces evaluations spent on it (steps + 1).
    trajectory: [steps + 1, n, 3] Å, start to end, when the settings ask for it.
  """

  positions: np.ndarray
  energy: float
  forces: np.ndarray
  fmax: float
  steps: int
  evaluations: int
  converged: bool
  trajectory: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class StreamShape:
  """Static shape of a stream's batch: node, edge, graph budgets (one node and one graph are
  padding, as in `consist.data.batching.Budget`) and the atoms of the largest molecule it takes."""

  n_node: int
  n_edge: int
  n_graph: int
  max_atoms: int


def _np_dtype(value):
  return bool if isinstance(value, bool) else (np.int32 if isinstance(value, int) else np.float32)


def _round_up(x: float, multiple: int) -> int:
  return int(multiple * math.ceil(x / multiple))


class _Molecule:
  """A molecule of a stream on the host: its graph data and its slice of the loop state."""

  def __init__(self, index: int, record, fidelity: int, state: dict):
    self.index, self.record, self.fidelity, self.state = index, record, fidelity, state
    self.n = record.n_atoms
    self.edges: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
    self.hops = bond_hop_matrix(record)  # the bond graph does not change: once, not per re-neighbour
    self.frames: list[np.ndarray] = []


class StreamRelaxer:
  """Relaxes a stream of molecules through one fixed-shape batch refilled as molecules finish
  (module docstring). One compilation per `StreamShape` and settings; `traces` counts them.

  Args:
    energy_forces: as for `relax`.
    fidelities: the vocabulary `GraphBatch.fidelity` indexes (a record's `label_fidelity`; 0 if
      it has none or an unknown one).
    cutoff: the energy's interaction cutoff, Å: pairs farther apart may be left out of the graph;
      None = all intra-molecular pairs, always.
    skin: Verlet skin, Å: the graph holds pairs within cutoff + skin of the positions it was built
      at and is rebuilt for a molecule once an atom of it has moved more than skin / 2.
    graphs: molecules per batch.
    refill_at: the loop returns to the host to refill once this many molecules have finished.
  """

  def __init__(self, energy_forces: EnergyForces, *, fidelities: Sequence[str] = (),
               cutoff: float | None = None, skin: float = 1.0, graphs: int = 32, refill_at: int = 1):
    if cutoff is not None and not (cutoff > 0 and skin > 0):
      raise ValueError(f"need cutoff > 0 and skin > 0 (Å), got cutoff={cutoff}, skin={skin}")
    if graphs < 1 or refill_at < 1:
      raise ValueError(f"need graphs >= 1 and refill_at >= 1, got {graphs}, {refill_at}")
    self.energy_forces = energy_forces
    self.fidelities = list(fidelities)
    self.cutoff, self.skin, self.graphs, self.refill_at = cutoff, skin, graphs, refill_at
    self.traces = 0
    # For measurements: loop calls (host round trips), loop iterations, iterations x batch slots
    # (capacity: n_graph - 1 per iteration) and x slots holding a molecule, seconds in the loop call.
    # Neighbour-list rebuilds (a molecule moved more than skin / 2).
    self.stats = {"calls": 0, "iterations": 0, "slot_capacity": 0, "slots_used": 0, "loop_s": 0.0,
                  "rebuilds": 0}
    self._loop = jax.jit(self._loop_fn, static_argnames=("settings", "trajectory_len"))

  def _loop_fn(self, params, batch, state, max_iters, refill_at, skin, *, settings, trajectory_len):
    self.traces += 1  # runs once per trace
    return run_loop(self.energy_forces, params, batch, state, settings=settings, max_iters=max_iters,
                    refill_at=refill_at, skin=skin, trajectory_len=trajectory_len)

  # --- graphs ---
  def _edges(self, mol: _Molecule, positions: np.ndarray):
    if self.cutoff is None:
      senders, receivers = full_graph_edges(mol.n)
    else:
      senders, receivers = cutoff_graph_edges(positions, self.cutoff + self.skin)
    return (senders, receivers, edge_bond_orders(mol.record, senders, receivers),
            mol.hops[senders, receivers])

  def shape_for(self, records: Sequence[Any]) -> StreamShape:
    """The batch shape of a stream: `graphs` molecules of the stream's mean size with 5% to spare,
    plus its largest; rounded (nodes to 64, edges to 1024, atoms to 8) so similar streams share it.
    (A batch of larger molecules than that takes fewer of them: the batch is refilled by what fits.)"""
    n_atoms = np.asarray([r.n_atoms for r in records], np.int64)
    if self.cutoff is None:
      n_edges = n_atoms * (n_atoms - 1)
    else:
      reach = self.cutoff + self.skin
      n_edges = np.asarray([cutoff_graph_edges(np.asarray(r.positions), reach)[0].size for r in records])
    g = min(self.graphs, len(records))
    return StreamShape(n_node=_round_up(1.05 * g * n_atoms.mean() + n_atoms.max() + 1, 64),
                       n_edge=_round_up(1.05 * g * n_edges.mean() + n_edges.max(), 1024),
                       n_graph=g + 1, max_atoms=_round_up(n_atoms.max(), 8))

  # --- host state ---
  def _new_molecule(self, index: int, record, settings: RelaxSettings) -> _Molecule:
    label = getattr(record, "label_fidelity", None)
    fid = self.fidelities.index(label) if label in self.fidelities else 0
    n = record.n_atoms
    pos = np.asarray(record.positions, np.float32)
    state = {}
    for key, (kind, fill) in state_layout(settings).items():
      value = _fill(fill, settings)
      dtype = _np_dtype(value)
      shape = {"node": (n, 3), "graph": (), "hist_node": (settings.memory, n, 3),
               "hist_graph": (settings.memory,), "dense": None}[kind]
      if shape is not None:
        state[key] = np.full(shape, value, dtype)
    if settings.method == "bfgs":
      state["hess"] = hessian_block(record.atomic_numbers, pos, settings).astype(np.float32)
    state["pos"] = pos
    state["anchor"] = pos.copy()
    mol = _Molecule(index, record, fid, state)
    mol.edges = self._edges(mol, pos)
    if settings.trajectory:
      mol.frames.append(pos.copy())
    return mol

  def _pack(self, mols: list[_Molecule], shape: StreamShape, settings: RelaxSettings):
    n_node, n_edge, n_graph, a = shape.n_node, shape.n_edge, shape.n_graph, shape.max_atoms
    nodes = sum(m.n for m in mols)
    z = np.zeros(n_node, np.int32)
    node_graph = np.full(n_node, n_graph - 1, np.int32)
    senders = np.full(n_edge, n_node - 1, np.int32)
    receivers = np.full(n_edge, n_node - 1, np.int32)
    bond_order = np.zeros(n_edge, np.float32)
    bond_hops = np.zeros(n_edge, np.int32)
    edge_mask = np.zeros(n_edge, bool)
    n_nodes = np.zeros(n_graph, np.int32)
    charge = np.zeros(n_graph, np.int32)
    fidelity = np.zeros(n_graph, np.int32)
    node0 = edge0 = 0
    for g, m in enumerate(mols):
      s, r, b, h = m.edges
      z[node0:node0 + m.n] = m.record.atomic_numbers
      node_graph[node0:node0 + m.n] = g
      senders[edge0:edge0 + s.size] = s + node0
      receivers[edge0:edge0 + s.size] = r + node0
      bond_order[edge0:edge0 + s.size] = b
      bond_hops[edge0:edge0 + s.size] = h
      edge_mask[edge0:edge0 + s.size] = True
      n_nodes[g], charge[g], fidelity[g] = m.n, m.record.charge, m.fidelity
      node0, edge0 = node0 + m.n, edge0 + s.size
    n_nodes[-1] = n_node - nodes
    graph_mask = np.arange(n_graph) < len(mols)
    node_mask = np.arange(n_node) < nodes
    zeros_g = np.zeros(n_graph, np.float32)
    batch = GraphBatch(
        atomic_numbers=z, positions=np.zeros((n_node, 3), np.float32), node_mask=node_mask,
        node_graph=node_graph, senders=senders, receivers=receivers, edge_mask=edge_mask,
        bond_order=bond_order, bond_hops=bond_hops, graph_mask=graph_mask, n_node=n_nodes, charge=charge, fidelity=fidelity,
        energy=zeros_g, energy_mask=np.zeros(n_graph, bool), forces=np.zeros((n_node, 3), np.float32),
        forces_mask=np.zeros(n_graph, bool), is_equilibrium=np.zeros(n_graph, bool),
        ref_positions=np.zeros((n_node, 3), np.float32), ref_mask=np.zeros(n_graph, bool))
    state = {}
    pad_graphs = n_graph - len(mols)
    for key, (kind, fill) in state_layout(settings).items():
      parts = [m.state[key] for m in mols]
      if kind == "node":
        x = np.zeros((n_node, 3), np.float32)
        x[:nodes] = np.concatenate(parts) if parts else 0.0
      elif kind == "graph":
        value = True if key == "done" else _fill(fill, settings)  # padding graphs are finished
        x = np.asarray(parts + [value] * pad_graphs, _np_dtype(value))
      elif kind == "hist_node":
        x = np.zeros((settings.memory, n_node, 3), np.float32)
        x[:, :nodes] = np.concatenate(parts, axis=1) if parts else 0.0
      elif kind == "hist_graph":
        x = np.zeros((settings.memory, n_graph), np.float32)
        x[:, :len(mols)] = np.stack(parts, axis=1) if parts else 0.0
      else:  # dense
        x = np.zeros((n_graph, 3 * a, 3 * a), np.float32)
        for g in range(n_graph):
          _embed(parts[g] if g < len(parts) else np.zeros((0, 0)), x[g])
      state[key] = x
    return batch, state

  def _unpack(self, state: dict, mols: list[_Molecule], settings: RelaxSettings) -> None:
    node0 = 0
    for g, m in enumerate(mols):
      nodes = slice(node0, node0 + m.n)
      for key, (kind, _) in state_layout(settings).items():
        x = state[key]
        m.state[key] = {"node": lambda: x[nodes], "graph": lambda: x[g], "hist_node": lambda: x[:, nodes],
                        "hist_graph": lambda: x[:, g],
                        "dense": lambda: x[g, :3 * m.n, :3 * m.n]}[kind]().copy()
      node0 += m.n

  def _result(self, mol: _Molecule, settings: RelaxSettings) -> MoleculeRelaxation:
    st = mol.state
    fmax = float(st["fmax"])
    traj = np.stack(mol.frames).astype(np.float64) if settings.trajectory else None
    return MoleculeRelaxation(positions=st["pos"].astype(np.float64), energy=float(st["e"]),
                              forces=st["f"].astype(np.float64), fmax=fmax, steps=int(st["steps"]),
                              evaluations=int(st["evals"]), converged=bool(fmax < settings.fmax),
                              trajectory=traj)

  # --- the stream ---
  def relax(self, params, records: Sequence[Any], settings: RelaxSettings = RelaxSettings(), *,
            shape: StreamShape | None = None,
            progress: Callable[[int, int], None] | None = None) -> list[MoleculeRelaxation]:
    """Each record's positions relaxed, in input order.

    Args:
      params: passed through to `energy_forces`.
      records: `MoleculeRecord`s (atomic_numbers, positions Å, charge, bonds, label_fidelity).
      settings: method, thresholds and limits.
      shape: the batch shape (default `shape_for(records)`); every molecule must fit it alone.
      progress: progress(molecules finished, molecules) after every return to the host.

    Raises:
      ValueError: a molecule does not fit `shape`.
    """
    if not records:
      return []
    shape = shape or self.shape_for(records)
    big = [i for i, r in enumerate(records) if r.n_atoms > min(shape.max_atoms, shape.n_node - 1)]
    if big:
      raise ValueError(f"relax: molecule {big[0]} ({records[big[0]].n_atoms} atoms) does not fit {shape}")
    traj_len = 32 if settings.trajectory else 0
    max_iters = traj_len or settings.max_steps + 1
    skin = np.float32(np.inf if self.cutoff is None else self.skin)
    out: list[MoleculeRelaxation | None] = [None] * len(records)
    waiting: list[Any] = list(range(len(records)))[::-1]  # a stack: next on top (ints or _Molecule)
    active: list[_Molecule] = []
    finished = 0
    while waiting or active:
      # Fill: the molecules in the batch first, in order, then the next ones, while they fit.
      batch_mols: list[_Molecule] = []
      nodes = edges = 0
      candidates = active + []
      active = []
      while candidates or waiting:
        mol = candidates.pop(0) if candidates else waiting.pop()
        if isinstance(mol, int):
          mol = self._new_molecule(mol, records[mol], settings)
        e = mol.edges[0].size
        if (len(batch_mols) < shape.n_graph - 1 and nodes + mol.n <= shape.n_node - 1
            and edges + e <= shape.n_edge):
          batch_mols.append(mol)
          nodes, edges = nodes + mol.n, edges + e
        else:
          if not batch_mols:
            raise ValueError(f"relax: molecule {mol.index} ({mol.n} atoms, {e} edges) does not fit {shape}")
          waiting.append(mol)
          waiting.extend(candidates[::-1])
          break
      batch, state = self._pack(batch_mols, shape, settings)
      steps_before = [int(m.state["steps"]) for m in batch_mols]
      refill_at = np.int32(self.refill_at if waiting else shape.n_graph)  # nothing to refill: run on
      t0 = time.perf_counter()
      st, traj, iters = jax.device_get(self._loop(params, batch, state, np.int32(max_iters), refill_at, skin,
                                                  settings=settings, trajectory_len=traj_len))
      self.stats["loop_s"] += time.perf_counter() - t0
      self.stats["calls"] += 1
      self.stats["iterations"] += int(iters)
      self.stats["slot_capacity"] += int(iters) * (shape.n_graph - 1)
      self.stats["slots_used"] += int(iters) * len(batch_mols)
      self._unpack(st, batch_mols, settings)
      node0 = 0
      for m, before in zip(batch_mols, steps_before):
        if traj is not None:
          moved = int(m.state["steps"]) - before
          m.frames.extend(np.asarray(traj[:moved, node0:node0 + m.n], np.float32))
        node0 += m.n
        if m.state["done"]:
          out[m.index] = self._result(m, settings)
          finished += 1
          continue
        if self.cutoff is not None:
          moved2 = np.max(np.sum((m.state["pos"] - m.state["anchor"]) ** 2, axis=-1))
          if moved2 > (self.skin / 2) ** 2:
            m.state["anchor"] = m.state["pos"].copy()
            m.edges = self._edges(m, m.state["pos"])
            self.stats["rebuilds"] += 1
        active.append(m)
      if progress is not None:
        progress(finished, len(records))
    return out

"""Batched geometry optimisation on a learned (or any) energy, in JAX, over a padded `GraphBatch`.

  relaxer = make_relaxer(functools.partial(model_lib.energy_and_forces, model))
  result = relaxer(params, batch, batch.positions, settings=RelaxSettings(fmax=0.05))

One jitted call (a `jax.lax.while_loop`) relaxes every molecule of the batch at once: it compiles
once per batch shape (a run's shape bucket) and settings, and later batches of that shape reuse it.
The loop ends when every real molecule has converged or after `max_steps` steps.

Per molecule g, independently of the others (all reductions are per-graph segment sums):
  * convergence: fmax_g = max_i |F_i| over its atoms (eV/Å) < `settings.fmax`. A converged molecule
    is frozen: its positions never change again while the rest of the batch goes on. Padding graphs
    count as converged from the start and padding nodes never move.
  * "fire": FIRE (Bitzek et al., PRL 97, 170201 (2006)) as ASE's `FIRE` runs it: unit masses,
    velocity mixing and time-step adaptation per molecule, the molecule's whole displacement capped
    at `max_step` Å per step. Time is in ASE units (Å sqrt(amu/eV), ~10.2 fs).
  * "lbfgs": L-BFGS without line search, like ASE's `LBFGS`: initial inverse Hessian 1/`alpha`
    (Å²/eV), `memory` pairs, the step scaled so no atom moves more than `max_step` Å. A pair with
    non-positive curvature (s.y <= 0) is dropped and a step that raised the energy clears the
    molecule's history (a restart), so a learned surface's kinks cannot turn it uphill for long.

The result holds final positions, energies, forces, fmax, steps taken and the convergence flag per
molecule (molecules that hit the step limit are reported, not hidden), and optionally the whole
trajectory.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from consist.types import GraphBatch

METHODS = ("fire", "lbfgs")
# energy_forces(params, batch, positions [N, 3] Å) -> (energy [G] eV, forces [N, 3] eV/Å).
EnergyForces = Callable[[Any, GraphBatch, jax.Array], tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class RelaxSettings:
  """How molecules are relaxed (hashable: a static argument of the jitted relaxer).

  Attributes:
    method: "fire" or "lbfgs".
    fmax: convergence threshold on the max atomic force, eV/Å.
    max_steps: step limit (every molecule of a batch stops at it).
    max_step: FIRE: largest displacement norm of a molecule per step; L-BFGS: of an atom (Å).
    dt, dt_max, n_min, f_inc, f_dec, alpha_start, f_alpha: FIRE parameters (ASE's defaults).
    memory, alpha: L-BFGS history length and initial Hessian guess (eV/Å², ASE's 70).
    trajectory: also return positions after every step ([max_steps + 1, N, 3]).
  """

  method: str = "fire"
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
  trajectory: bool = False

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"method: must be one of {METHODS}, got {self.method!r}")
    if self.fmax <= 0 or self.max_steps < 0 or self.max_step <= 0 or self.memory < 1:
      raise ValueError(f"need fmax > 0, max_steps >= 0, max_step > 0, memory >= 1; got {self}")


@flax.struct.dataclass
class RelaxResult:
  """Per-molecule outcome of one batched relaxation (padding graphs: converged, 0 steps).

  Attributes:
    positions: [N, 3] Å final positions (padding nodes unchanged).
    energy: [G] eV at `positions`.
    forces: [N, 3] eV/Å at `positions` (0 on padding nodes).
    fmax: [G] eV/Å max atomic force at `positions` (0 for padding graphs).
    steps: [G] int32 steps the molecule moved.
    converged: [G] bool, fmax < settings.fmax.
    trajectory: [max_steps + 1, N, 3] Å positions after 0..max_steps steps (frames after the loop
      ended repeat the final positions), or None.
    loop_steps: scalar int32, iterations of the batch loop (max over molecules of `steps`).
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


# ----------------------------------------------------------------------------------------- FIRE


def _fire_init(n_node: int, n_graph: int, s: RelaxSettings, dtype) -> dict:
  return {"v": jnp.zeros((n_node, 3), dtype), "dt": jnp.full((n_graph,), s.dt, dtype),
          "a": jnp.full((n_graph,), s.alpha_start, dtype), "n_pos": jnp.zeros((n_graph,), jnp.int32)}


def _fire_step(opt: dict, forces: jax.Array, first: jax.Array, batch: GraphBatch,
               s: RelaxSettings) -> tuple[dict, jax.Array]:
  """(new FIRE state, displacement [N, 3] Å) of every molecule (callers mask frozen ones)."""
  v, dt, a, n_pos = opt["v"], opt["dt"], opt["a"], opt["n_pos"]
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


# --------------------------------------------------------------------------------------- L-BFGS


def _lbfgs_init(n_node: int, n_graph: int, s: RelaxSettings, dtype) -> dict:
  m = s.memory
  return {"s": jnp.zeros((m, n_node, 3), dtype), "y": jnp.zeros((m, n_node, 3), dtype),
          "rho": jnp.zeros((m, n_graph), dtype), "k": jnp.zeros((), jnp.int32),
          "r0": jnp.zeros((n_node, 3), dtype), "f0": jnp.zeros((n_node, 3), dtype),
          "e0": jnp.zeros((n_graph,), dtype)}


def _lbfgs_step(opt: dict, positions: jax.Array, forces: jax.Array, energy: jax.Array,
                first: jax.Array, active: jax.Array, batch: GraphBatch,
                s: RelaxSettings) -> tuple[dict, jax.Array]:
  """(new L-BFGS state, displacement [N, 3] Å): stores the last step's (s, y) pair, then the
  two-loop recursion on the history of each molecule."""
  m = s.memory
  ds = positions - opt["r0"]
  dy = opt["f0"] - forces  # y = g_new - g_old, g = -F
  sy = _dot(ds, dy, batch)
  valid = active & ~first & (sy > 0.0)
  slot = opt["k"] % m
  rho = opt["rho"].at[slot].set(jnp.where(valid, _safe_div(1.0, sy), 0.0))
  store = ~first
  s_hist = jnp.where(store, opt["s"].at[slot].set(ds), opt["s"])
  y_hist = jnp.where(store, opt["y"].at[slot].set(dy), opt["y"])
  rho = jnp.where(store, rho, opt["rho"])
  # A step that raised a molecule's energy restarts its history (steepest descent next).
  uphill = ~first & (energy > opt["e0"] + 1e-6 * (1.0 + jnp.abs(opt["e0"])))  # float32 noise
  rho = jnp.where(uphill[None, :], 0.0, rho)
  k = opt["k"] + store.astype(jnp.int32)

  q = -forces
  coef = []
  for j in range(m):  # newest to oldest
    i = (k - 1 - j) % m
    a_i = rho[i] * _dot(s_hist[i], q, batch)
    q = q - _nodes(a_i, batch) * y_hist[i]
    coef.append((i, a_i))
  z = q / s.alpha
  for i, a_i in reversed(coef):  # oldest to newest
    b = rho[i] * _dot(y_hist[i], z, batch)
    z = z + _nodes(a_i - b, batch) * s_hist[i]
  dr = -z
  atom_step = jnp.where(batch.node_mask, jnp.sqrt(jnp.sum(dr ** 2, axis=-1)), 0.0)
  longest = jnp.maximum(jax.ops.segment_max(atom_step, batch.node_graph, num_segments=batch.num_graphs), 0.0)
  dr = dr * _nodes(_cap(longest, s.max_step), batch)
  new = {"s": s_hist, "y": y_hist, "rho": rho, "k": k, "r0": positions, "f0": forces, "e0": energy}
  return new, dr


# ----------------------------------------------------------------------------------------- loop


def relax(energy_forces: EnergyForces, params, batch: GraphBatch, positions_N3: jax.Array | None = None,
          *, settings: RelaxSettings = RelaxSettings()) -> RelaxResult:
  """Relaxes every real molecule of `batch` on `energy_forces` (see the module docstring).

  Args:
    energy_forces: (params, batch, positions [N, 3] Å) -> (energy [G] eV, forces [N, 3] eV/Å).
    params: passed through to `energy_forces` (traced: new params do not recompile).
    batch: one device's padded batch (no leading device axis).
    positions_N3: start positions, Å; default `batch.positions`.
    settings: method, thresholds and limits (static).
  """
  s = settings
  pos0 = jnp.asarray(batch.positions if positions_N3 is None else positions_N3)
  node_mask = batch.node_mask[:, None]

  def evaluate(pos):
    e, f = energy_forces(params, batch, pos)
    return e, jnp.where(node_mask, f, 0.0)

  e0, f0 = evaluate(pos0)
  fmax0 = graph_fmax(f0, batch)
  n_node, n_graph = pos0.shape[0], batch.num_graphs
  opt = (_fire_init if s.method == "fire" else _lbfgs_init)(n_node, n_graph, s, pos0.dtype)
  traj = jnp.zeros((s.max_steps + 1, n_node, 3), pos0.dtype).at[0].set(pos0) if s.trajectory else None
  state = {"it": jnp.zeros((), jnp.int32), "pos": pos0, "e": e0, "f": f0, "fmax": fmax0,
           "done": ~batch.graph_mask | (fmax0 < s.fmax), "steps": jnp.zeros((n_graph,), jnp.int32),
           "opt": opt, "traj": traj}

  def cond(st):
    return (st["it"] < s.max_steps) & ~jnp.all(st["done"])

  def body(st):
    active = ~st["done"]
    first = st["it"] == 0
    if s.method == "fire":
      opt, dr = _fire_step(st["opt"], st["f"], first, batch, s)
    else:
      opt, dr = _lbfgs_step(st["opt"], st["pos"], st["f"], st["e"], first, active, batch, s)
    move = _nodes(active, batch) & node_mask
    pos = st["pos"] + jnp.where(move, dr, 0.0)
    e, f = evaluate(pos)
    # Frozen molecules keep their values exactly (their energy is recomputed at the same positions).
    e = jnp.where(active, e, st["e"])
    f = jnp.where(_nodes(active, batch), f, st["f"])
    fmax = jnp.where(active, graph_fmax(f, batch), st["fmax"])
    it = st["it"] + 1
    traj = None if st["traj"] is None else st["traj"].at[it].set(pos)
    return {"it": it, "pos": pos, "e": e, "f": f, "fmax": fmax, "done": st["done"] | (fmax < s.fmax),
            "steps": st["steps"] + active.astype(jnp.int32), "opt": opt, "traj": traj}

  st = jax.lax.while_loop(cond, body, state)
  traj = st["traj"]
  if traj is not None:  # frames after the loop ended: the final positions
    frame = jnp.arange(s.max_steps + 1)[:, None, None]
    traj = jnp.where(frame > st["it"], st["pos"][None], traj)
  return RelaxResult(positions=st["pos"], energy=st["e"], forces=st["f"],
                     fmax=jnp.where(batch.graph_mask, st["fmax"], 0.0), steps=st["steps"],
                     converged=batch.graph_mask & (st["fmax"] < s.fmax), trajectory=traj,
                     loop_steps=st["it"])


def make_relaxer(energy_forces: EnergyForces):
  """`relax` on `energy_forces`, jitted: fn(params, batch, positions, settings=...) -> RelaxResult.
  Compiles once per batch shape and settings (`fn._cache_size()` counts compilations)."""

  def fn(params, batch, positions_N3, settings: RelaxSettings = RelaxSettings()):
    return relax(energy_forces, params, batch, positions_N3, settings=settings)

  return jax.jit(fn, static_argnames=("settings",))

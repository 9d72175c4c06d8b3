"""Optimality consistency: a predicted equilibrium structure should be a minimum of the energy.

R_hat(theta) is the structure head's x0 prediction from a training equilibrium structure noised
to t ~ U[t_lo, t_hi] (one step), or the last step of a short DDIM chain started there whose
earlier steps are under stop_gradient. The energy E_sg is the model's energy with its params under
stop_gradient (see `consist.losses.total`). Two forms, per graph, over equilibrium graphs:

  stationarity: mean over atoms of |grad_R E_sg(R_hat)|^2 (eV^2/Å^2). Its gradient w.r.t. R_hat,
    2 H grad_R E, is computed forward-over-reverse (`jax.jvp` of `jax.grad`) in a custom VJP:
    the memory of one backward pass, never a dense Hessian.
  descent: (E_sg(R_hat) - E_sg(R_data)) / n_atoms (eV/atom), the data structure as the
    per-molecule baseline; first order only.
  relaxed: mean over atoms of |R_hat - R_min|^2 (Å^2), R_min the local minimum of the energy
    model reached from R_data by `consist.relax`, Kabsch-aligned onto
    R_data, precomputed with the energy model frozen (`consist.relaxed_targets`, carried as the records' ref_positions). The
    relaxation is amortised: the descent form's gradient is the force, dominated by the stiff
    stretches, so the soft bends and torsions that make most of the energy gap barely move;
    the minimum found by a quasi-Newton optimiser moves all of them. Valid only while the energy
    model stays as it was when the targets were computed (stage 2 on a frozen energy model).
    Measured worse than descent on the bundled data with targets from BFGS on Lindh's Hessian,
    which move 0.2 Å along flat torsions (docs/DEVLOG.md, session 6); not yet measured with the
    L-BFGS targets the writer now makes.

Watch-out (BRIEF 3): the energy model extrapolates badly far from its data and the loss can
exploit it; `optimality_energy_gap` (the descent quantity) is logged with either form, and a
strongly negative value is the symptom.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from consist import diffusion
from consist.losses.masking import graph_mean, masked_mean, num_atoms
from consist.types import GraphBatch

EnergyFn = Callable[[jax.Array], jax.Array]  # positions [N, 3] Å -> energies [G] eV
FORMS = ("stationarity", "descent", "relaxed")
# ref_fidelity of the minima of the learned energy the "relaxed" form trains toward.
RELAXED_TAG = "consist-relaxed"


def hessian_vector_product(energy_fn: EnergyFn, positions_N3: jax.Array,
                           vectors_N3: jax.Array) -> jax.Array:
  """H v [N, 3] (eV/Å^2 * v) with H the Hessian of sum_G E at positions; forward-over-reverse."""
  grad_fn = jax.grad(lambda r: jnp.sum(energy_fn(r)))
  return jax.jvp(grad_fn, (positions_N3,), (vectors_N3,))[1]


def _zero_cotangent(x):
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, dtype=jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _squared_gradient(energy_fn, positions, *consts):
  grad = jax.grad(lambda r: jnp.sum(energy_fn(r, *consts)))(positions)
  return jnp.sum(grad**2, axis=-1)


def _squared_gradient_fwd(energy_fn, positions, *consts):
  grad = jax.grad(lambda r: jnp.sum(energy_fn(r, *consts)))(positions)
  return jnp.sum(grad**2, axis=-1), (positions, grad, consts)


def _squared_gradient_bwd(energy_fn, residuals, cotangent_N):
  positions, grad, consts = residuals
  # d/dR sum_i c_i |g_i|^2 = 2 H (c * g): one forward-over-reverse HVP. No gradient to consts
  # (energy params are under stop_gradient by construction).
  hv = hessian_vector_product(lambda r: energy_fn(r, *consts), positions,
                              2.0 * cotangent_N[:, None] * grad)
  return (hv,) + tuple(jax.tree.map(_zero_cotangent, consts))


_squared_gradient.defvjp(_squared_gradient_fwd, _squared_gradient_bwd)


def stationarity(energy_fn: EnergyFn, positions_N3: jax.Array, batch: GraphBatch) -> jax.Array:
  """Per graph [G]: mean over real atoms of |grad_R E(R)|^2, eV^2/Å^2 (HVP-based gradient)."""
  fn, consts = jax.closure_convert(energy_fn, positions_N3)
  return graph_mean(_squared_gradient(fn, positions_N3, *consts), batch)


def energy_gap(energy_fn: EnergyFn, positions_N3: jax.Array, baseline_N3: jax.Array,
               batch: GraphBatch) -> jax.Array:
  """Per graph [G]: (E(R) - E(R_baseline)) / n_atoms, eV/atom (the descent form)."""
  gap = energy_fn(positions_N3) - energy_fn(baseline_N3)
  return gap / jnp.maximum(num_atoms(batch, gap.dtype), 1.0)


def aligned_minimum(batch: GraphBatch) -> jax.Array:
  """[N, 3] Å: `batch.ref_positions` rotated and translated onto `batch.positions` per graph
  (Kabsch, proper rotations), under stop_gradient. A minimum is one up to rigid motions; this is
  its copy in the frame of the structure R_hat is predicted from."""
  ref = jax.lax.stop_gradient(batch.ref_positions)
  mask = batch.node_mask[:, None]
  p = jnp.where(mask, ref - diffusion.centroid(ref, batch)[batch.node_graph], 0.0)
  q = jnp.where(mask, batch.positions - diffusion.centroid(batch.positions, batch)[batch.node_graph], 0.0)
  cov = jax.ops.segment_sum(p[:, :, None] * q[:, None, :], batch.node_graph,
                            num_segments=batch.num_graphs)  # [G, 3, 3]
  u, _, vt = jnp.linalg.svd(cov)
  d = jnp.sign(jnp.linalg.det(u @ vt))
  u = u.at[:, :, 2].multiply(jnp.where(d == 0, 1.0, d)[:, None])
  rotation = u @ vt  # row vectors: p @ R ~ q
  aligned = jnp.einsum("ni,nij->nj", p, rotation[batch.node_graph])
  out = aligned + diffusion.centroid(batch.positions, batch)[batch.node_graph]
  return jax.lax.stop_gradient(jnp.where(mask, out, 0.0))


def distance_to_minimum(positions_N3: jax.Array, batch: GraphBatch) -> jax.Array:
  """Per graph [G]: mean over real atoms of |R - R_min|^2, Å^2, with R_min = `aligned_minimum`."""
  return graph_mean(jnp.sum((positions_N3 - aligned_minimum(batch)) ** 2, axis=-1), batch)


def predict_structure(eps_fn: diffusion.DenoiseFn, batch: GraphBatch,
                      schedule: diffusion.Schedule, rng: jax.Array, *,
                      t_range: tuple[float, float], ddim_steps: int = 0,
                      noise: bool = True) -> jax.Array:
  """R_hat [N, 3] Å from `batch.positions` noised to t ~ U[t_range] (per graph if one-step).

  ddim_steps = 0: one-step x0 prediction. Else a DDIM chain of `ddim_steps` steps from a shared
  t ~ U[t_range] to 0; only the last step's denoiser call carries gradient. noise False: the
  structure enters unnoised (x_t = alpha x0), as in deterministic refinement.
  """
  dtype = batch.positions.dtype
  t_rng, eps_rng, step_rng = jax.random.split(rng, 3)
  x0 = diffusion.to_scaled(batch.positions, batch, schedule)
  eps = diffusion.centered_noise(eps_rng, batch, dtype)
  if not noise:
    eps = jnp.zeros_like(eps)
  if ddim_steps == 0:
    t_G = jax.random.uniform(t_rng, batch.graph_mask.shape, dtype, *t_range)
    x_t = diffusion.add_noise(x0, eps, t_G, batch, schedule)
    x0_hat = diffusion.eps_to_x0(x_t, eps_fn(x_t, t_G), t_G, batch, schedule)
  else:
    t_start = jax.random.uniform(t_rng, (), dtype, *t_range)
    x = diffusion.add_noise(x0, eps, jnp.full(batch.graph_mask.shape, t_start, dtype), batch,
                            schedule)
    times = t_start * (1.0 - jnp.arange(ddim_steps + 1, dtype=dtype) / ddim_steps)
    keys = jax.random.split(step_rng, ddim_steps)
    for i in range(ddim_steps):
      x_next, x0_hat = diffusion.ddim_step(eps_fn, x, times[i], times[i + 1], batch, schedule,
                                           keys[i])
      x = jax.lax.stop_gradient(x_next)
  positions = x0_hat * schedule.position_scale + diffusion.centroid(batch.positions, batch)[
      batch.node_graph]
  return jnp.where(batch.node_mask[:, None], positions, 0.0)


def optimality_loss(energy_fn: EnergyFn, eps_fn: diffusion.DenoiseFn, batch: GraphBatch,
                    schedule: diffusion.Schedule, rng: jax.Array, *, form: str,
                    t_range: tuple[float, float], ddim_steps: int = 0,
                    noise: bool = True) -> tuple[jax.Array, dict]:
  """Optimality consistency over equilibrium graphs; `energy_fn` must already be stop-gradient."""
  if form not in FORMS:
    raise ValueError(f"optimality form must be one of {FORMS}, got {form!r}")
  r_hat = predict_structure(eps_fn, batch, schedule, rng, t_range=t_range, ddim_steps=ddim_steps,
                            noise=noise)
  mask = batch.is_equilibrium & batch.graph_mask
  gap = masked_mean(energy_gap(energy_fn, r_hat, batch.positions, batch), mask)
  if form == "stationarity":
    loss = masked_mean(stationarity(energy_fn, r_hat, batch), mask)
  elif form == "relaxed":
    loss = masked_mean(distance_to_minimum(r_hat, batch), mask & batch.ref_mask)
  else:
    loss = gap
  return loss, {f"optimality_{form}": loss, "optimality_energy_gap": gap}

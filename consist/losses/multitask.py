"""Stage-1 losses: energy MSE, force MSE (forces = -grad E), denoising score matching."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from consist import diffusion
from consist.losses.masking import graph_mean, masked_mean, num_atoms
from consist.types import GraphBatch


def energy_loss(energy_G: jax.Array, batch: GraphBatch, *,
                per_atom: bool) -> tuple[jax.Array, dict]:
  """MSE of energies (eV^2) over graphs with `energy_mask`.

  per_atom: compare (E_pred - E) / n_atoms, i.e. eV^2/atom^2, so a molecule weighs the same
  whatever its size (recommended when sizes vary); else total-energy MSE.
  """
  err = energy_G - batch.energy
  if per_atom:
    err = err / jnp.maximum(num_atoms(batch, err.dtype), 1.0)
  mse = masked_mean(err**2, batch.energy_mask & batch.graph_mask)
  return mse, {"energy_mse": mse,
               "energy_mae": masked_mean(jnp.abs(energy_G - batch.energy),
                                         batch.energy_mask & batch.graph_mask)}


def forces_loss(forces_N3: jax.Array, batch: GraphBatch) -> tuple[jax.Array, dict]:
  """Per graph, mean over atoms of |F_pred - F|^2 (eV^2/Å^2); mean over graphs with forces."""
  sq = jnp.sum((forces_N3 - batch.forces) ** 2, axis=-1)
  mse = masked_mean(graph_mean(sq, batch), batch.forces_mask & batch.graph_mask)
  return mse, {"forces_mse": mse, "forces_rmse": jnp.sqrt(mse / 3.0)}


WEIGHTINGS = ("eps", "min_snr", "edm")


def eps_weight(t_G: jax.Array, schedule: diffusion.Schedule, weighting: str,
               snr_gamma: float) -> jax.Array | None:
  """Per-graph weight [G] of an eps-space squared error under `weighting` (see `denoising_loss`):
  None for "eps" (w = 1), min(SNR, snr_gamma) / SNR for "min_snr", 1 + s^2 / sd^2 for "edm".

  Raises:
    ValueError: unknown weighting.
  """
  if weighting not in WEIGHTINGS:
    raise ValueError(f"eps-space weighting must be one of {WEIGHTINGS}, got {weighting!r}")
  if weighting == "eps":
    return None
  if weighting == "edm":
    s, _, _ = schedule.precondition(t_G)
    return 1.0 + (s * schedule.position_scale / schedule.sigma_data) ** 2
  alpha, sigma = schedule.alpha_sigma(t_G)
  snr = (alpha / sigma) ** 2
  return jnp.minimum(snr, snr_gamma) / snr


def denoising_loss(eps_fn: diffusion.DenoiseFn, batch: GraphBatch, schedule: diffusion.Schedule,
                   rng: jax.Array, *, t_min: float, t_max: float = 1.0, weighting: str = "eps",
                   snr_gamma: float = 5.0) -> tuple[jax.Array, dict]:
  """Denoising score matching on equilibrium structures, t ~ U[t_min, t_max] per graph.

  Per graph, mean over atoms of w(t) |eps_pred - eps|^2 (eps-space, dimensionless); mean over
  graphs with `is_equilibrium`. Since |eps_pred - eps|^2 = SNR(t) |x0_pred - x0|^2 (SNR =
  alpha^2 / sigma^2, scaled coordinates), the weighting picks what the loss emphasises:
    "eps":     w = 1, i.e. x0 errors weighted by SNR, which diverges as t -> 0 (suits the eps
               parameterisation, whose output scale does not depend on t);
    "min_snr": w = min(SNR, snr_gamma) / SNR (Hang et al. 2023), i.e. x0 errors weighted by
               min(SNR, snr_gamma): bounded at small t, so x0-parameterised gradients stay O(1)
               and do not swamp the energy terms in the shared encoder;
    "edm":     w = 1 + s^2 / sd^2 (s = sigma / alpha, sd = `Schedule.sigma_data`): the squared
               error of the preconditioned network output F, x0 errors weighted by 1 / c_out^2
               (EDM's lambda), unit-scale at every t (use it with the "edm" parameterisation).
  "denoise_mse" always reports the unweighted eps-space error.
  """
  t_rng, eps_rng = jax.random.split(rng)
  dtype = batch.positions.dtype
  t_G = jax.random.uniform(t_rng, batch.graph_mask.shape, dtype, t_min, t_max)
  eps = diffusion.centered_noise(eps_rng, batch, dtype)
  x_t = diffusion.add_noise(diffusion.to_scaled(batch.positions, batch, schedule), eps, t_G,
                            batch, schedule)
  weight = eps_weight(t_G, schedule, weighting, snr_gamma)
  sq = jnp.sum((eps_fn(x_t, t_G) - eps) ** 2, axis=-1)
  mask = batch.is_equilibrium & batch.graph_mask
  mse = masked_mean(graph_mean(sq, batch), mask)
  if weight is None:
    return mse, {"denoise_mse": mse}
  loss = masked_mean(weight * graph_mean(sq, batch), mask)
  return loss, {"denoise_mse": mse, "denoise_weighted": loss}

"""Score consistency: at thermal equilibrium p(R|G) ∝ exp(-E/kT), so grad_R log p = F / kT.

The diffusion model's score at a small time t_s, s = -eps_theta / (sigma(t_s) * position_scale)
(Å^-1), should match F / kT (F in eV/Å, kT in eV) on equilibrium AND off-equilibrium structures.
F is the force label where the graph has one (how force data and off-equilibrium data reach the
structure model directly), else -grad_R E_sg (energy params under stop_gradient).

Choice of t_s and kT: the structure data is a low-temperature ensemble, so the noise at t_s must be
small against the thermal width: (sigma(t_s) * position_scale)^2 << kT / lambda_max, lambda_max the
stiffest Hessian eigenvalue (eV/Å^2). Stretching a bond (k ~ 25-40 eV/Å^2) gives lambda_max ~ 50-80
eV/Å^2; at kT = 0.025 eV (~300 K) the thermal width is ~0.02 Å, so the defaults t_s = 0.002
(cosine: sigma ≈ 0.0031, i.e. 0.0031 Å at position_scale 1 Å) and kT = 0.025 eV satisfy it.

Weighting: the score at t_s is huge (|F|/kT ~ 100 Å^-1 at 2.5 eV/Å) and its scale depends on the
choice of t_s, so the loss compares sigma * position_scale * score with sigma * position_scale *
F / kT, i.e. -eps_theta against eps_target = -sigma * position_scale * F / kT, and then weights the
eps-space error exactly as the denoising loss does (`multitask.denoising_loss`), so the two terms'
weights are comparable under either parameterisation:
  "eps":     w = 1. Right for the eps parameterisation.
  "min_snr": w = min(SNR, gamma) / SNR: x0-space errors weighted by min(SNR, gamma). Under the x0
             parameterisation the implied eps is (x - alpha x0_hat) / sigma, so with w = 1 an x0
             error of 0.05 Å reads as eps ~ 16 at t_s = 0.002: the term (~10^3) swamps every other
             one and, through global gradient clipping, starves the multi-task terms of the update
             (measured: grad norm 300-8000 at clip 10; docs/DEVLOG.md).
Per graph, mean over atoms of the weighted squared difference; mean over real graphs.
"score_consistency_eps" always reports the unweighted eps-space error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from consist import diffusion
from consist.losses import multitask
from consist.losses.masking import graph_mean, masked_mean
from consist.models.heads import remove_mean
from consist.types import GraphBatch


def target_eps(forces_N3: jax.Array, t_G: jax.Array, batch: GraphBatch,
               schedule: diffusion.Schedule, kT: float) -> jax.Array:
  """The eps that makes the model score equal F / kT: -sigma(t) * position_scale * F / kT."""
  _, sigma = schedule.alpha_sigma(t_G)
  return -(sigma[batch.node_graph][:, None] * schedule.position_scale / kT) * remove_mean(
      forces_N3, batch)


def score_consistency_loss(eps_fn: diffusion.DenoiseFn, batch: GraphBatch,
                           schedule: diffusion.Schedule, fallback_forces_N3: jax.Array, *,
                           t_score: float, kT: float, weighting: str = "eps",
                           snr_gamma: float = 5.0) -> tuple[jax.Array, dict]:
  """Score consistency over all real graphs.

  Args:
    eps_fn: the structure denoiser (routed params).
    fallback_forces_N3: -grad_R E_sg at `batch.positions` (eV/Å), used where a graph has no
      force labels; must be stop-gradient.
    t_score: the small diffusion time t_s; kT: eV.
    weighting, snr_gamma: as in `multitask.denoising_loss` ("eps" or "min_snr").
  """
  t_G = jnp.full(batch.graph_mask.shape, t_score, batch.positions.dtype)
  weight = multitask.eps_weight(t_G, schedule, weighting, snr_gamma)
  forces = jnp.where(batch.forces_mask[batch.node_graph][:, None], batch.forces,
                     fallback_forces_N3)
  x = diffusion.to_scaled(batch.positions, batch, schedule)
  sq = jnp.sum((eps_fn(x, t_G) - target_eps(forces, t_G, batch, schedule, kT)) ** 2, axis=-1)
  per_graph_eps = graph_mean(sq, batch)
  per_graph = per_graph_eps if weight is None else weight * per_graph_eps
  loss = masked_mean(per_graph, batch.graph_mask)
  return loss, {
      "score_consistency": loss,
      "score_consistency_eps": masked_mean(per_graph_eps, batch.graph_mask),
      "score_consistency_equilibrium": masked_mean(per_graph, batch.graph_mask & batch.is_equilibrium),
      "score_consistency_off_equilibrium": masked_mean(
          per_graph, batch.graph_mask & ~batch.is_equilibrium),
  }

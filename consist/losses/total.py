"""The weighted total loss and the gradient routing of the consistency terms.

Multi-task terms (energy, forces, denoising) see all params. Each consistency term sees:
  * the energy through params entirely under stop_gradient (E_sg): the energy head NEVER receives
    gradient from a consistency term, and neither does the encoder through the energy pathway;
  * the structure denoiser through `route_params(params, config.consistency_params)`: only the
    named subtrees ("structure_head", "structure_head+encoder", or "level_increment": the
    consistency level's own increment, nothing level 0 uses) stay differentiable.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from consist import diffusion
from consist.losses import multitask, optimality, score
from consist.models import model as model_lib
from consist.types import GraphBatch

CONSISTENCY_PARAMS = ("structure_head", "structure_head+encoder", "level_increment")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Weights and options of every term (a weight of 0 switches a term off and skips its compute).

  Attributes:
    energy_weight, forces_weight, denoise_weight: multi-task terms (stage 1 and 2).
    energy_per_atom: energy MSE on (E_pred - E) / n_atoms instead of total energies.
    denoise_t_min, denoise_t_max: denoising times t ~ U[denoise_t_min, denoise_t_max]; a
      t_max < 1 trains only the low-noise range that one-step / refine generation uses.
    denoise_weighting: "eps" (plain eps-space MSE) or "min_snr" (bounded weight of x0 errors at
      small t; use it with the "x0" parameterisation), see `multitask.denoising_loss`; score
      consistency is weighted the same way.
    denoise_snr_gamma: the SNR cap of "min_snr".
    optimality_weight: weight of optimality consistency (stage 2).
    optimality_form: "stationarity" (|grad E_sg(R_hat)|^2, HVP gradient) or "descent".
    optimality_t_range: (t_lo, t_hi) from which R_hat is denoised.
    optimality_ddim_steps: 0 = one-step x0 prediction; n = last step of an n-step DDIM chain.
    optimality_noise: R_hat is predicted from the data structure noised to t (SDEdit-like) or,
      False, from its unnoised x_t (as deterministic refinement, `diffusion.refine(noise=False)`).
    score_weight: weight of score consistency (stage 2).
    score_t: the small time t_s of the score (see `consist.losses.score` for the choice).
    kT: eV, temperature of the Boltzmann ensemble the structure data is taken to be.
    consistency_params: which params consistency terms may update: "structure_head",
      "structure_head+encoder" or "level_increment" (needs `ModelConfig.level_params="increment"`).
    consistency_level: the structure level (`ModelConfig.structure_levels`) the consistency terms
      train: 0 = the level denoising trains (the paper's single structure model: the two pull the
      same prediction toward the cheap structures and the learned minima), 1 = the accurate level,
      a separate conditioning that denoising never asks for the cheap structures.
  """

  energy_weight: float = 1.0
  forces_weight: float = 1.0
  denoise_weight: float = 1.0
  energy_per_atom: bool = True
  denoise_t_min: float = 1e-3
  denoise_t_max: float = 1.0
  denoise_weighting: str = "eps"
  denoise_snr_gamma: float = 5.0
  optimality_weight: float = 0.0
  optimality_form: str = "stationarity"
  optimality_t_range: tuple[float, float] = (0.02, 0.1)
  optimality_ddim_steps: int = 0
  optimality_noise: bool = True
  score_weight: float = 0.0
  score_t: float = 0.002
  kT: float = 0.025
  consistency_params: str = "structure_head"
  consistency_level: int = 0

  def __post_init__(self):
    if self.consistency_params not in CONSISTENCY_PARAMS:
      raise ValueError(f"LossConfig.consistency_params must be one of {CONSISTENCY_PARAMS}, "
                       f"got {self.consistency_params!r}")
    if self.optimality_form not in optimality.FORMS:
      raise ValueError(f"LossConfig.optimality_form must be one of {optimality.FORMS}, "
                       f"got {self.optimality_form!r}")
    if self.denoise_weighting not in multitask.WEIGHTINGS:
      raise ValueError(f"LossConfig.denoise_weighting must be one of {multitask.WEIGHTINGS}, "
                       f"got {self.denoise_weighting!r}")
    if self.denoise_snr_gamma <= 0:
      raise ValueError(f"LossConfig.denoise_snr_gamma must be > 0, got {self.denoise_snr_gamma}")
    lo, hi = self.optimality_t_range
    if not 0.0 < lo <= hi <= 1.0:
      raise ValueError(f"LossConfig.optimality_t_range must satisfy 0 < lo <= hi <= 1, got "
                       f"{self.optimality_t_range}")
    if self.consistency_level < 0:
      raise ValueError(f"LossConfig.consistency_level must be >= 0, got {self.consistency_level}")
    if self.kT <= 0 or not 0.0 < self.score_t < 1.0:
      raise ValueError(f"LossConfig: need kT > 0 eV and 0 < score_t < 1, got kT={self.kT}, "
                       f"score_t={self.score_t}")

  @property
  def has_consistency(self) -> bool:
    return self.optimality_weight > 0 or self.score_weight > 0


def route_params(params: dict, trainable: str) -> dict:
  """Params with every top-level subtree not named in `trainable` ("a+b") under stop_gradient."""
  names = set(trainable.split("+"))
  unknown = names - set(params)
  if unknown:
    raise ValueError(f"route_params: no param subtree(s) {sorted(unknown)} in {sorted(params)}")
  return {k: v if k in names else jax.lax.stop_gradient(v) for k, v in params.items()}


def consistency_terms(model: model_lib.Model, schedule: diffusion.Schedule, config: LossConfig,
                      params: dict, batch: GraphBatch, rng: jax.Array) -> dict:
  """{name: (loss, metrics)} of the consistency terms with weight > 0, gradients routed."""
  energy_params = jax.lax.stop_gradient(params)
  energy_fn = lambda pos: model_lib.energy(model, energy_params, batch, pos)
  eps_fn = diffusion.model_denoiser(model, route_params(params, config.consistency_params),
                                    batch, schedule, level=config.consistency_level)
  terms = {}
  if config.optimality_weight > 0:
    terms["optimality"] = optimality.optimality_loss(
        energy_fn, eps_fn, batch, schedule, rng, form=config.optimality_form,
        t_range=config.optimality_t_range, ddim_steps=config.optimality_ddim_steps,
        noise=config.optimality_noise)
  if config.score_weight > 0:
    _, forces_sg = model_lib.energy_and_forces(model, energy_params, batch)
    terms["score"] = score.score_consistency_loss(
        eps_fn, batch, schedule, forces_sg, t_score=config.score_t, kT=config.kT,
        weighting=config.denoise_weighting, snr_gamma=config.denoise_snr_gamma)
  return terms


def total_loss(model: model_lib.Model, schedule: diffusion.Schedule, config: LossConfig,
               params: dict, batch: GraphBatch, rng: jax.Array) -> tuple[jax.Array, dict]:
  """Weighted sum of all enabled terms for one device's batch -> (loss, metrics).

  metrics holds every enabled term's unweighted value (plus diagnostics) and "loss".
  """
  denoise_rng, consistency_rng = jax.random.split(rng)
  metrics = {}
  loss = jnp.zeros((), batch.positions.dtype)
  if config.energy_weight > 0 or config.forces_weight > 0:
    energy_G, forces = model_lib.energy_and_forces(model, params, batch)
    term, m = multitask.energy_loss(energy_G, batch, per_atom=config.energy_per_atom)
    loss, metrics = loss + config.energy_weight * term, metrics | m
    term, m = multitask.forces_loss(forces, batch)
    loss, metrics = loss + config.forces_weight * term, metrics | m
  if config.denoise_weight > 0:
    term, m = multitask.denoising_loss(diffusion.model_denoiser(model, params, batch, schedule),
                                       batch, schedule, denoise_rng, t_min=config.denoise_t_min,
                                       t_max=config.denoise_t_max,
                                       weighting=config.denoise_weighting,
                                       snr_gamma=config.denoise_snr_gamma)
    loss, metrics = loss + config.denoise_weight * term, metrics | m
  weights = {"optimality": config.optimality_weight, "score": config.score_weight}
  for name, (term, m) in consistency_terms(model, schedule, config, params, batch,
                                           consistency_rng).items():
    loss, metrics = loss + weights[name] * term, metrics | m
  metrics["loss"] = loss
  return loss, metrics

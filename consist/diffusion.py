"""Structure diffusion: VP noise schedules, centre-of-mass-free noising, conversions and samplers.

Coordinates: the diffusion runs on scaled, centred coordinates x = (R - centroid) / position_scale
(R in Å, `Schedule.position_scale` in Å per unit). Per graph, x_t = alpha(t) x_0 + sigma(t) eps
with alpha^2 + sigma^2 = 1 (variance preserving) and eps a standard Gaussian projected onto the
centroid-free subspace of the graph's real atoms (E(3)-invariant prior; the centroid, i.e. the
unweighted "centre of mass", carries no information). Padding rows are 0 throughout.

Conversions (per node, a = alpha(t), s = sigma(t)):
  x0 = (x_t - s eps) / a,   eps = (x_t - a x0) / s,
  score of p_t over R in Å^-1:  grad_R log p_t = -eps / (s * position_scale).

A denoiser is any `DenoiseFn(x_t [N, 3], t [G]) -> eps [N, 3]` (`model_denoiser` wraps the
model's structure head; tests use the analytic optimal denoiser of a Gaussian).

Preconditioning (`ModelConfig.prediction == "edm"`, Karras et al. 2022 written for this VP
schedule): with y = x_t / alpha the input in the data's units and s = sigma / alpha its noise level,
  x0_hat = c_skip(s) y + c_out(s) F,   c_skip = sd^2 / (s^2 + sd^2),   c_out = s sd / sqrt(s^2 + sd^2),
sd = `Schedule.sigma_data` (diffusion units). As s -> 0 the x0 prediction tends to its input
whatever the network F says (c_skip -> 1, c_out ~ s): a structure refined at a small t comes back
nearly unchanged by construction, and an error of the network moves it by only ~ s times that
error. The matching loss weight (`multitask.eps_weight`, "edm") makes the error in F unit-weighted. Samplers take one
PRNG key; `sample_k` vmaps any of them over K keys for K samples per molecule in one call.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from consist.models import model as model_lib
from consist.models.heads import remove_mean, segment_sum_graphs
from consist.types import GraphBatch

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]
SCHEDULES = ("cosine", "linear")


@dataclasses.dataclass(frozen=True)
class Schedule:
  """VP schedule over continuous t in [0, 1].

  Attributes:
    kind: "cosine": alpha = cos(pi t / 2) written through its log-SNR,
      logsnr(t) = -2 log tan(pi t / 2), clipped to [logsnr_min, logsnr_max] (so sigma(0) =
      exp(-logsnr_max / 2) and alpha(1) = exp(logsnr_min / 2), never exactly 0); "linear": the VP
      SDE of Song et al. with beta(t) = beta_min + t (beta_max - beta_min).
    position_scale: Å per diffusion unit (x = R / position_scale). 1 Å: a unit-variance prior
      spreads atoms over about the size of a small molecule.
    sigma_data: Å, the data scale sd of the "edm" preconditioning (see the module docstring).
      1 Å (with position_scale 1) makes EDM's input scaling c_in = 1 / sqrt(s^2 + sd^2) equal to
      this schedule's own x_t, so the network sees x_t as it is; the identity dominates the x0
      prediction for s << sd.
  """

  kind: str = "cosine"
  position_scale: float = 1.0
  logsnr_min: float = -15.0
  logsnr_max: float = 20.0
  beta_min: float = 0.1
  beta_max: float = 20.0
  sigma_data: float = 1.0

  def __post_init__(self):
    if self.kind not in SCHEDULES:
      raise ValueError(f"Schedule.kind must be one of {SCHEDULES}, got {self.kind!r}")
    if self.position_scale <= 0:
      raise ValueError(f"Schedule.position_scale must be > 0 Å, got {self.position_scale}")
    if self.sigma_data <= 0:
      raise ValueError(f"Schedule.sigma_data must be > 0 Å, got {self.sigma_data}")

  def alpha_sigma(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(alpha(t), sigma(t)), same shape as t."""
    t = jnp.asarray(t)
    if self.kind == "cosine":
      b = jnp.arctan(jnp.exp(-0.5 * self.logsnr_max))
      a = jnp.arctan(jnp.exp(-0.5 * self.logsnr_min)) - b
      logsnr = -2.0 * jnp.log(jnp.tan(a * t + b))
      return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))
    log_alpha2 = -(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2)
    return jnp.exp(0.5 * log_alpha2), jnp.sqrt(-jnp.expm1(log_alpha2))


  def precondition(self, t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(s, c_skip, c_out) of the "edm" parameterisation at t, in diffusion units (module doc)."""
    alpha, sigma = self.alpha_sigma(t)
    s = sigma / alpha
    sd = self.sigma_data / self.position_scale
    norm = jnp.sqrt(s**2 + sd**2)
    return s, sd**2 / norm**2, s * sd / norm


def _per_node(values_G: jax.Array, batch: GraphBatch) -> jax.Array:
  return values_G[batch.node_graph][:, None]


def centroid(positions_N3: jax.Array, batch: GraphBatch) -> jax.Array:
  """Per-graph mean of real-atom positions [G, 3]."""
  counts = jnp.maximum(segment_sum_graphs(jnp.ones_like(positions_N3[:, 0]), batch), 1.0)
  return segment_sum_graphs(positions_N3, batch) / counts[:, None]


def to_scaled(positions_N3: jax.Array, batch: GraphBatch, schedule: Schedule) -> jax.Array:
  """Å -> centred diffusion coordinates x."""
  return remove_mean(positions_N3, batch) / schedule.position_scale


def split_keys(rng: jax.Array, n: int) -> jax.Array:
  """n keys from one key ([] -> [n]) or from one key per graph ([G] -> [n, G])."""
  if rng.ndim == 0:
    return jax.random.split(rng, n)
  return jnp.swapaxes(jax.vmap(lambda k: jax.random.split(k, n))(rng), 0, 1)


def centered_noise(rng: jax.Array, batch: GraphBatch, dtype=jnp.float32) -> jax.Array:
  """Standard Gaussian [N, 3] projected to zero centroid per graph; 0 on padding nodes.

  `rng` is one key, or one key per graph [G]: then a graph's noise depends only on its own key
  and atoms, not on the other graphs of the batch or its place among them.
  """
  if rng.ndim == 0:
    return remove_mean(jax.random.normal(rng, (batch.num_nodes, 3), dtype), batch)
  first_node = jnp.cumsum(batch.n_node) - batch.n_node
  local = jnp.arange(batch.num_nodes) - first_node[batch.node_graph]
  node_keys = jax.vmap(jax.random.fold_in)(rng[batch.node_graph], local)
  noise = jax.vmap(lambda k: jax.random.normal(k, (3,), dtype))(node_keys)
  return remove_mean(noise, batch)


def add_noise(x0: jax.Array, eps: jax.Array, t_G: jax.Array, batch: GraphBatch,
              schedule: Schedule) -> jax.Array:
  """Forward noising x_t = alpha x0 + sigma eps (per graph time t [G])."""
  alpha, sigma = schedule.alpha_sigma(t_G)
  x_t = _per_node(alpha, batch) * x0 + _per_node(sigma, batch) * eps
  return jnp.where(batch.node_mask[:, None], x_t, 0.0)


def eps_to_x0(x_t, eps, t_G, batch, schedule):
  alpha, sigma = schedule.alpha_sigma(t_G)
  return (x_t - _per_node(sigma, batch) * eps) / _per_node(alpha, batch)


def x0_to_eps(x_t, x0, t_G, batch, schedule):
  alpha, sigma = schedule.alpha_sigma(t_G)
  return (x_t - _per_node(alpha, batch) * x0) / _per_node(sigma, batch)


def eps_to_score(eps, t_G, batch, schedule):
  """Score over positions in Å^-1: -eps / (sigma(t) * position_scale)."""
  _, sigma = schedule.alpha_sigma(t_G)
  return -eps / (_per_node(sigma, batch) * schedule.position_scale)


def model_denoiser(model: model_lib.Model, params: dict, batch: GraphBatch,
                   schedule: Schedule, level: int = 0) -> DenoiseFn:
  """The structure head as a `DenoiseFn` ("eps", "x0" and "edm" parameterisations).

  level: the structure level asked for (`ModelConfig.structure_levels`): 0 = the level of the
    training structures (what denoising learns), 1 = the accurate level consistency trains.
  """
  if not 0 <= level < model.config.structure_levels:
    raise ValueError(f"structure level {level} not in [0, {model.config.structure_levels})")

  def eps_fn(x_t, t_G):
    out = model_lib.structure_output(model, params, batch, x_t * schedule.position_scale, t_G, level)
    if model.config.prediction == "eps":
      return out
    if model.config.prediction == "x0":
      return x0_to_eps(x_t, x_t + out, t_G, batch, schedule)
    # edm: eps = (y - x0_hat) / s with y = x_t / alpha, written without the cancellation.
    alpha, _ = schedule.alpha_sigma(t_G)
    s, c_skip, c_out = schedule.precondition(t_G)
    y = x_t / _per_node(alpha, batch)
    eps = _per_node(s / (s**2 + (schedule.sigma_data / schedule.position_scale)**2), batch) * y \
        - _per_node(c_out / s, batch) * out
    return jnp.where(batch.node_mask[:, None], eps, 0.0)

  return eps_fn


def _start(rng, batch, schedule, t_start, init_positions, dtype, noise=True):
  """x at t_start: the prior (init None) or `init_positions` noised to t_start (or, noise False,
  only scaled by alpha(t_start): the input read as the mean of x_t)."""
  t_G = jnp.full(batch.graph_mask.shape, t_start, dtype)
  eps = centered_noise(rng, batch, dtype)
  if init_positions is None:
    _, sigma = schedule.alpha_sigma(t_G)
    return _per_node(sigma, batch) * eps, t_G
  if not noise:
    eps = jnp.zeros_like(eps)
  return add_noise(to_scaled(init_positions, batch, schedule), eps, t_G, batch, schedule), t_G


def _finish(x0, batch, schedule, init_positions):
  """Scaled x0 -> Å; a refined structure keeps the centroid of `init_positions`."""
  positions = x0 * schedule.position_scale
  if init_positions is not None:
    positions = positions + centroid(init_positions, batch)[batch.node_graph]
  return jnp.where(batch.node_mask[:, None], positions, 0.0)


def sample_one_step(eps_fn: DenoiseFn, batch: GraphBatch, schedule: Schedule, rng: jax.Array, *,
                    t_start: float = 1.0, init_positions: jax.Array | None = None,
                    dtype=jnp.float32) -> jax.Array:
  """One-step denoising: the x0 prediction [N, 3] Å from a noisy start at t_start."""
  x_t, t_G = _start(rng, batch, schedule, t_start, init_positions, dtype)
  return _finish(eps_to_x0(x_t, eps_fn(x_t, t_G), t_G, batch, schedule), batch, schedule,
                 init_positions)


def sample_ddim(eps_fn: DenoiseFn, batch: GraphBatch, schedule: Schedule, rng: jax.Array, *,
                num_steps: int, t_start: float = 1.0, init_positions: jax.Array | None = None,
                eta: float = 0.0, noise_scale: float = 1.0, noise: bool = True,
                dtype=jnp.float32) -> jax.Array:
  """DDIM from t_start to 0 in `num_steps` uniform steps; eta = 0 deterministic, 1 ~ ancestral.

  noise_scale: the fresh noise each stochastic step injects is multiplied by it (1 = the DDIM
  sampler of the learned distribution; < 1 = a lower-temperature, mode-seeking sampler).

  noise: with `init_positions`, whether they are noised to t_start (SDEdit) or taken as x_t's
  mean (a deterministic refinement). Returns the x0 prediction of the last step (t_1 -> 0) as
  positions [N, 3] in Å (centred, or with the centroid of `init_positions`).
  """
  start_rng, step_rng = split_keys(rng, 2)
  x, _ = _start(start_rng, batch, schedule, t_start, init_positions, dtype, noise)
  times = t_start * (1.0 - jnp.arange(num_steps + 1, dtype=dtype) / num_steps)

  def step(x, inputs):
    t, s, key = inputs
    return ddim_step(eps_fn, x, t, s, batch, schedule, key, eta=eta, noise_scale=noise_scale)

  keys = split_keys(step_rng, num_steps)
  _, x0_predictions = jax.lax.scan(step, x, (times[:-1], times[1:], keys))
  return _finish(x0_predictions[-1], batch, schedule, init_positions)


def ddim_step(eps_fn: DenoiseFn, x_t: jax.Array, t: jax.Array, s: jax.Array, batch: GraphBatch,
              schedule: Schedule, rng: jax.Array, *, eta: float = 0.0, noise_scale: float = 1.0):
  """One DDIM update from time t to s < t (scalars). Returns (x_s, x0 prediction at t).

  x_s = a_s x0 + sqrt(s_s^2 - c^2) eps + noise_scale c z, c = eta * (the DDPM posterior std)."""
  a_t, s_t = schedule.alpha_sigma(t)
  a_s, s_s = schedule.alpha_sigma(s)
  eps = eps_fn(x_t, jnp.full(batch.graph_mask.shape, t, x_t.dtype))
  x0 = (x_t - s_t * eps) / a_t
  c = eta * jnp.sqrt(jnp.clip((s_s**2 / s_t**2) * (1.0 - a_t**2 / a_s**2), 0.0, None))
  x_s = a_s * x0 + jnp.sqrt(jnp.clip(s_s**2 - c**2, 0.0, None)) * eps
  if eta and noise_scale:
    x_s = x_s + noise_scale * c * centered_noise(rng, batch, x_t.dtype)
  return jnp.where(batch.node_mask[:, None], x_s, 0.0), x0


def refine(eps_fn: DenoiseFn, batch: GraphBatch, schedule: Schedule, rng: jax.Array,
           positions_N3: jax.Array, *, t_star: float, num_steps: int, eta: float = 0.0,
           noise_scale: float = 1.0, noise: bool = True) -> jax.Array:
  """Refinement of `positions_N3` (Å in and out): SDEdit (noise them to t_star, then DDIM to 0)
  or, noise False, DDIM from their unnoised x_t (num_steps 1: one deterministic x0 prediction)."""
  return sample_ddim(eps_fn, batch, schedule, rng, num_steps=num_steps, t_start=t_star,
                     init_positions=positions_N3, eta=eta, noise_scale=noise_scale, noise=noise,
                     dtype=positions_N3.dtype)


def sample_k(sampler: Callable[[jax.Array], jax.Array], rng: jax.Array, k: int) -> jax.Array:
  """K samples [K, N, 3] in one batched call: `sampler(key) -> [N, 3]` vmapped over K keys
  (`rng` one key, or one per graph: see `centered_noise`)."""
  return jax.vmap(sampler)(split_keys(rng, k))

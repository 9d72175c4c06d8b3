"""VP schedules, CoM-free noising, conversions, and the samplers against exact denoisers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from consist import diffusion
from consist.data.batching import Budget
from tests import model_fixtures as fx


@pytest.fixture(scope="module")
def one_molecule():
  """A batch holding one real molecule (formic acid, 5 atoms) plus padding."""
  return fx.batch(fx.world().equilibrium_records()[2:3], Budget(8, 30, 3))


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_schedule_is_variance_preserving_and_monotone(kind):
  schedule = diffusion.Schedule(kind=kind)
  t = jnp.linspace(0.0, 1.0, 101)
  alpha, sigma = schedule.alpha_sigma(t)
  np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
  assert bool((jnp.diff(alpha) < 0).all()) and bool((jnp.diff(sigma) > 0).all())
  assert float(alpha[0]) > 0.9999 and float(sigma[0]) < 1e-3
  assert float(alpha[-1]) < 1e-2 and float(sigma[-1]) > 0.9999


def test_centered_noise_and_conversions(one_molecule):
  b = fx.batch(fx.records())
  schedule = diffusion.Schedule(position_scale=0.7)
  eps = diffusion.centered_noise(jax.random.key(0), b)
  np.testing.assert_allclose(diffusion.centroid(eps, b)[b.graph_mask], 0.0, atol=1e-6)
  assert float(jnp.abs(eps[~b.node_mask]).max()) == 0.0
  x0 = diffusion.to_scaled(b.positions, b, schedule)
  t_G = jnp.linspace(0.05, 0.95, b.num_graphs)
  x_t = diffusion.add_noise(x0, eps, t_G, b, schedule)
  real = b.node_mask
  np.testing.assert_allclose(diffusion.eps_to_x0(x_t, eps, t_G, b, schedule)[real], x0[real],
                             atol=1e-5)
  np.testing.assert_allclose(diffusion.x0_to_eps(x_t, x0, t_G, b, schedule)[real], eps[real],
                             atol=1e-4)
  _, sigma = schedule.alpha_sigma(t_G)
  score = diffusion.eps_to_score(eps, t_G, b, schedule)
  np.testing.assert_allclose(score[real], (-eps / (sigma[b.node_graph][:, None] * 0.7))[real],
                             rtol=1e-6)


def _point_denoiser(x0_star, batch, schedule):
  """Exact denoiser of a point-mass target at x0_star (scaled coordinates)."""
  return lambda x_t, t_G: diffusion.x0_to_eps(x_t, x0_star, t_G, batch, schedule)


def test_one_step_and_refine_are_exact_for_a_point_target(one_molecule):
  b = one_molecule
  schedule = diffusion.Schedule()
  target = jnp.asarray(fx.world().molecules[2].accurate_minimum, jnp.float32)
  n = target.shape[0]
  x0_star = diffusion.to_scaled(b.positions.at[:n].set(target), b, schedule)
  eps_fn = _point_denoiser(x0_star, b, schedule)
  start = b.positions + jnp.where(b.node_mask[:, None], 1.5, 0.0)  # centroid moved by 1.5 Å
  one = diffusion.sample_one_step(eps_fn, b, schedule, jax.random.key(0), t_start=0.3,
                                  init_positions=start)
  ref = diffusion.refine(eps_fn, b, schedule, jax.random.key(1), start, t_star=0.3, num_steps=4)
  expected = target - target.mean(axis=0, keepdims=True) + start[:n].mean(axis=0, keepdims=True)
  np.testing.assert_allclose(one[:n], expected, atol=2e-4)
  np.testing.assert_allclose(ref[:n], expected, atol=2e-4)
  assert float(jnp.abs(ref[n:]).max()) == 0.0


def _gaussian_target(n_atoms, rng):
  """Mean [n, 3] and covariance [3n, 3n] of a Gaussian on the centroid-free subspace, and Q."""
  p = np.kron(np.eye(n_atoms) - 1.0 / n_atoms, np.eye(3))
  w, v = np.linalg.eigh(p)
  q = v[:, w > 0.5]  # orthonormal basis of the centroid-free subspace, [3n, 3(n-1)]
  d = q.shape[1]
  b = rng.normal(size=(d, d)) * 0.15
  s = b @ b.T + 0.01 * np.eye(d)
  mean = (p @ rng.normal(size=3 * n_atoms)).reshape(n_atoms, 3)
  return mean, q @ s @ q.T, q, s


def _gaussian_denoiser(mean, q, s, n, batch, schedule):
  """Exact E[eps | x_t] for x0 ~ N(mean, Q S Q^T) (scaled units; real atoms are the first n)."""
  q, s, mean_sub = jnp.asarray(q), jnp.asarray(s), jnp.asarray(q.T @ mean.ravel())

  def eps_fn(x_t, t_G):
    alpha, sigma = schedule.alpha_sigma(t_G[0])
    y = q.T @ x_t[:n].reshape(-1)
    cov = alpha**2 * s + sigma**2 * jnp.eye(s.shape[0])
    eps_sub = sigma * jnp.linalg.solve(cov, y - alpha * mean_sub)
    return jnp.zeros_like(x_t).at[:n].set((q @ eps_sub).reshape(n, 3))

  return eps_fn


@pytest.fixture(scope="module")
def gaussian(one_molecule):
  """(n real atoms, schedule, target mean [n, 3], covariance [3n, 3n], its exact denoiser)."""
  n = int(one_molecule.node_mask.sum())
  schedule = diffusion.Schedule()
  mean, cov, q, s = _gaussian_target(n, np.random.default_rng(0))
  return n, schedule, mean, cov, _gaussian_denoiser(mean, q, s, n, one_molecule, schedule)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_reproduces_gaussian_mean_and_covariance(one_molecule, gaussian, eta):
  b = one_molecule
  n, schedule, mean, cov, eps_fn = gaussian
  k = 4000
  sample = jax.jit(lambda key: diffusion.sample_k(
      lambda kk: diffusion.sample_ddim(eps_fn, b, schedule, kk, num_steps=100, eta=eta),
      key, k))
  x = np.asarray(sample(jax.random.key(0)))[:, :n].reshape(k, -1)
  # Tolerances: 5 standard errors for the mean; the covariance's relative Frobenius sampling
  # error is about sqrt((tr^2 / |C|^2 + 1) / k) <= 0.06 here, 0.15 allows for it.
  std_err = np.sqrt(np.diag(cov) / k)
  assert np.all(np.abs(x.mean(axis=0) - mean.ravel()) < 5 * std_err + 1e-4)
  rel = np.linalg.norm(np.cov(x.T) - cov) / np.linalg.norm(cov)
  assert rel < 0.15, rel
  # The test can fail: one-step denoising from pure noise collapses onto the mean.
  one = jax.jit(lambda key: diffusion.sample_k(
      lambda kk: diffusion.sample_one_step(eps_fn, b, schedule, kk), key, 500))
  x1 = np.asarray(one(jax.random.key(1)))[:, :n].reshape(500, -1)
  assert np.linalg.norm(np.cov(x1.T) - cov) / np.linalg.norm(cov) > 0.5


def test_noise_scale_below_one_samples_a_narrower_distribution(one_molecule, gaussian):
  """noise_scale 1 is the learned distribution (above); < 1 lowers its temperature: the samples keep
  the mean and shrink toward it, the more the smaller the scale."""
  b = one_molecule
  n, schedule, mean, cov, eps_fn = gaussian
  k = 2000
  spread = []
  for noise_scale in (1.0, 0.5, 0.0):
    sample = jax.jit(lambda key, ns=noise_scale: diffusion.sample_k(
        lambda kk: diffusion.sample_ddim(eps_fn, b, schedule, kk, num_steps=100, eta=1.0,
                                         noise_scale=ns), key, k))
    x = np.asarray(sample(jax.random.key(0)))[:, :n].reshape(k, -1)
    assert np.all(np.abs(x.mean(axis=0) - mean.ravel()) < 5 * np.sqrt(np.diag(cov) / k) + 1e-4)
    spread.append(np.trace(np.cov(x.T)) / np.trace(cov))
  assert abs(spread[0] - 1.0) < 0.1 and spread[1] < 0.8 * spread[0] and spread[2] < 0.8 * spread[1], spread


def test_sampling_defaults_are_per_mode():
  from consist.inference import Sampling
  ddim, refine = Sampling(mode="ddim"), Sampling(mode="refine")
  assert (ddim.steps, ddim.eta, ddim.noise_scale, ddim.candidates) == (100, 1.0, 0.5, 16)  # de novo:
  # ancestral at a lower temperature, the medoid of 16 samples
  assert (refine.steps, refine.eta, refine.candidates) == (1, 0.0, 1)  # refine: one deterministic step
  assert Sampling(mode="ddim", steps=10, eta=0.0).eta == 0.0  # explicit values are kept
  with pytest.raises(ValueError, match=r"eta: must lie in \[0, 1\]"):
    Sampling(mode="ddim", eta=1.5)
  with pytest.raises(ValueError, match=r"noise_scale: must lie in \[0, 1\]"):
    Sampling(mode="ddim", noise_scale=-0.1)
  with pytest.raises(ValueError, match="candidates: .* 1 in refine mode"):
    Sampling(mode="refine", candidates=4)

"""Losses: masking / normalisation, the HVP, gradient routing, and the synthetic-world physics."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from consist import diffusion, synthetic
from consist.data.batching import Budget
from consist.losses import multitask, optimality, score, total
from consist.eval.structure import kabsch_align
from consist.losses.masking import graph_mean, masked_mean
from consist.models import model as model_lib
from tests import model_fixtures as fx


@pytest.fixture(scope="module")
def setup():
  b = fx.batch(fx.records())
  model, params = fx.model_and_params(example=b)
  return b, model, params


def _spring_energy_fn(batch, mol_indices, level=synthetic.ACCURATE):
  springs = jax.tree.map(jnp.asarray, fx.world().springs_for(mol_indices, level))
  return lambda pos: synthetic.spring_energy(pos, springs, batch.num_graphs)


def test_energy_and_force_losses_are_masked_and_per_molecule(setup):
  b, _, _ = setup
  pred_e = b.energy + 0.3
  pred_f = b.forces + 0.1
  e_loss, _ = multitask.energy_loss(pred_e, b, per_atom=False)
  f_loss, _ = multitask.forces_loss(pred_f, b)
  np.testing.assert_allclose(e_loss, 0.09, rtol=1e-5)
  np.testing.assert_allclose(f_loss, 0.03, rtol=1e-5)
  # Unlabelled graphs and padding do not count, whatever their predictions.
  g0 = 0
  unlabelled = b.replace(energy_mask=b.energy_mask.at[g0].set(False),
                         forces_mask=b.forces_mask.at[g0].set(False))
  node0 = b.node_graph == g0
  e_loss2, _ = multitask.energy_loss(pred_e.at[g0].add(100.0), unlabelled, per_atom=False)
  f_loss2, _ = multitask.forces_loss(jnp.where(node0[:, None], 100.0, pred_f), unlabelled)
  np.testing.assert_allclose(e_loss2, e_loss, rtol=1e-5)
  np.testing.assert_allclose(f_loss2, f_loss, rtol=1e-5)
  # Per-atom energy normalisation divides each graph's error by its atom count.
  n_atoms = jax.ops.segment_sum(b.node_mask.astype(jnp.float32), b.node_graph, b.num_graphs)
  per_atom, _ = multitask.energy_loss(b.energy + n_atoms, b, per_atom=True)
  np.testing.assert_allclose(per_atom, 1.0, rtol=1e-5)


def test_denoising_loss_zero_for_exact_denoiser(setup):
  b, _, _ = setup
  schedule = diffusion.Schedule()
  x0 = diffusion.to_scaled(b.positions, b, schedule)
  exact = lambda x_t, t_G: diffusion.x0_to_eps(x_t, x0, t_G, b, schedule)
  loss, _ = multitask.denoising_loss(exact, b, schedule, jax.random.key(0), t_min=1e-3)
  zero, _ = multitask.denoising_loss(lambda x, t: jnp.zeros_like(x), b, schedule,
                                     jax.random.key(0), t_min=1e-3)
  assert float(loss) < 1e-6
  assert 1.5 < float(zero) < 4.5  # E|eps|^2 per atom = 3 (n - 1) / n


def test_min_snr_weighting_caps_small_t_weight(setup):
  b, _, _ = setup
  schedule = diffusion.Schedule()
  zero = lambda x, t: jnp.zeros_like(x)
  kw = dict(t_min=1e-3, t_max=0.3)
  plain, _ = multitask.denoising_loss(zero, b, schedule, jax.random.key(0), **kw)
  loss = lambda gamma: multitask.denoising_loss(zero, b, schedule, jax.random.key(0),
                                                weighting="min_snr", snr_gamma=gamma, **kw)
  # A cap above every SNR in the range leaves the loss unchanged; a low cap down-weights it,
  # while the reported unweighted error stays the plain one.
  np.testing.assert_allclose(loss(1e12)[0], plain, rtol=1e-5)
  capped, metrics = loss(1.0)
  assert float(capped) < 0.3 * float(plain)  # weight 1 / SNR <= 0.26 for t <= 0.3
  np.testing.assert_allclose(metrics["denoise_mse"], plain, rtol=1e-6)
  with pytest.raises(ValueError, match="weighting"):
    multitask.denoising_loss(zero, b, schedule, jax.random.key(0), weighting="snr", **kw)


def test_hvp_equals_finite_differences_of_forces_float64(setup):
  b, model, params = setup
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
    pos = jnp.asarray(b.positions, jnp.float64)
    energy_fn = lambda r: model_lib.energy(model, p64, b, r)
    forces = jax.jit(lambda r: model_lib.energy_and_forces(model, p64, b, r)[1])
    v = jnp.where(b.node_mask[:, None],
                  jax.random.normal(jax.random.key(0), pos.shape, jnp.float64), 0.0)
    hv = optimality.hessian_vector_product(energy_fn, pos, v)
    h = 1e-5
    fd = -(forces(pos + h * v) - forces(pos - h * v)) / (2 * h)
    assert bool(jnp.isfinite(hv).all())
    assert float(jnp.abs(hv).max()) > 1e-2
    np.testing.assert_allclose(hv, fd, rtol=1e-6, atol=1e-6)
    # The stationarity loss's custom VJP (forward-over-reverse) equals plain reverse-over-reverse.
    w = jnp.linspace(0.5, 1.5, b.num_graphs)
    via_hvp = jax.grad(lambda r: jnp.sum(w * optimality.stationarity(energy_fn, r, b)))(pos)

    def plain(r):
      g = jax.grad(lambda q: jnp.sum(energy_fn(q)))(r)
      sq = jnp.where(b.node_mask, jnp.sum(g**2, axis=-1), 0.0)
      n = jax.ops.segment_sum(b.node_mask.astype(r.dtype), b.node_graph, b.num_graphs)
      per_graph = jax.ops.segment_sum(sq, b.node_graph, b.num_graphs) / jnp.maximum(n, 1.0)
      return jnp.sum(w * per_graph)

    np.testing.assert_allclose(via_hvp, jax.grad(plain)(pos), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("term,form", [("optimality", "stationarity"), ("optimality", "descent"),
                                       ("optimality", "relaxed"), ("score", None)])
@pytest.mark.parametrize("routing", total.CONSISTENCY_PARAMS)
def test_consistency_gradient_routing(setup, term, form, routing):
  b, model, params = setup
  increment = routing == "level_increment"
  if increment:  # level 1 with its own increment, moved off zero so that level 1 differs from 0
    model, params = fx.model_and_params(
        dataclasses.replace(fx.SMALL, structure_levels=2, level_params="increment"), example=b)
    params = dict(params, level_increment=jax.tree.map(lambda p: p + 0.01, params["level_increment"]))
  config = total.LossConfig(
      optimality_weight=1.0 if term == "optimality" else 0.0,
      optimality_form=form or "stationarity", score_weight=1.0 if term == "score" else 0.0,
      consistency_params=routing, consistency_level=1 if increment else 0)

  def loss(p):
    return total.consistency_terms(model, diffusion.Schedule(), config, p, b,
                                   jax.random.key(0))[term][0]

  grads = jax.grad(loss)(params)
  norm = lambda tree: max(float(jnp.abs(x).max()) for x in jax.tree.leaves(tree))
  assert norm(grads["energy_model"]) == 0.0
  assert (norm(grads["structure_head"]) > 0.0) == (not increment)
  assert (norm(grads["encoder"]) > 0.0) == (routing == "structure_head+encoder")
  if increment:
    assert norm(grads["level_increment"]["1"]["structure_head"]) > 0.0
    assert norm(grads["level_increment"]["1"]["encoder"]) > 0.0


def test_relaxed_form_is_the_distance_to_the_minimum_in_the_predicted_frame():
  eq = fx.world().equilibrium_records()
  b = fx.batch(eq)  # ref_positions: the accurate minima
  rotation = jnp.asarray(fx.random_orthogonal(np.random.default_rng(0), reflect=False), jnp.float32)
  moved = b.replace(ref_positions=jnp.where(b.node_mask[:, None], b.positions @ rotation.T
                                            + jnp.array([[3.0, -1.0, 2.0]]), 0.0))
  real = np.asarray(b.graph_mask)
  # A target that is the structure itself, rotated and translated, is at distance 0: the minimum
  # is taken in the frame of batch.positions, where R_hat is predicted.
  np.testing.assert_allclose(optimality.distance_to_minimum(b.positions, moved)[real], 0.0, atol=1e-9)
  got = np.asarray(optimality.distance_to_minimum(b.positions, b))[real]
  for g, r in enumerate(eq):
    target = kabsch_align(r.ref_positions, r.positions)
    np.testing.assert_allclose(got[g], np.mean(np.sum((r.positions - target) ** 2, -1)), rtol=1e-4)
  # Graphs without a target do not count.
  no_ref = b.replace(ref_mask=jnp.zeros_like(b.ref_mask))
  model, params = fx.model_and_params(example=b)
  config = total.LossConfig(optimality_weight=1.0, optimality_form="relaxed")
  terms = total.consistency_terms(model, diffusion.Schedule(), config, params, no_ref, jax.random.key(0))
  assert float(terms["optimality"][0]) == 0.0


def test_total_loss_reports_every_enabled_term(setup):
  b, model, params = setup
  config = total.LossConfig(optimality_weight=0.5, score_weight=0.25)
  loss, metrics = total.total_loss(model, diffusion.Schedule(), config, params, b,
                                   jax.random.key(0))
  expected = (metrics["energy_mse"] + metrics["forces_mse"] + metrics["denoise_mse"]
              + 0.5 * metrics["optimality_stationarity"] + 0.25 * metrics["score_consistency"])
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert metrics["loss"] == loss


def test_consistency_is_zero_at_exact_minima_and_positive_at_biased_ones():
  w = fx.world()
  idx = list(range(len(w.molecules)))
  eq = w.equilibrium_records()
  at_min = fx.batch([r.replace(positions=r.ref_positions) for r in eq])
  at_cheap = fx.batch(eq)
  with jax.enable_x64(True):
    cast = lambda b: b.replace(positions=jnp.asarray(b.positions, jnp.float64))
    at_min, at_cheap = cast(at_min), cast(at_cheap)
    energy = _spring_energy_fn(at_min, idx)
    real = at_min.graph_mask
    stat_min = optimality.stationarity(energy, at_min.positions, at_min)[real]
    stat_cheap = optimality.stationarity(energy, at_cheap.positions, at_cheap)[real]
    assert float(stat_min.max()) < 1e-10 and float(stat_cheap.min()) > 0.1
    gap_min = optimality.energy_gap(energy, at_min.positions, at_min.positions, at_min)[real]
    gap_cheap = optimality.energy_gap(energy, at_cheap.positions, at_min.positions, at_min)[real]
    assert float(jnp.abs(gap_min).max()) < 1e-12 and float(gap_cheap.min()) > 1e-3

    # Score consistency: a denoiser whose score is the accurate Boltzmann score F_acc / kT is
    # consistent on any structure (labels are accurate forces); one whose score is the cheap
    # level's Boltzmann score is not, at the cheap minima or off equilibrium.
    schedule, kT, t_s = diffusion.Schedule(), 0.025, 0.002
    off = fx.batch(w.off_equilibrium_records(1, np.random.default_rng(0)))
    off = cast(off)

    def boltzmann_denoiser(b, level):
      e_fn = _spring_energy_fn(b, idx, level)
      forces = lambda r: -jax.grad(lambda q: jnp.sum(e_fn(q)))(r)
      return lambda x, t_G: score.target_eps(forces(x * schedule.position_scale), t_G, b,
                                             schedule, kT)

    for b in (at_cheap, off):
      no_fallback = jnp.zeros_like(b.positions)
      good, _ = score.score_consistency_loss(boltzmann_denoiser(b, synthetic.ACCURATE), b,
                                             schedule, no_fallback, t_score=t_s, kT=kT)
      bad, _ = score.score_consistency_loss(boltzmann_denoiser(b, synthetic.CHEAP), b, schedule,
                                            no_fallback, t_score=t_s, kT=kT)
      assert float(good) < 1e-10 and float(bad) > 1e-2, (float(good), float(bad))


def test_min_snr_score_consistency_is_x0_error_weighted_by_capped_snr(setup):
  """Under "min_snr" the score term reads as min(SNR, gamma) |x0_hat - x0_target|^2 (scaled
  coordinates), with x0 = (x - sigma eps) / alpha, the same weights as the denoising loss."""
  b, model, params = setup
  schedule, kT, t_s, gamma = diffusion.Schedule(), 0.025, 0.002, 5.0
  eps_fn = diffusion.model_denoiser(model, params, b, schedule)
  forces = jax.random.normal(jax.random.key(3), b.positions.shape)
  b = b.replace(forces=forces, forces_mask=b.graph_mask)
  loss, metrics = score.score_consistency_loss(eps_fn, b, schedule, jnp.zeros_like(forces),
                                               t_score=t_s, kT=kT, weighting="min_snr",
                                               snr_gamma=gamma)
  plain, _ = score.score_consistency_loss(eps_fn, b, schedule, jnp.zeros_like(forces),
                                          t_score=t_s, kT=kT)
  t_G = jnp.full(b.graph_mask.shape, t_s)
  alpha, sigma = (a[b.node_graph][:, None] for a in schedule.alpha_sigma(t_G))
  x = diffusion.to_scaled(b.positions, b, schedule)
  x0_hat = (x - sigma * eps_fn(x, t_G)) / alpha
  x0_target = (x - sigma * score.target_eps(forces, t_G, b, schedule, kT)) / alpha
  snr = float((alpha[0, 0] / sigma[0, 0]) ** 2)
  per_graph = graph_mean(min(snr, gamma) * jnp.sum((x0_hat - x0_target) ** 2, -1), b)
  np.testing.assert_allclose(loss, masked_mean(per_graph, b.graph_mask), rtol=1e-4)
  np.testing.assert_allclose(metrics["score_consistency_eps"], plain, rtol=1e-6)
  assert snr > 1e4 and float(loss) < 1e-3 * float(plain)


def test_optimality_with_ddim_chain_only_last_step_has_gradient(setup):
  b, model, params = setup
  schedule = diffusion.Schedule()
  calls = []

  def eps_fn_factory(p):
    inner = diffusion.model_denoiser(model, p, b, schedule)

    def eps_fn(x, t):
      out = inner(x, t)
      calls.append(out)
      return out
    return eps_fn

  def r_hat_sum(p):
    calls.clear()
    r = optimality.predict_structure(eps_fn_factory(p), b, schedule, jax.random.key(0),
                                     t_range=(0.05, 0.1), ddim_steps=3)
    return jnp.sum(r**2)

  g_chain = jax.grad(r_hat_sum)(params)
  assert len(calls) == 3
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_chain["structure_head"])) > 0

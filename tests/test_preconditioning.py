"""The "edm" structure parameterisation, its loss weight, structure levels and deterministic refine."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from consist import diffusion
from consist.config import Config, ConfigError
from consist.losses import multitask
from consist.models import model as model_lib
from tests import model_fixtures as fx

EDM = dataclasses.replace(fx.SMALL, prediction="edm", structure_levels=2)


@pytest.fixture(scope="module")
def setup():
  b = fx.batch(fx.world().equilibrium_records())
  model, params = fx.model_and_params(EDM, example=b)
  # A network far from the identity: scale every structure-model weight up so F is O(1) or more.
  params = dict(params)
  for name in ("encoder", "structure_head"):
    params[name] = jax.tree.map(lambda p: 3.0 * p, params[name])
  return model, params, b


def _x0(model, params, b, schedule, x_t, t_G, level=0):
  eps = diffusion.model_denoiser(model, params, b, schedule, level=level)(x_t, t_G)
  return diffusion.eps_to_x0(x_t, eps, t_G, b, schedule)


def test_edm_x0_is_c_skip_y_plus_c_out_f_float64(setup):
  model, params, b = setup
  with jax.enable_x64():
    p64 = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    b64 = jax.tree.map(lambda x: x.astype(jnp.float64) if x.dtype == jnp.float32 else x, b)
    schedule = diffusion.Schedule(sigma_data=0.7)
    x0 = diffusion.to_scaled(b64.positions, b64, schedule)
    t_G = jnp.linspace(0.01, 0.99, b64.num_graphs)
    x_t = diffusion.add_noise(x0, diffusion.centered_noise(jax.random.key(1), b64, jnp.float64),
                              t_G, b64, schedule)
    f = model_lib.structure_output(model, p64, b64, x_t, t_G)
    alpha, _ = schedule.alpha_sigma(t_G)
    _, c_skip, c_out = schedule.precondition(t_G)
    node = lambda v: v[b64.node_graph][:, None]
    expected = node(c_skip) * x_t / node(alpha) + node(c_out) * f
    real = b64.node_mask
    np.testing.assert_allclose(_x0(model, p64, b64, schedule, x_t, t_G)[real], expected[real],
                               atol=1e-10)


def test_edm_refine_is_the_identity_at_small_t_whatever_the_network(setup):
  model, params, b = setup
  schedule = diffusion.Schedule()
  eps_fn = diffusion.model_denoiser(model, params, b, schedule)
  f_scale = float(jnp.abs(model_lib.structure_output(
      model, params, b, b.positions, jnp.full(b.graph_mask.shape, 0.05))).max())
  assert f_scale > 0.1  # the network itself is far from zero
  real = b.node_mask
  moves = []
  for t_star in (0.003, 0.03):
    out = diffusion.refine(eps_fn, b, schedule, jax.random.key(0), b.positions, t_star=t_star,
                           num_steps=1, noise=False)
    s, _, c_out = schedule.precondition(jnp.asarray(t_star))
    move = float(jnp.abs(out - b.positions)[real].max())
    # |x0 - y| <= (1 - c_skip) |y| + c_out |F|: the identity up to O(s) corrections.
    bound = float(s**2 / (s**2 + 1.0)) * float(jnp.abs(b.positions[real]).max() + 3.0) \
        + float(c_out) * 10.0 * f_scale
    assert move < bound
    moves.append(move)
  assert moves[0] < 0.2 * moves[1]  # the move shrinks with t*


def test_deterministic_refine_does_not_depend_on_the_key(setup):
  model, params, b = setup
  schedule = diffusion.Schedule()
  eps_fn = diffusion.model_denoiser(model, params, b, schedule)
  run = lambda key, noise: diffusion.refine(eps_fn, b, schedule, key, b.positions, t_star=0.1,
                                            num_steps=2, noise=noise)
  np.testing.assert_array_equal(run(jax.random.key(0), False), run(jax.random.key(7), False))
  assert float(jnp.abs(run(jax.random.key(0), True) - run(jax.random.key(7), True)).max()) > 1e-3


def test_edm_weight_makes_the_loss_the_squared_error_of_f(setup):
  """w(t) |eps_hat - eps|^2 == |F - F_target|^2 with F_target = (x0 - c_skip y) / c_out."""
  model, params, b = setup
  schedule = diffusion.Schedule(sigma_data=0.5)
  x0 = diffusion.to_scaled(b.positions, b, schedule)
  t_G = jnp.linspace(0.02, 0.9, b.num_graphs)
  eps = diffusion.centered_noise(jax.random.key(2), b)
  x_t = diffusion.add_noise(x0, eps, t_G, b, schedule)
  eps_hat = diffusion.model_denoiser(model, params, b, schedule)(x_t, t_G)
  w = multitask.eps_weight(t_G, schedule, "edm", 1.0)
  f = model_lib.structure_output(model, params, b, x_t, t_G)
  alpha, _ = schedule.alpha_sigma(t_G)
  _, c_skip, c_out = schedule.precondition(t_G)
  node = lambda v: v[b.node_graph][:, None]
  f_target = (x0 - node(c_skip) * x_t / node(alpha)) / node(c_out)
  real = b.node_mask
  lhs = w[b.node_graph] * jnp.sum((eps_hat - eps) ** 2, -1)
  rhs = jnp.sum((f - f_target) ** 2, -1)
  np.testing.assert_allclose(lhs[real], rhs[real], rtol=2e-3, atol=1e-4)


def test_untrained_level_one_is_level_zero_and_trained_differs(setup):
  model, params, b = setup
  schedule = diffusion.Schedule()
  x_t = diffusion.to_scaled(b.positions, b, schedule)
  t_G = jnp.full(b.graph_mask.shape, 0.05)
  np.testing.assert_array_equal(_x0(model, params, b, schedule, x_t, t_G, 0),
                                _x0(model, params, b, schedule, x_t, t_G, 1))
  assert "level_embedding" in params["encoder"]
  moved = jax.tree.map(lambda p: p, params)
  moved["encoder"] = dict(moved["encoder"], level_embedding=jnp.ones_like(
      params["encoder"]["level_embedding"]))
  level0 = _x0(model, moved, b, schedule, x_t, t_G, 0)
  np.testing.assert_array_equal(level0, _x0(model, params, b, schedule, x_t, t_G, 0))
  assert float(jnp.abs(_x0(model, moved, b, schedule, x_t, t_G, 1) - level0).max()) > 1e-4
  with pytest.raises(ValueError, match="structure level 2"):
    diffusion.model_denoiser(model, params, b, schedule, level=2)


def test_consistency_level_needs_the_structure_level():
  with pytest.raises(ConfigError, match="loss.consistency_level: 1 needs model.structure_levels"):
    Config.from_config_dict({"data": {"path": "x"}, "loss": {"consistency_level": 1}})
  cfg = Config.from_config_dict({"data": {"path": "x"}, "loss": {"consistency_level": 1},
                                 "model": {"structure_levels": 2}})
  assert cfg.loss.consistency_level == 1

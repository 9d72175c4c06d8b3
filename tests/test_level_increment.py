"""Structure levels with their own parameter increments (`ModelConfig.level_params="increment"`):
level 1 starts as level 0, consistency routed to the increment trains level 1 and leaves every
parameter level 0 uses unchanged, and a stage 2 with increments starts from a stage 1 without."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from consist import diffusion
from consist.config import Config, ConfigError
from consist.losses import total
from consist.models import model as model_lib
from tests import model_fixtures as fx

INCREMENT = dataclasses.replace(fx.SMALL, prediction="edm", structure_levels=2, level_params="increment")


@pytest.fixture(scope="module")
def setup():
  b = fx.batch(fx.world().equilibrium_records())
  model, params = fx.model_and_params(INCREMENT, example=b)
  return model, params, b


def _out(model, params, b, level):
  t_G = jnp.full(b.graph_mask.shape, 0.05)
  return model_lib.structure_output(model, params, b, b.positions, t_G, level)


def test_untrained_increment_is_level_zero_and_a_moved_one_is_not(setup):
  model, params, b = setup
  assert set(params[model_lib.LEVEL_INCREMENT]) == {"1"}
  np.testing.assert_array_equal(_out(model, params, b, 0), _out(model, params, b, 1))
  moved = dict(params, level_increment={"1": jax.tree.map(lambda p: p + 0.05, params["level_increment"]["1"])})
  np.testing.assert_array_equal(_out(model, moved, b, 0), _out(model, params, b, 0))
  assert float(jnp.abs(_out(model, moved, b, 1) - _out(model, params, b, 1)).max()) > 1e-4
  # The energy model ignores the increments.
  np.testing.assert_array_equal(model_lib.energy(model, moved, b, b.positions),
                                model_lib.energy(model, params, b, b.positions))


def test_consistency_routed_to_the_increment_moves_level_one_only(setup):
  model, params, b = setup
  schedule = diffusion.Schedule()
  cfg = total.LossConfig(optimality_weight=1.0, optimality_form="descent", optimality_noise=False,
                         optimality_t_range=(0.02, 0.02), consistency_level=1,
                         consistency_params="level_increment", score_weight=0.0, denoise_weight=0.0,
                         energy_weight=0.0, forces_weight=0.0)

  def loss(p):
    terms = total.consistency_terms(model, schedule, cfg, p, b, jax.random.key(0))
    return sum(value for value, _ in terms.values())

  grads = jax.grad(loss)(params)
  for name in ("energy_model", "encoder", "structure_head"):
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads[name])), name
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads["level_increment"])) > 0.0


def test_level_increment_routing_needs_increments():
  base = {"data": {"path": "x"}, "loss": {"consistency_level": 1, "consistency_params": "level_increment"}}
  with pytest.raises(ConfigError, match="level_increment' needs model.level_params='increment'"):
    Config.from_config_dict(dict(base, model={"structure_levels": 2}))
  cfg = Config.from_config_dict(dict(base, model={"structure_levels": 2, "level_params": "increment"}))
  assert cfg.model.level_params == "increment"
  with pytest.raises(ConfigError, match="level_params"):
    Config.from_config_dict({"data": {"path": "x"}, "model": {"level_params": "copy"}})

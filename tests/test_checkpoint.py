"""Orbax checkpoints of whole runs: round trip into the sharded state, keep-N, incompatible models."""

import chex
import jax
import optax
import pytest

import train_toy
from consist import checkpoint, parallel
from consist.data.batching import Budget
from consist.state import create_state

BUDGET = Budget(n_node=24, n_edge=160, n_graph=4)


def _state(mesh, features=16, tx=None):
  tx = tx or optax.adam(1e-2)
  model = train_toy.ToyEnergy(features=features)
  example = jax.tree.map(lambda x: x[0], train_toy.device_batches(train_toy.toy_records(3, 1), BUDGET, 1, 3))
  init = lambda rng, b: model.init(rng, b, b.positions)
  create = lambda: create_state(init, tx, 0, example)
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=parallel.replicated(mesh)),
                          jax.eval_shape(create))
  return parallel.init_state_sharded(create, mesh), abstract, tx


def _trained(mesh, steps=2):
  state, abstract, tx = _state(mesh)
  step = parallel.make_train_step(train_toy.loss_fn, tx, optax.constant_schedule(1e-2), mesh)
  batch = jax.device_put(train_toy.device_batches(train_toy.toy_records(32, 0), BUDGET, 8, 3),
                         parallel.batch_sharding(mesh))
  for _ in range(steps):
    state, _ = step(state, batch)
  return state, abstract


def test_round_trip_into_sharded_state(tmp_path):
  mesh = parallel.make_mesh()
  state, abstract = _trained(mesh)
  expected = jax.device_get(state)
  with checkpoint.Checkpointer(tmp_path, keep=2) as ckpt:
    ckpt.save(state, data_state={"epoch": 1, "step": 7}, meta={"config": {"a": 1}})
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 2
    restored, data_state, meta = ckpt.restore(2, abstract)
  chex.assert_trees_all_equal(jax.device_get(restored), expected)
  assert data_state == {"epoch": 1, "step": 7} and meta["config"] == {"a": 1}
  for leaf in jax.tree.leaves(restored):
    assert leaf.sharding.is_equivalent_to(parallel.replicated(mesh), leaf.ndim)
  # optax state types survive (namedtuples), so the restored state steps.
  assert type(restored.opt_state[0]).__name__ == "ScaleByAdamState"


def test_keeps_last_n(tmp_path):
  mesh = parallel.make_mesh()
  state, _, _ = _state(mesh)
  with checkpoint.Checkpointer(tmp_path, keep=2) as ckpt:
    for s in range(4):
      ckpt.save(state.replace(step=state.step + s), data_state={}, meta={})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3]


def test_incompatible_model_names_path_and_parameter(tmp_path):
  mesh = parallel.make_mesh()
  state, _ = _trained(mesh, steps=1)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(state, data_state={}, meta={})
  _, other, _ = _state(mesh, features=8)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(checkpoint.CheckpointMismatchError) as e:
      ckpt.restore(1, other)
  msg = str(e.value)
  assert str(tmp_path / "checkpoints" / "1") in msg
  assert "parameter 'params/Dense_0/bias' has shape (16,) float32 in the checkpoint but (8,)" in msg


def test_params_only_init_from_other_workdir(tmp_path):
  """Stage 2 from stage 1: params only (any optimizer), or params + optimizer state."""
  mesh = parallel.make_mesh()
  state, _ = _trained(mesh)
  with checkpoint.Checkpointer(tmp_path / "stage1") as ckpt:
    ckpt.save(state, data_state={}, meta={})
  # A different optimizer structure (clipping added) is fine for params only ...
  _, abstract2, _ = _state(mesh, tx=optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)))
  params, opt, step = checkpoint.load_init(tmp_path / "stage1", abstract2, with_opt=False)
  assert opt is None and step == 2
  chex.assert_trees_all_equal(jax.device_get(params), jax.device_get(state.params))
  # ... but not for params + optimizer state, which must match.
  with pytest.raises(checkpoint.CheckpointMismatchError, match="optimizer state"):
    checkpoint.load_init(tmp_path / "stage1", abstract2, with_opt=True)
  with pytest.raises(FileNotFoundError, match="no checkpoints"):
    checkpoint.load_init(tmp_path / "nothing", abstract2, with_opt=False)

"""The sharded train step: 1 vs 8 devices, state placement, non-finite handling, one compile per bucket."""

import chex
import jax
import numpy as np
import optax
import pytest

import train_toy
from consist import parallel
from consist.data.batching import Budget
from consist.state import create_state

BUDGET = Budget(n_node=24, n_edge=160, n_graph=4)
GRAPHS = 3  # real graphs per device sub-batch


@pytest.fixture(scope="module")
def records():
  return train_toy.toy_records(64, seed=0)


def _setup(mesh, loss_fn=train_toy.loss_fn, lr=1e-2):
  tx = optax.adam(lr)
  schedule = optax.constant_schedule(lr)
  example = train_toy.device_batches(train_toy.toy_records(GRAPHS, seed=9), BUDGET, 1, GRAPHS)
  example = jax.tree.map(lambda x: x[0], example)
  state = parallel.init_state_sharded(lambda: create_state(train_toy.init_fn, tx, 0, example), mesh)
  return state, parallel.make_train_step(loss_fn, tx, schedule, mesh)


def test_one_device_equals_eight_devices(records):
  """Same global batch of 8 sub-batches: mesh of 1 device (k=8 per device) vs 8 devices (k=1)."""
  batch = train_toy.device_batches(records, BUDGET, 8, GRAPHS)
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = parallel.make_mesh(devices)
    state, step = _setup(mesh)
    for _ in range(2):
      state, metrics = step(state, jax.device_put(batch, parallel.batch_sharding(mesh)))
    results.append((jax.device_get(state.params), jax.device_get(metrics)))
  (p1, m1), (p8, m8) = results
  assert np.isfinite(m1["loss"]) and m1["loss"] > 0
  # Float32 reductions run in a different order (vmap over 8 sub-batches vs an all-reduce), so
  # params agree to ~1e-6 relative, not bitwise. Tolerance: rtol 1e-5, atol 1e-6.
  chex.assert_trees_all_close(p1, p8, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
  # The step moved the params (a no-op step would pass the comparison trivially).
  fresh, _ = _setup(parallel.make_mesh(jax.devices()[:1]))
  delta = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), p1, jax.device_get(fresh.params)))
  assert max(delta) > 1e-4


def test_gradient_is_device_mean_not_sum(records):
  """With SGD lr=1, the update equals minus the mean gradient over the 8 sub-batches (not 8x it)."""
  mesh = parallel.make_mesh()
  batch = train_toy.device_batches(records, BUDGET, 8, GRAPHS)
  tx = optax.sgd(1.0)
  example = jax.tree.map(lambda x: x[0], batch)
  state = parallel.init_state_sharded(lambda: create_state(train_toy.init_fn, tx, 0, example), mesh)
  params0 = jax.device_get(state.params)
  rng = jax.random.wrap_key_data(jax.device_get(state.rng))
  grads = [jax.grad(lambda p: train_toy.loss_fn(p, jax.tree.map(lambda x: x[i], batch),
                                                jax.random.fold_in(jax.random.fold_in(rng, 0), i))[0])(params0)
           for i in range(8)]
  mean_grad = jax.tree.map(lambda *g: np.mean(np.stack(g), axis=0), *grads)
  step = parallel.make_train_step(train_toy.loss_fn, tx, optax.constant_schedule(1.0), mesh)
  state, _ = step(state, jax.device_put(batch, parallel.batch_sharding(mesh)))
  update = jax.tree.map(lambda a, b: a - b, jax.device_get(state.params), params0)
  chex.assert_trees_all_close(update, jax.tree.map(lambda g: -g, mean_grad), rtol=1e-4, atol=1e-6)


def test_state_born_replicated_and_donated(records):
  mesh = parallel.make_mesh()
  state, step = _setup(mesh)
  for leaf in jax.tree.leaves(state):
    assert leaf.sharding.is_equivalent_to(parallel.replicated(mesh), leaf.ndim), leaf.sharding
  batch = jax.device_put(train_toy.device_batches(records, BUDGET, 8, GRAPHS), parallel.batch_sharding(mesh))
  old_leaf = jax.tree.leaves(state.params)[0]
  state, _ = step(state, batch)
  assert old_leaf.is_deleted(), "the train step must donate the old state"
  assert int(state.step) == 1


def test_nonfinite_step_is_skipped_and_named(records):
  mesh = parallel.make_mesh()
  state, step = _setup(mesh)
  batch = train_toy.device_batches(records, BUDGET, 8, GRAPHS)
  bad = batch.replace(energy=batch.energy.copy())
  bad.energy[3, 0] = np.nan  # one label of one device -> energy_mse is NaN after the device mean
  before = jax.device_get(state.params)
  state, metrics = step(state, jax.device_put(bad, parallel.batch_sharding(mesh)))
  assert not bool(metrics["finite"])
  assert parallel.nonfinite_term_name(jax.device_get(metrics)) == "energy_mse"
  chex.assert_trees_all_equal(jax.device_get(state.params), before)
  assert int(state.nonfinite_steps) == 1 and int(state.step) == 1
  state, metrics = step(state, jax.device_put(batch, parallel.batch_sharding(mesh)))
  assert bool(metrics["finite"]) and int(metrics["nonfinite_term"]) == -2
  assert int(state.nonfinite_steps) == 1


def test_one_compile_per_shape_bucket(records):
  """Six steps over two buckets trace the loss exactly twice (chex raises on a third trace)."""
  mesh = parallel.make_mesh()
  traced = chex.assert_max_traces(train_toy.loss_fn, n=2)
  state, step = _setup(mesh, loss_fn=traced)
  buckets = [BUDGET, Budget(n_node=40, n_edge=320, n_graph=6)]
  for i in range(6):
    budget = buckets[i % 2]
    graphs = GRAPHS if budget is BUDGET else 5
    batch = train_toy.device_batches(records[i:], budget, 8, graphs)
    state, metrics = step(state, jax.device_put(batch, parallel.batch_sharding(mesh)))
  assert int(state.step) == 6 and bool(metrics["finite"])
  assert step.traces() == 2


def test_eval_step_weights_devices_by_real_graphs(records):
  mesh = parallel.make_mesh()
  state, _ = _setup(mesh)
  batch = train_toy.device_batches(records, BUDGET, 8, GRAPHS)
  # Devices 1..7 hold only padding: the mean must equal device 0's own metrics.
  empty = train_toy.device_batches([], BUDGET, 1, 0)
  for leaf_b, leaf_e in zip(jax.tree.leaves(batch), jax.tree.leaves(empty)):
    leaf_b[1:] = leaf_e[0]
  eval_step = parallel.make_eval_step(train_toy.metrics_fn, mesh)
  metrics, count = eval_step(state.params, jax.device_put(batch, parallel.batch_sharding(mesh)), state.rng)
  own = train_toy.metrics_fn(jax.device_get(state.params), jax.tree.map(lambda x: x[0], batch),
                             jax.random.key(0))
  assert int(count) == GRAPHS
  np.testing.assert_allclose(metrics["energy_mse"], own["energy_mse"], rtol=1e-5)

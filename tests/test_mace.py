"""The MACE-class energy model: its symmetric contraction, edge-set independence, data statistics,
separate vs shared trunk, EMA, and the sharded step with it on 1 vs 8 devices.

Rotation / reflection / translation / permutation / padding invariance, forces against finite
differences and the HVP against finite differences run on the whole model in tests/test_model.py
and tests/test_losses.py (the energy there is this model's).
"""

import dataclasses

import chex
import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from consist import diffusion, parallel, synthetic
from consist.data.batching import Budget, batch_records, stack_device_batches
from consist.data.reference import EnergyReference
from consist.losses import total
from consist.models import mace
from consist.models import model as model_lib
from consist.models.statistics import data_statistics, resolve_energy_config
from consist.state import create_state, ema_update
from tests import model_fixtures as fx


@pytest.mark.parametrize("l_out", [0, 1])
def test_symmetric_contraction_as_a_sparse_polynomial_equals_the_full_tensor_contraction(l_out):
  """sum_{ijk} U[ijk] a_i a_j a_k (e3nn's reduced symmetric basis, all orders) == the sparse
  monomial form the model evaluates, with its gradient."""
  with jax.enable_x64(True):
    a = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3, 9)))  # [N, C, (0e+1o+2e)]
    basis, paths = mace.symmetric_basis(2, 3, l_out)
    got = mace.contract_symmetric(a, 2, 3, l_out)
    irreps = e3nn.Irreps("0e+1o+2e")
    want = []
    for nu in (1, 2, 3):
      u = e3nn.reduced_symmetric_tensor_product_basis(irreps, nu, keep_ir=[mace.irrep(l_out)])
      u = jnp.asarray(u.array, jnp.float64).reshape((9,) * nu + (-1, 2 * l_out + 1))
      letters = "ijk"[:nu]
      operands = [a] * nu
      spec = ",".join(f"nc{x}" for x in letters) + f",{letters}pm->ncpm"
      want.append(jnp.einsum(spec, *operands, u))
    want = jnp.concatenate(want, axis=2)
    assert want.shape[2] == paths
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    # The gradient too (what forces go through): against the dense contraction's.
    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=want.shape))

    def dense(x):
      flat = [x[..., i] for i in range(9)]
      monos = [jnp.prod(jnp.stack([flat[i] for i in idx]), axis=0)
               for nu in (1, 2, 3) for idx in mace._monomials(9, nu)]  # pylint: disable=protected-access
      return jnp.einsum("ncq,qpm->ncpm", jnp.stack(monos, axis=-1), jnp.asarray(basis))

    grad_got = jax.grad(lambda x: jnp.sum(mace.contract_symmetric(x, 2, 3, l_out) * cotangent))(a)
    grad_want = jax.grad(lambda x: jnp.sum(dense(x) * cotangent))(a)
    np.testing.assert_allclose(grad_got, grad_want, rtol=1e-10, atol=1e-10)


def test_tensor_product_paths_keep_natural_parity():
  assert mace.tp_paths((0,), 2) == ((0, 0, 0), (0, 1, 1), (0, 2, 2))
  paths = mace.tp_paths((0, 1), 2)
  assert (1, 1, 1) not in paths  # 1o x 1o -> 1e is a pseudo-vector: dropped
  assert all((l1 + l2 + l3) % 2 == 0 and l3 <= 2 for l1, l2, l3 in paths)


def test_energy_does_not_depend_on_edges_beyond_the_cutoff():
  """A radius graph at the cutoff and the all-pairs graph give the same energies and forces."""
  recs = fx.records()
  config = dataclasses.replace(fx.SMALL, energy=dataclasses.replace(fx.SMALL_ENERGY, cutoff=2.0))
  model = model_lib.Model(config)
  full = fx.batch(recs)
  radius = jax.tree.map(jnp.asarray, batch_records(recs, Budget(64, 400, 8),
                                                   fidelities=[synthetic.ACCURATE], cutoff=2.0))
  assert int(radius.edge_mask.sum()) < int(full.edge_mask.sum())
  params = model_lib.init_params(model, jax.random.key(0), full)
  e1, f1 = model_lib.energy_and_forces(model, params, full)
  e2, f2 = model_lib.energy_and_forces(model, params, radius)
  assert float(jnp.abs(f1).max()) > 1e-3
  np.testing.assert_allclose(e2, e1, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(f2, f1, atol=1e-5)


def test_energy_is_smooth_where_a_pair_crosses_the_cutoff():
  """Two atoms pulled through the cutoff (float64): the energy change across it is the one its
  gradient predicts (no jump from an edge switching off), and the force is continuous."""
  with jax.enable_x64(True):
    model = mace.MACE(dataclasses.replace(fx.SMALL_ENERGY, cutoff=3.0))
    b = fx.batch([fx.records()[0]])
    b = b.replace(positions=jnp.asarray(b.positions, jnp.float64))
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64),
                          model.init(jax.random.key(1), b, b.positions))
    i, j = 0, 1
    direction = (b.positions[j] - b.positions[i]) / jnp.linalg.norm(b.positions[j] - b.positions[i])

    def at_distance(r):
      pos = b.positions.at[j].set(b.positions[i] + r * direction)
      e, g = jax.value_and_grad(lambda p: model.apply(params, b, p).sum())(pos)
      return e, jnp.dot(g[j], direction)

    h = 1e-4
    (e_in, d_in), (e_mid, d_mid), (e_out, d_out) = at_distance(3.0 - h), at_distance(3.0), at_distance(3.0 + h)
    assert abs(float(d_mid)) > 1e-4  # the other atoms still pull: a non-trivial check
    np.testing.assert_allclose(e_out - e_in, 2 * h * d_mid, atol=1e-9)
    # A continuous derivative: its change across the cutoff shrinks with the step (a jump would not).
    jump = lambda step: abs(float(at_distance(3.0 + step)[1] - at_distance(3.0 - step)[1]))
    assert jump(1e-6) < 0.05 * jump(1e-4) + 1e-10


def test_data_statistics_are_neighbour_count_force_rms_and_median_residual():
  recs = fx.records(2)
  reference = EnergyReference.fit(recs, [synthetic.ACCURATE])
  stats = data_statistics(recs, reference, cutoff=1.6)
  n_pairs = sum(int((np.linalg.norm(r.positions[:, None] - r.positions[None], axis=-1) < 1.6).sum())
                - r.n_atoms for r in recs)
  assert stats["avg_num_neighbors"] == pytest.approx(n_pairs / sum(r.n_atoms for r in recs))
  forces = np.concatenate([r.forces.ravel() for r in recs])
  assert stats["scale"] == pytest.approx(np.sqrt(np.mean(forces**2)))
  residual = [(r.energy - reference.energy(r.atomic_numbers, 0)) / r.n_atoms for r in recs]
  assert stats["shift"] == pytest.approx(np.median(residual))
  unresolved = mace.EnergyModelConfig()
  assert not unresolved.resolved
  resolved = resolve_energy_config(unresolved, recs, reference)
  assert resolved.resolved and resolved.scale == pytest.approx(stats["scale"])


def test_unresolved_statistics_are_an_error_naming_them():
  b = fx.batch(fx.records())
  with pytest.raises(ValueError, match="avg_num_neighbors and scale are unset"):
    mace.MACE(mace.EnergyModelConfig()).init(jax.random.key(0), b, b.positions)


@pytest.mark.parametrize("trunk", ["separate", "shared"])
def test_structure_losses_reach_the_energy_model_only_with_a_shared_trunk(trunk):
  """Denoising + both consistency terms (a stage-2 loss without the energy terms): with separate
  trunks the energy model gets exactly zero gradient, so stage 2 cannot change its forces."""
  b = fx.batch(fx.records())
  model, params = fx.model_and_params(dataclasses.replace(fx.SMALL, trunk=trunk), example=b)
  config = total.LossConfig(energy_weight=0.0, forces_weight=0.0, denoise_weight=1.0,
                            optimality_weight=1.0, score_weight=1.0,
                            consistency_params="structure_head+encoder")
  grads = jax.grad(lambda p: total.total_loss(model, diffusion.Schedule(), config, p, b,
                                              jax.random.key(0))[0])(params)
  norm = lambda tree: max(float(jnp.abs(x).max()) for x in jax.tree.leaves(tree))
  assert (norm(grads["energy_model"]) > 0.0) == (trunk == "shared")
  assert norm(grads["structure_head"]) > 0.0 and norm(grads["encoder"]) > 0.0


def test_ema_update_warms_up_then_uses_the_decay():
  ema, params = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
  first = ema_update(ema, params, 0.99, jnp.asarray(0))  # decay min(0.99, 1/10)
  np.testing.assert_allclose(first["w"], 0.9)
  late = ema_update(ema, params, 0.99, jnp.asarray(10_000))
  np.testing.assert_allclose(late["w"], 0.01, rtol=1e-5)
  assert ema_update(ema, params, 0.0, jnp.asarray(5)) is params


def test_energy_force_step_on_one_device_equals_eight_devices():
  """The real model's energy+force step (EMA included), same global batch of 8 sub-batches."""
  recs = fx.records(3)
  subs = [recs[i::8] for i in range(8)]
  batch = stack_device_batches([batch_records(s, Budget(40, 300, 4), fidelities=[synthetic.ACCURATE])
                                for s in subs])
  model = model_lib.Model(fx.SMALL)
  loss_cfg = total.LossConfig(energy_weight=1.0, forces_weight=10.0, denoise_weight=0.0)
  loss_fn = lambda p, b, rng: total.total_loss(model, diffusion.Schedule(), loss_cfg, p, b, rng)
  tx = optax.adam(1e-2)
  example = jax.tree.map(lambda x: x[0], batch)
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = parallel.make_mesh(devices)
    init = lambda: create_state(lambda rng, b: model_lib.init_params(model, rng, b), tx, 0, example)
    state = parallel.init_state_sharded(init, mesh)
    step = parallel.make_train_step(loss_fn, tx, optax.constant_schedule(1e-2), mesh, 0.9)
    for _ in range(2):
      state, metrics = step(state, jax.device_put(batch, parallel.batch_sharding(mesh)))
    results.append((jax.device_get(state.params), jax.device_get(state.ema_params),
                    jax.device_get(metrics)))
  (p1, e1, m1), (p8, e8, m8) = results
  assert np.isfinite(m1["loss"]) and m1["forces_mse"] > 0
  chex.assert_trees_all_close(p1, p8, rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(e1, e8, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
  moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(e1)))
  assert moved > 1e-4  # the EMA lags the params: it is not a copy




def test_clipping_is_per_subtree_so_structure_gradients_cannot_shrink_the_energy_update():
  from consist.state import clip_by_subtree_norm  # pylint: disable=g-import-not-at-top
  clip = clip_by_subtree_norm(1.0)
  grads = {"energy_model": {"w": jnp.asarray([0.3, 0.4])}, "structure_head": {"w": jnp.asarray([30.0, 40.0])}}
  clipped, _ = clip.update(grads, clip.init(grads))
  np.testing.assert_allclose(clipped["energy_model"]["w"], [0.3, 0.4])  # under the bound: untouched
  np.testing.assert_allclose(clipped["structure_head"]["w"], [0.6, 0.8], rtol=1e-6)  # norm 1

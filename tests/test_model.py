"""Symmetries, padding invariance and forces of the equivariant model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from consist.data.batching import Budget
from consist.models import model as model_lib
from tests import model_fixtures as fx


@pytest.fixture(scope="module", params=[0, 3], ids=["bonds", "topology_hops3"])
def setup(request):
  recs = fx.records()
  b = fx.batch(recs)
  config = dataclasses.replace(fx.SMALL, topology_hops=request.param)
  model, params = fx.model_and_params(config, example=b)
  t_G = jnp.linspace(0.1, 0.9, b.num_graphs)

  @jax.jit
  def outputs(params, b):
    e, f = model_lib.energy_and_forces(model, params, b)
    return e, f, model_lib.structure_output(model, params, b, b.positions, t_G)

  return recs, b, model, params, outputs


def _with_positions(b, positions):
  return b.replace(positions=jnp.asarray(positions, jnp.float32))


def test_params_tree_separates_energy_and_structure_models(setup):
  _, _, _, params, _ = setup
  assert set(params) == {"energy_model", "encoder", "structure_head"}


@pytest.mark.parametrize("reflect", [False, True])
def test_energy_invariant_forces_and_structure_equivariant(setup, reflect):
  _, b, _, params, outputs = setup
  rng = np.random.default_rng(1 + reflect)
  q = jnp.asarray(fx.random_orthogonal(rng, reflect), jnp.float32)
  e, f, s = outputs(params, b)
  e2, f2, s2 = outputs(params, _with_positions(b, b.positions @ q.T))
  assert float(jnp.abs(f).max()) > 1e-2 and float(jnp.abs(s).max()) > 1e-2
  np.testing.assert_allclose(e2, e, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(f2, f @ q.T, atol=2e-4)
  # The structure head is a 1o vector: it rotates and flips under reflection like positions.
  np.testing.assert_allclose(s2, s @ q.T, atol=2e-4)


def test_translation_invariance(setup):
  _, b, _, params, outputs = setup
  shifted = jnp.where(b.node_mask[:, None], b.positions + jnp.asarray([[3.0, -1.0, 2.5]]), 0.0)
  for a, c in zip(outputs(params, b), outputs(params, _with_positions(b, shifted))):
    np.testing.assert_allclose(c, a, atol=2e-4)


def _permuted(record, perm):
  inv = np.argsort(perm)
  return record.replace(atomic_numbers=record.atomic_numbers[perm],
                        positions=record.positions[perm], forces=record.forces[perm],
                        ref_positions=record.ref_positions[perm], bonds=inv[record.bonds])


def test_permutation_invariance(setup):
  recs, b, _, params, outputs = setup
  rng = np.random.default_rng(3)
  perms = [rng.permutation(r.n_atoms) for r in recs]
  pb = fx.batch([_permuted(r, p) for r, p in zip(recs, perms)])
  e, f, s = outputs(params, b)
  pe, pf, ps = outputs(params, pb)
  np.testing.assert_allclose(pe, e, rtol=1e-5, atol=1e-5)
  offsets = np.cumsum([0] + [r.n_atoms for r in recs])
  node_perm = np.concatenate([o + p for o, p in zip(offsets, perms)])
  n = offsets[-1]
  np.testing.assert_allclose(pf[:n], f[node_perm], atol=2e-5)
  np.testing.assert_allclose(ps[:n], s[node_perm], atol=2e-5)


def test_padding_invariance(setup):
  recs, b, model, params, outputs = setup
  big = fx.batch(recs, Budget(97, 700, 13))
  e, f, s = outputs(params, b)
  t_G = jnp.linspace(0.1, 0.9, b.num_graphs)
  t_big = jnp.concatenate([t_G[:len(recs)], jnp.full((big.num_graphs - len(recs),), 0.5)])
  be, bf = model_lib.energy_and_forces(model, params, big)
  bs = model_lib.structure_output(model, params, big, big.positions, t_big)
  n, g = sum(r.n_atoms for r in recs), len(recs)
  np.testing.assert_allclose(be[:g], e[:g], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(bf[:n], f[:n], atol=1e-5)
  np.testing.assert_allclose(bs[:n], s[:n], atol=1e-5)
  assert float(jnp.abs(be[g:]).max()) == 0.0 and float(jnp.abs(bf[n:]).max()) == 0.0
  assert float(jnp.abs(bs[n:]).max()) == 0.0


def test_forces_are_minus_gradient_finite_differences_float64(setup):
  _, b, model, params, _ = setup
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
    b64 = b.replace(positions=jnp.asarray(b.positions, jnp.float64))
    total = jax.jit(lambda pos: jnp.sum(model_lib.energy(model, p64, b64, pos)))
    _, forces = model_lib.energy_and_forces(model, p64, b64)
    assert bool(jnp.isfinite(forces).all())
    h = 1e-5
    rng = np.random.default_rng(0)
    for atom in rng.choice(int(b.node_mask.sum()), 4, replace=False):
      for axis in range(3):
        d = jnp.zeros_like(b64.positions).at[atom, axis].set(h)
        fd = -(total(b64.positions + d) - total(b64.positions - d)) / (2 * h)
        np.testing.assert_allclose(forces[atom, axis], fd, rtol=1e-6, atol=1e-8)


def test_reference_and_fidelity_offsets_shift_energy(setup):
  _, b, model, params, outputs = setup
  e, f, _ = outputs(params, b)
  shifted = jax.tree.map(lambda x: x, params)
  head = dict(shifted["energy_model"])
  head["fidelity_offset"] = {"embedding": jnp.full_like(head["fidelity_offset"]["embedding"], 2.0)}
  ref = head["element_reference"]["embedding"]
  head["element_reference"] = {"embedding": ref.at[1].set(0.5)}  # hydrogen
  shifted["energy_model"] = head
  e2, f2, _ = outputs(shifted, b)
  n_h = jax.ops.segment_sum((b.atomic_numbers == 1).astype(jnp.float32), b.node_graph,
                            num_segments=b.num_graphs)
  expected = jnp.where(b.graph_mask, e + 2.0 + 0.5 * n_h, 0.0)
  np.testing.assert_allclose(e2, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(f2, f, atol=1e-6)

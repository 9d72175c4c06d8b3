"""Graphs, padded batches (conventions of consist/types.py), energy reference, budgets and buckets."""

import json

import numpy as np
import pytest

from consist.bench.data import SYNTHETIC_ELEMENT_ENERGY, synthetic_records
from consist.data.batching import Budget, batch_records, stack_device_batches
from consist.data.graph import count_edges, record_to_graph
from consist.data.record import MoleculeRecord
from consist.data.reference import EnergyReference

FIDELITIES = ("a", "b")


@pytest.fixture(scope="module")
def records():
  return synthetic_records(12, seed=3, min_atoms=3, max_atoms=12, fidelities=FIDELITIES)


def _water(**kw):
  return MoleculeRecord(
      mol_id="water", atomic_numbers=np.array([8, 1, 1]),
      positions=np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]]),
      bonds=np.array([[0, 1], [0, 2]]), bond_orders=np.array([1.0, 2.0]), **kw)


def test_full_graph_has_every_ordered_pair_once():
  g = record_to_graph(_water())
  pairs = sorted(zip(g.senders.tolist(), g.receivers.tolist()))
  assert pairs == [(i, j) for i in range(3) for j in range(3) if i != j]


def test_bond_orders_land_on_both_directions():
  g = record_to_graph(_water())
  order = {(s, r): b for s, r, b in zip(g.senders.tolist(), g.receivers.tolist(), g.bond_order.tolist())}
  assert order == {(0, 1): 1.0, (1, 0): 1.0, (0, 2): 2.0, (2, 0): 2.0, (1, 2): 0.0, (2, 1): 0.0}


def test_bond_hops_count_bonds_on_the_shortest_path():
  # Butane-like chain 0-1-2-3 plus a separate fragment 4-5: hops 1..3 along the chain, 0 across.
  chain = MoleculeRecord(
      mol_id="chain", atomic_numbers=np.array([6, 6, 6, 6, 8, 1]),
      positions=np.arange(18, dtype=float).reshape(6, 3),
      bonds=np.array([[0, 1], [1, 2], [2, 3], [4, 5]]), bond_orders=np.ones(4))
  g = record_to_graph(chain)
  hops = {(s, r): h for s, r, h in zip(g.senders.tolist(), g.receivers.tolist(), g.bond_hops.tolist())}
  assert hops[(0, 1)] == hops[(1, 0)] == 1 and hops[(0, 2)] == 2 and hops[(3, 0)] == 3
  assert hops[(4, 5)] == 1 and hops[(0, 4)] == 0 and hops[(5, 3)] == 0
  assert g.bond_hops.dtype == np.int32
  no_bonds = MoleculeRecord(mol_id="gas", atomic_numbers=np.array([18, 18]),
                            positions=np.array([[0.0, 0, 0], [3.0, 0, 0]]))
  assert record_to_graph(no_bonds).bond_hops.tolist() == [0, 0]


def test_cutoff_graph_keeps_exactly_the_close_pairs(records):
  for rec in records:
    g = record_to_graph(rec, cutoff=2.0)
    d = np.linalg.norm(rec.positions[:, None] - rec.positions[None], axis=-1)
    expected = {(i, j) for i in range(rec.n_atoms) for j in range(rec.n_atoms) if i != j and d[i, j] < 2.0}
    assert set(zip(g.senders.tolist(), g.receivers.tolist())) == expected
    assert g.n_edge == len(expected) == count_edges(rec, cutoff=2.0)
    full = record_to_graph(rec)
    full_order = dict(zip(zip(full.senders.tolist(), full.receivers.tolist()), full.bond_order.tolist()))
    full_hops = dict(zip(zip(full.senders.tolist(), full.receivers.tolist()), full.bond_hops.tolist()))
    for s, r, b, h in zip(g.senders.tolist(), g.receivers.tolist(), g.bond_order.tolist(),
                          g.bond_hops.tolist()):
      assert full_order[(s, r)] == b and full_hops[(s, r)] == h
  assert sum(record_to_graph(r, cutoff=2.0).n_edge for r in records) < sum(
      record_to_graph(r).n_edge for r in records)


def _check_conventions(batch, budget):
  n, e, g = budget.n_node, budget.n_edge, budget.n_graph
  assert batch.atomic_numbers.shape == (n,) and batch.senders.shape == (e,) and batch.graph_mask.shape == (g,)
  pad_nodes = ~batch.node_mask
  assert pad_nodes[-1] and not batch.graph_mask[-1]
  assert (batch.atomic_numbers[pad_nodes] == 0).all() and (batch.atomic_numbers[~pad_nodes] > 0).all()
  assert (batch.positions[pad_nodes] == 0).all() and (batch.forces[pad_nodes] == 0).all()
  assert (batch.node_graph[pad_nodes] == g - 1).all()
  pad_edges = ~batch.edge_mask
  assert (batch.senders[pad_edges] == n - 1).all() and (batch.receivers[pad_edges] == n - 1).all()
  assert (batch.bond_order[pad_edges] == 0).all() and (batch.bond_hops[pad_edges] == 0).all()
  lengths = np.linalg.norm(batch.positions[batch.senders] - batch.positions[batch.receivers], axis=-1)
  assert (lengths[pad_edges] == 0).all() and (lengths[~pad_edges] > 0.5).all()
  # Real edges stay inside one real graph.
  assert (batch.node_graph[batch.senders[~pad_edges]] == batch.node_graph[batch.receivers[~pad_edges]]).all()
  assert batch.node_mask[batch.senders[~pad_edges]].all()
  assert batch.n_node.sum() == n
  assert (np.bincount(batch.node_graph, minlength=g) == batch.n_node).all()
  for name in ("energy_mask", "forces_mask", "is_equilibrium", "ref_mask"):
    assert not getattr(batch, name)[~batch.graph_mask].any(), name
  assert (batch.energy[~batch.graph_mask] == 0).all()


def _real_content(batch):
  """The real-atom / real-edge / real-graph content, independent of the padding."""
  nodes, edges, graphs = batch.node_mask, batch.edge_mask, batch.graph_mask
  return {
      "z": batch.atomic_numbers[nodes], "pos": batch.positions[nodes], "f": batch.forces[nodes],
      "node_graph": batch.node_graph[nodes], "senders": batch.senders[edges],
      "receivers": batch.receivers[edges], "bond": batch.bond_order[edges],
      "hops": batch.bond_hops[edges], "e": batch.energy[graphs],
      "n": batch.n_node[graphs], "fid": batch.fidelity[graphs], "em": batch.energy_mask[graphs],
      "fm": batch.forces_mask[graphs], "eq": batch.is_equilibrium[graphs],
  }


def test_padding_conventions_and_invariance(records):
  recs = records[:4]
  n_atoms = sum(r.n_atoms for r in recs)
  n_edges = sum(r.n_atoms * (r.n_atoms - 1) for r in recs)
  tight = Budget(n_atoms + 1, n_edges, len(recs) + 1)
  loose = Budget(n_atoms + 37, n_edges + 101, len(recs) + 5)
  a = batch_records(recs, tight, fidelities=FIDELITIES)
  b = batch_records(recs, loose, fidelities=FIDELITIES)
  _check_conventions(a, tight)
  _check_conventions(b, loose)
  ca, cb = _real_content(a), _real_content(b)
  for k in ca:
    np.testing.assert_array_equal(ca[k], cb[k], err_msg=k)
  assert a.node_mask.sum() == n_atoms and a.edge_mask.sum() == n_edges and a.graph_mask.sum() == 4
  assert list(a.n_node[:4]) == [r.n_atoms for r in recs]
  assert list(a.fidelity[:4]) == [FIDELITIES.index(r.label_fidelity) for r in recs]
  np.testing.assert_array_equal(a.positions[a.node_graph == 2], recs[2].positions.astype(np.float32))


def test_bond_orders_on_the_right_batch_edges(records):
  recs = records[:3]
  batch = batch_records(recs, Budget(64, 400, 4), fidelities=FIDELITIES)
  offset = np.cumsum([0] + [r.n_atoms for r in recs])
  found = {}
  for s, r, b in zip(batch.senders[batch.edge_mask], batch.receivers[batch.edge_mask],
                     batch.bond_order[batch.edge_mask]):
    if b > 0:
      found[(int(s), int(r))] = float(b)
  expected = {}
  for k, rec in enumerate(recs):
    for (i, j), b in zip(rec.bonds.tolist(), rec.bond_orders.tolist()):
      expected[(i + offset[k], j + offset[k])] = b
      expected[(j + offset[k], i + offset[k])] = b
  assert found == expected


def test_labels_masks_and_reference_subtraction():
  with_labels = _water(energy=-2080.123456, forces=np.ones((3, 3)), label_fidelity="b",
                       is_equilibrium=True, ref_positions=np.array([[0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]]),
                       ref_fidelity="b")
  bare = _water()
  ref = EnergyReference.fit([with_labels.replace(energy=-2080.0)], FIDELITIES)
  batch = batch_records([bare, with_labels], Budget(8, 12, 3), fidelities=FIDELITIES, energy_reference=ref)
  _check_conventions(batch, Budget(8, 12, 3))
  assert list(batch.energy_mask) == [False, True, False]
  assert list(batch.forces_mask) == [False, True, False]
  assert list(batch.is_equilibrium) == [False, True, False]
  assert list(batch.ref_mask) == [False, True, False]
  assert list(batch.fidelity) == [0, 1, 0]
  assert batch.energy[1] == pytest.approx(-0.123456, abs=1e-6)  # float64 difference, then float32
  assert (batch.forces[3:6] == 1).all() and (batch.forces[:3] == 0).all()
  np.testing.assert_array_equal(batch.ref_positions[3:6], with_labels.ref_positions.astype(np.float32))
  assert (batch.ref_positions[:3] == 0).all()


def test_too_large_molecule_is_named(records):
  big = max(records, key=lambda r: r.n_atoms)
  small = min(records, key=lambda r: r.n_atoms)
  with pytest.raises(ValueError, match=f"record 1 \\(mol_id='{big.mol_id}', {big.n_atoms} atoms"):
    batch_records([small, big], Budget(big.n_atoms, 10_000, 4), fidelities=FIDELITIES)
  with pytest.raises(ValueError, match="label fidelity 'zzz'"):
    batch_records([_water(energy=-1.0, label_fidelity="zzz")], Budget(8, 12, 3), fidelities=FIDELITIES)


def test_stack_device_batches(records):
  budget = Budget(40, 400, 3)
  b0 = batch_records(records[:1], budget, fidelities=FIDELITIES)
  b1 = batch_records(records[1:3], budget, fidelities=FIDELITIES)
  stacked = stack_device_batches([b0, b1])
  assert stacked.positions.shape == (2, 40, 3) and stacked.graph_mask.shape == (2, 3)
  np.testing.assert_array_equal(stacked.senders[1], b1.senders)
  with pytest.raises(ValueError, match="different budgets"):
    stack_device_batches([b0, batch_records(records[:1], Budget(41, 400, 3), fidelities=FIDELITIES)])


def test_energy_reference_recovers_element_energies_exactly():
  rng = np.random.default_rng(0)
  truth = {"a": {1: -13.6, 6: -1029.8, 7: -1485.3, 8: -2042.6},
           "b": {1: -10.1, 6: -101.2, 7: -150.3, 8: -207.4}}
  recs = []
  for i in range(60):
    fid = FIDELITIES[i % 2]
    z = rng.choice([1, 6, 7, 8], size=int(rng.integers(2, 15)))
    pos = np.stack([np.arange(len(z)) * 1.2, np.zeros(len(z)), np.zeros(len(z))], axis=1)
    recs.append(MoleculeRecord(f"m{i}", z, pos, energy=float(sum(truth[fid][int(a)] for a in z)),
                               label_fidelity=fid))
  ref = EnergyReference.fit(recs, FIDELITIES)
  for f, fid in enumerate(FIDELITIES):
    for z, e in truth[fid].items():
      assert ref.element_energy[f, z] == pytest.approx(e, abs=1e-7), (fid, z)
  assert np.isnan(ref.element_energy[0, 9])
  for r in recs:
    e_ref = ref.energy(r.atomic_numbers, FIDELITIES.index(r.label_fidelity))
    assert e_ref == pytest.approx(r.energy, abs=1e-6)
  back = EnergyReference.from_json(json.loads(json.dumps(ref.to_json())))
  np.testing.assert_array_equal(back.element_energy, ref.element_energy)
  assert back.fidelities == ref.fidelities
  with pytest.raises(KeyError, match="Z=\\[9\\]"):
    ref.energy(np.array([6, 9]), 0)


def test_energy_reference_rare_elements_are_regularised():
  # S appears only together with Cl in one molecule: underdetermined without the ridge.
  pos = np.array([[0.0, 0, 0], [2.0, 0, 0], [4.0, 0, 0]])
  recs = [MoleculeRecord("a", np.array([6, 1]), pos[:2], energy=-1043.4, label_fidelity="a"),
          MoleculeRecord("b", np.array([6, 6]), pos[:2], energy=-2059.6, label_fidelity="a"),
          MoleculeRecord("c", np.array([16, 17]), pos[:2], energy=-23408.2, label_fidelity="a")]
  ref = EnergyReference.fit(recs, ["a"])
  assert np.isfinite(ref.element_energy[0, [1, 6, 16, 17]]).all()
  assert ref.energy(np.array([16, 17]), 0) == pytest.approx(-23408.2, abs=1e-5)
  assert ref.element_energy[0, 6] == pytest.approx(-1029.8, abs=1e-6)


def test_synthetic_energies_fit_within_noise():
  recs = synthetic_records(40, seed=1)
  ref = EnergyReference.fit(recs, ["synthetic"])
  assert ref.rmse[0] < 0.15
  assert ref.element_energy[0, 6] == pytest.approx(SYNTHETIC_ELEMENT_ENERGY[6], abs=0.2)

"""Input pipeline: packing plan, determinism, per-host sharding, exact restore, evaluation coverage,
budgets/buckets; and (slow) a real 2-process jax.distributed run over gloo."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from consist.bench.data import synthetic_records
from consist.data.batching import Budget
from consist.data.budgets import (Buckets, cutoff_edge_counts, estimate_budget, estimate_cutoff_edge_counts,
                                  full_graph_edge_counts, make_buckets)
from consist.data.pipeline import InputPipeline, host_device_batches, pack_greedy, plan_epoch

FIDELITIES = ("synthetic",)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ListSource:
  """A list of records with the Store's `n_atoms` column, recording which indices were read."""

  def __init__(self, records):
    self.records = records
    self.n_atoms = np.array([r.n_atoms for r in records])
    self.read = []

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    self.read.append(int(i))
    return self.records[i]


@pytest.fixture(scope="module")
def records():
  return synthetic_records(160, seed=7, max_atoms=30)


@pytest.fixture(scope="module")
def buckets(records):
  return make_buckets([r.n_atoms for r in records], 6, n_buckets=3)


def _pipeline(records, buckets, **kw):
  kw = {"process_index": 0, "process_count": 1, "local_device_count": 4, "num_threads": 1, **kw}
  return InputPipeline(ListSource(records), buckets, fidelities=FIDELITIES, **kw)


def _assert_batches_equal(a, b):
  assert (a.epoch, a.step, a.bucket) == (b.epoch, b.step, b.bucket)
  np.testing.assert_array_equal(a.record_index, b.record_index)
  for name in ("atomic_numbers", "positions", "senders", "receivers", "bond_order", "energy", "forces",
               "node_mask", "edge_mask", "graph_mask"):
    np.testing.assert_array_equal(getattr(a.graphs, name), getattr(b.graphs, name), err_msg=name)


def test_budgets_and_buckets(records):
  n_atoms = np.array([r.n_atoms for r in records])
  n_edges = full_graph_edge_counts(n_atoms)
  single = estimate_budget(n_atoms, 6)
  assert single.n_graph == 7 and single.n_node > n_atoms.max() and single.n_edge >= n_edges.max()
  # Caps come from the group-size distribution: larger than a mean group, smaller than the worst case.
  assert 6 * n_atoms.mean() < single.n_node < 6 * n_atoms.max()
  b = make_buckets(n_atoms, 6, n_buckets=3)
  assert 2 <= len(b.budgets) <= 3
  assert b.budgets[0].n_node < b.largest.n_node and b.budgets[0].n_edge < b.largest.n_edge
  assert b.largest.n_node > n_atoms.max() and b.largest.n_edge >= n_edges.max()
  assert Buckets.from_json(json.loads(json.dumps(b.to_json()))) == b
  # bucket_of picks the smallest holding bucket.
  assert b.bucket_of(b.budgets[0].n_node - 1, 0) == 0
  assert b.bucket_of(b.budgets[0].n_node, 0) == 1
  assert b.bucket_of(1, b.largest.n_edge + 1) == len(b.budgets)
  # A molecule larger than the largest molecule-derived bucket is named.
  tiny = Buckets((Budget(20, 10_000, 4),))
  big = int(np.argmax(n_atoms > 19))
  match = f"molecule {big}, mol_id='{records[big].mol_id}' with {n_atoms[big]} atoms"
  with pytest.raises(ValueError, match=match):
    _pipeline(records, tiny)


def test_cutoff_edge_estimate_is_close_to_exact(records):
  n_atoms = np.array([r.n_atoms for r in records])
  exact = cutoff_edge_counts(records, 3.0)
  estimate = estimate_cutoff_edge_counts(n_atoms, records, 3.0, n_sample=50)
  assert (exact < full_graph_edge_counts(n_atoms)).any()
  assert estimate.sum() >= 0.9 * exact.sum() and (estimate <= full_graph_edge_counts(n_atoms)).all()


def test_pack_greedy_fills_until_the_next_molecule_does_not_fit():
  rng = np.random.default_rng(0)
  nodes = rng.integers(1, 30, size=500)
  edges = nodes * (nodes - 1)
  starts = pack_greedy(nodes, edges, 8, 100, 1500)
  assert starts[0] == 0 and starts[-1] == 500
  for s, e in zip(starts[:-1], starts[1:]):
    assert e - s <= 8 and nodes[s:e].sum() <= 100 and edges[s:e].sum() <= 1500
    if e < 500:
      assert e - s == 8 or nodes[s:e + 1].sum() > 100 or edges[s:e + 1].sum() > 1500


def test_plan_is_deterministic_and_epochs_differ(records, buckets):
  n_atoms = np.array([r.n_atoms for r in records])
  n_edges = full_graph_edge_counts(n_atoms)
  a = plan_epoch(n_atoms, n_edges, buckets, 4, seed=1, epoch=3)
  b = plan_epoch(n_atoms, n_edges, buckets, 4, seed=1, epoch=3)
  for name in ("order", "batch_start", "step_batches", "step_bucket"):
    np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
  assert not np.array_equal(a.order, plan_epoch(n_atoms, n_edges, buckets, 4, seed=1, epoch=4).order)
  assert not np.array_equal(a.order, plan_epoch(n_atoms, n_edges, buckets, 4, seed=2, epoch=3).order)
  # Same through the pipeline: identical batch arrays for the same (seed, epoch).
  p, q = _pipeline(records, buckets, seed=1), _pipeline(records, buckets, seed=1)
  for x, y in zip(p.train_iterator(), q.train_iterator()):
    _assert_batches_equal(x, y)
    if x.step == 2:
      break


def test_two_host_sharding_is_disjoint_covering_and_in_step(records, buckets):
  hosts = [_pipeline(records, buckets, process_index=i, process_count=2, local_device_count=4)
           for i in (0, 1)]
  plans = [h.plan(0) for h in hosts]
  assert plans[0].n_steps == plans[1].n_steps > 0
  np.testing.assert_array_equal(plans[0].step_bucket, plans[1].step_bucket)
  plan = plans[0]
  seen = []
  for step in range(plan.n_steps):
    per_host = [np.concatenate(host_device_batches(plan, step, i, 2)) for i in (0, 1)]
    assert not set(per_host[0]) & set(per_host[1])
    step_records = np.concatenate([plan.records_of(int(k)) for k in plan.step_batches[step]])
    assert sorted(np.concatenate(per_host)) == sorted(step_records)
    seen.extend(np.concatenate(per_host))
  used = plan.order[:plan.batch_start[plan.step_batches.size]]
  assert sorted(seen) == sorted(used) and len(set(seen)) == len(seen)
  assert len(used) > 0.85 * len(records)  # only the last incomplete step is dropped
  # Each host reads only its own records.
  for host in hosts:
    it = host.train_iterator()
    for _ in range(plan.n_steps):
      next(it)
    expected = np.concatenate([np.concatenate(host_device_batches(plan, s, host.process_index, 2))
                               for s in range(plan.n_steps)])
    assert sorted(host.source.read) == sorted(expected)


def test_steps_group_device_batches_by_bucket(records, buckets):
  p = _pipeline(records, buckets, local_device_count=2)
  plan = p.plan(0)
  for batch, bucket in zip(p.train_iterator(), plan.step_bucket):
    assert batch.graphs.atomic_numbers.shape == (2, buckets.budgets[bucket].n_node)
    if batch.step == plan.n_steps - 1:
      break


def test_restore_continues_with_exactly_the_next_batch(records, buckets):
  p = _pipeline(records, buckets, seed=5)
  steps = p.steps_per_epoch(0)
  it = p.train_iterator()
  for _ in range(steps - 2):  # stop shortly before the end of epoch 0
    next(it)
  state = json.loads(json.dumps(it.state))
  expected = [next(it) for _ in range(5)]  # crosses into epoch 1
  assert [b.epoch for b in expected] == [0, 0, 1, 1, 1]
  resumed = _pipeline(records, buckets, seed=5).train_iterator(state)
  for a in expected:
    _assert_batches_equal(a, next(resumed))
  with pytest.raises(ValueError, match="seed"):
    _pipeline(records, buckets, seed=6).train_iterator(state)


def test_eval_iterator_covers_every_record_once(records, buckets):
  p = _pipeline(records[:50], buckets, local_device_count=3)
  seen = []
  for batch in p.eval_iterator():
    for d in range(3):
      g = batch.graphs
      for k, i in enumerate(batch.record_index[d]):
        if i < 0:
          assert not g.graph_mask[d, k]
          continue
        assert g.graph_mask[d, k] and g.n_node[d, k] == records[i].n_atoms
        np.testing.assert_array_equal(g.positions[d][g.node_graph[d] == k],
                                      records[i].positions.astype(np.float32))
        seen.append(int(i))
  assert seen == list(range(50))


def test_pipeline_over_a_store(tmp_path, records):
  from consist.data.reference import EnergyReference
  from consist.data.store import StoreWriter, open_store
  with StoreWriter(tmp_path / "train") as writer:
    for i, r in enumerate(records[:40]):
      writer.append(r, where=f"record {i}")
  store = open_store(tmp_path / "train")
  ref = EnergyReference.fit(store, store.fidelities)
  pipe = InputPipeline(store, make_buckets(store.n_atoms, 4), fidelities=store.fidelities, energy_reference=ref,
                       process_index=0, process_count=1, local_device_count=2)
  seen = {}
  for batch in pipe.eval_iterator():
    g = batch.graphs
    for d, k in zip(*np.nonzero(batch.record_index >= 0)):
      i = int(batch.record_index[d, k])
      e_ref = ref.energy(records[i].atomic_numbers, 0)
      assert g.energy[d, k] == pytest.approx(records[i].energy - e_ref, abs=1e-4)
      seen[i] = g.n_node[d, k]
  assert seen == {i: records[i].n_atoms for i in range(40)}


def test_cutoff_pipeline_batches_fit(records):
  n_atoms = np.array([r.n_atoms for r in records])
  n_edges = cutoff_edge_counts(records, 3.0)
  b = make_buckets(n_atoms, 6, n_edges=n_edges, n_buckets=2)
  p = _pipeline(records, b, cutoff=3.0)
  batch = next(p.train_iterator())
  g = batch.graphs
  lengths = np.linalg.norm(np.take_along_axis(g.positions, g.senders[..., None], 1)
                           - np.take_along_axis(g.positions, g.receivers[..., None], 1), axis=-1)
  assert (lengths[g.edge_mask] < 3.0).all()
  assert g.edge_mask.sum() == n_edges[batch.record_index[batch.record_index >= 0]].sum()


WORKER = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import numpy as np
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    process_id, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                               process_id=process_id)
    from consist.bench.data import synthetic_records
    from consist.data.budgets import make_buckets
    from consist.data.pipeline import InputPipeline, to_global
    records = synthetic_records(120, seed=11, max_atoms=25)

    class Source:
      n_atoms = np.array([r.n_atoms for r in records])
      read = []
      def __len__(self): return len(records)
      def __getitem__(self, i):
        self.read.append(int(i))
        return records[i]

    source = Source()
    pipe = InputPipeline(source, make_buckets(source.n_atoms, 3), fidelities=["synthetic"], seed=3)
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    result = {"local_devices": jax.local_device_count(), "steps": pipe.steps_per_epoch(0), "train": [],
              "eval": [], "global_atoms": []}
    it = pipe.train_iterator()
    for _ in range(pipe.steps_per_epoch(0)):
      batch = next(it)
      result["train"] += batch.record_index[batch.record_index >= 0].tolist()
    result["read_train"] = sorted(set(source.read))
    source.read.clear()
    for batch in pipe.eval_iterator():
      g = to_global(batch.graphs, mesh)
      assert g.positions.shape[0] == 8, g.positions.shape
      result["global_atoms"].append(int(jax.jit(lambda m: m.sum())(g.node_mask)))
      result["eval"] += batch.record_index[batch.record_index >= 0].tolist()
    result["read_eval"] = sorted(set(source.read))
    with open(out, "w") as f:
      json.dump(result, f)
    jax.distributed.shutdown()
""")


@pytest.mark.slow
def test_two_real_processes_read_disjoint_slices(tmp_path):
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port),
                             str(tmp_path / f"out{i}.json")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in (0, 1)]
  for p in procs:
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 0, out[-3000:]
  r = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in (0, 1)]
  assert r[0]["local_devices"] == r[1]["local_devices"] == 4
  assert r[0]["steps"] == r[1]["steps"] > 0
  records = synthetic_records(120, seed=11, max_atoms=25)
  n_atoms = np.array([x.n_atoms for x in records])
  # Evaluation: every record exactly once over the two hosts; each host read only its own slice.
  assert not set(r[0]["eval"]) & set(r[1]["eval"])
  assert sorted(r[0]["eval"] + r[1]["eval"]) == list(range(120))
  for x in r:
    assert x["read_eval"] == sorted(x["eval"]) and x["read_train"] == sorted(x["train"])
  # The global array holds both hosts' atoms: its jit-ted sum is the same on both and counts all atoms.
  assert r[0]["global_atoms"] == r[1]["global_atoms"] and sum(r[0]["global_atoms"]) == n_atoms.sum()
  # Training epoch: disjoint, and together exactly the records of the global plan's steps.
  plan = plan_epoch(n_atoms, full_graph_edge_counts(n_atoms), make_buckets(n_atoms, 3), 8, seed=3, epoch=0)
  used = plan.order[:plan.batch_start[plan.step_batches.size]]
  assert not set(r[0]["train"]) & set(r[1]["train"])
  assert sorted(r[0]["train"] + r[1]["train"]) == sorted(used.tolist())

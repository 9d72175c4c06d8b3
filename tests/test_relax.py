"""consist.relax: batched FIRE / L-BFGS converge per molecule, padding and converged molecules stay
put, one compilation per bucket, minima agree with ASE BFGS on an identical energy, and relaxation
on a learned energy (the smoke model) converges; inference loads parameters without the trainer."""

import dataclasses
import os
import subprocess
import sys

import ase
import ase.calculators.calculator
import ase.optimize
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model_fixtures
from consist import checkpoint, relax, synthetic
from consist.data.batching import Budget
from consist.eval.structure import kabsch_rmsd
from consist.predict import molecules

BUDGET = Budget(64, 400, 8)
ANISOTROPY = jnp.asarray([[1.0, 4.0, 0.25]])


def _quadratic(params, batch, positions):
  """Per-atom anisotropic wells around params["centre"] [N, 3] (Å), stiffness params["k"] [N] times
  ANISOTROPY (eV/Å²), plus a quartic term: energy [G] eV, forces [N, 3] eV/Å (0 on padding)."""

  def per_atom(pos):
    d = pos - params["centre"]
    e = 0.5 * params["k"] * jnp.sum(ANISOTROPY * d ** 2, axis=-1) + 0.05 * jnp.sum(d ** 4, axis=-1)
    return jnp.where(batch.node_mask, e, 0.0)

  forces = -jax.grad(lambda pos: jnp.sum(per_atom(pos)))(positions)
  energy = jax.ops.segment_sum(per_atom(positions), batch.node_graph, num_segments=batch.num_graphs)
  return energy, jnp.where(batch.node_mask[:, None], forces, 0.0)


def _problem(seed=0, scale=0.3):
  """(batch of the synthetic world's 6 records, quadratic params, start positions)."""
  batch = model_fixtures.batch(model_fixtures.records(), BUDGET)
  rng = np.random.default_rng(seed)
  n = batch.num_nodes
  params = {"centre": batch.positions, "k": jnp.asarray(rng.uniform(1.0, 30.0, n), jnp.float32)}
  kick = jnp.asarray(rng.normal(scale=scale, size=(n, 3)), jnp.float32)
  # Padding nodes start away from their (zero) well: were they relaxed, they would move.
  start = batch.positions + jnp.where(batch.node_mask[:, None], kick, 1.0)
  return batch, params, start


def _run(energy, params, batch, start, settings, relaxer=None, max_atoms=16):
  """make_relaxer(energy)(...), with the initial Hessians bfgs needs."""
  hessian = (relax.initial_hessians(batch, settings, start, max_atoms=max_atoms)
             if settings.method == "bfgs" else None)
  return (relaxer or relax.make_relaxer(energy))(params, batch, start, settings=settings, hessian=hessian)


@pytest.mark.parametrize("method", relax.METHODS)
def test_converges_on_a_known_quadratic(method):
  batch, params, start = _problem()
  settings = relax.RelaxSettings(method=method, fmax=1e-3, max_steps=1000)
  result = _run(_quadratic, params, batch, start, settings)
  real = np.asarray(batch.graph_mask)
  assert np.asarray(result.converged)[real].all()
  assert (np.asarray(result.fmax)[real] < 1e-3).all() and (np.asarray(result.steps)[real] > 0).all()
  # |F| < fmax bounds the distance to the minimum by fmax / (smallest curvature 0.25 eV/Å²).
  err = np.linalg.norm(np.asarray(result.positions - params["centre"]), axis=-1)[np.asarray(batch.node_mask)]
  assert err.max() < 1e-3 / 0.25
  energy0, _ = _quadratic(params, batch, start)
  assert (np.asarray(result.energy)[real] < 1e-5 * np.asarray(energy0)[real]).all()
  np.testing.assert_allclose(result.energy, _quadratic(params, batch, result.positions)[0], rtol=1e-6)


@pytest.mark.parametrize("method", relax.METHODS)
def test_padding_never_moves_and_step_limit_is_reported(method):
  batch, params, start = _problem(scale=0.5)
  settings = relax.RelaxSettings(method=method, fmax=1e-4, max_steps=7, trajectory=True)
  result = _run(_quadratic, params, batch, start, settings)
  pad_nodes, pad_graphs = ~np.asarray(batch.node_mask), ~np.asarray(batch.graph_mask)
  traj = np.asarray(result.trajectory)
  assert traj.shape == (8, batch.num_nodes, 3)
  assert (traj[:, pad_nodes] == np.asarray(start)[pad_nodes]).all()
  assert (np.asarray(result.steps)[pad_graphs] == 0).all()
  assert not np.asarray(result.converged)[pad_graphs].any()
  # Nobody reaches 1e-4 eV/Å in 7 steps: every real molecule is reported at the limit, unconverged.
  real = ~pad_graphs
  assert (np.asarray(result.steps)[real] == 7).all() and not np.asarray(result.converged)[real].any()
  assert (np.asarray(result.fmax)[real] > 1e-4).all()


def test_a_converged_molecule_stops_while_the_others_go_on():
  batch, params, start = _problem()
  # Molecule 0 starts next to its minimum; the others far from theirs.
  first = np.asarray(batch.node_graph) == 0
  start = jnp.where(jnp.asarray(first)[:, None], params["centre"] + 1e-3, start)
  settings = relax.RelaxSettings(fmax=2e-3, max_steps=1000, trajectory=True)
  result = _run(_quadratic, params, batch, start, settings)
  steps = np.asarray(result.steps)
  assert steps[0] < steps[1:6].min()
  traj = np.asarray(result.trajectory)
  # After its last step molecule 0 is frozen: bit-identical positions in every later frame.
  assert (traj[steps[0]:, first] == traj[steps[0], first]).all()
  assert (traj[steps[0] - 1, first] != traj[steps[0], first]).any() or steps[0] == 0
  assert int(result.loop_steps) == steps.max()


def test_a_molecule_relaxes_the_same_alone_or_in_a_batch():
  batch, params, start = _problem()
  recs = model_fixtures.records()
  alone = model_fixtures.batch(recs[2:3], Budget(16, 64, 2))
  nodes = np.asarray(batch.node_graph) == 2
  n = int(nodes.sum())
  pad = lambda x, fill: jnp.concatenate([x[nodes], jnp.full((16 - n,) + x.shape[1:], fill, x.dtype)])
  relaxer = relax.make_relaxer(_quadratic)
  settings = relax.RelaxSettings(fmax=1e-3)
  together = _run(_quadratic, params, batch, start, settings, relaxer)
  single = _run(_quadratic, {"centre": pad(params["centre"], 0.0), "k": pad(params["k"], 1.0)}, alone,
                pad(start, 0.0), settings, relaxer)
  assert int(single.steps[0]) == int(together.steps[2])
  np.testing.assert_allclose(single.positions[:n], together.positions[nodes], atol=1e-6)


def test_one_compilation_per_bucket():
  relaxer = relax.make_relaxer(_quadratic)
  settings = relax.RelaxSettings(fmax=1e-2)
  for seed in range(3):  # other molecules, positions and params in the same bucket
    batch, params, start = _problem(seed=seed)
    recs = model_fixtures.records(seed=seed)[seed:]
    batch = model_fixtures.batch(recs, BUDGET)
    params = {"centre": batch.positions, "k": params["k"]}
    _run(_quadratic, params, batch, start, settings, relaxer)
  assert relaxer._cache_size() == 1  # pylint: disable=protected-access
  bigger = model_fixtures.batch(recs, Budget(72, 400, 8))
  _run(_quadratic, {"centre": bigger.positions, "k": jnp.ones(72)}, bigger, bigger.positions, settings, relaxer)
  assert relaxer._cache_size() == 2  # pylint: disable=protected-access


# --------------------------------------------------- real molecular graphs with known minima


def _springs(params, batch, positions):
  """The synthetic world's accurate energy (bond, angle, torsion springs + planarity on real
  molecular graphs; a unique minimum up to rigid motion) of every graph of `batch`."""
  energy, grad = jax.value_and_grad(
      lambda pos: (lambda e: (jnp.sum(e), e))(synthetic.spring_energy(pos, params, batch.num_graphs)),
      has_aux=True)(positions)
  return energy[1], jnp.where(batch.node_mask[:, None], -grad, 0.0)


class _SpringCalculator(ase.calculators.calculator.Calculator):
  """ASE calculator on the same JAX function, for one molecule."""

  implemented_properties = ["energy", "forces"]

  def __init__(self, springs, batch):
    super().__init__()
    self.springs, self.batch = springs, batch

  def calculate(self, atoms=None, properties=("energy",), system_changes=ase.calculators.calculator.all_changes):
    super().calculate(atoms, properties, system_changes)
    n = len(self.atoms)
    pos = self.batch.positions.at[:n].set(jnp.asarray(self.atoms.positions, jnp.float32))
    energy, forces = _springs(self.springs, self.batch, pos)
    self.results = {"energy": float(energy[0]), "forces": np.asarray(forces[:n], np.float64)}


def _kicked_world(seed=0, scale=0.1):
  world = model_fixtures.world()
  rng = np.random.default_rng(seed)
  recs = [r.replace(positions=r.ref_positions + rng.normal(scale=scale, size=r.ref_positions.shape))
          for r in world.equilibrium_records()]
  return world, recs


@pytest.mark.parametrize("method", relax.METHODS)
def test_real_molecules_reach_their_known_minimum(method):
  world, recs = _kicked_world()
  batch = model_fixtures.batch(recs, BUDGET)
  springs = jax.tree.map(jnp.asarray, world.springs_for(range(len(recs))))
  result = _run(_springs, springs, batch, batch.positions,
                relax.RelaxSettings(method=method, fmax=1e-3, max_steps=2000))
  assert np.asarray(result.converged)[:len(recs)].all()
  positions = np.asarray(result.positions, np.float64)
  start = 0
  for r, mol in zip(recs, world.molecules):
    final = positions[start:start + r.n_atoms]
    assert kabsch_rmsd(final, mol.accurate_minimum) < 0.01
    assert kabsch_rmsd(r.positions, mol.accurate_minimum) > 0.05  # it had somewhere to go
    start += r.n_atoms


@pytest.mark.parametrize("method,hessian", [("fire", "lindh"), ("lbfgs", "lindh"), ("bfgs", "identity"),
                                            ("bfgs", "lindh")])
def test_minima_agree_with_ase_bfgs_on_an_identical_energy(method, hessian):
  """Unaligned RMSD, except for BFGS from the model Hessian: it takes another path to the same
  minimum, which may end rigidly rotated against ASE's (the energy does not see rotations)."""
  world, recs = _kicked_world(seed=1)
  fmax = 1e-3
  for m, (r, mol) in enumerate(zip(recs, world.molecules)):
    batch = model_fixtures.batch([r], Budget(16, 256, 2))
    springs = jax.tree.map(jnp.asarray, world.springs_for([m]))
    settings = relax.RelaxSettings(method=method, fmax=fmax, max_steps=2000, hessian=hessian)
    ours = _run(_springs, springs, batch, batch.positions, settings)
    atoms = ase.Atoms(numbers=r.atomic_numbers, positions=r.positions)
    atoms.calc = _SpringCalculator(springs, batch)
    assert ase.optimize.BFGS(atoms, logfile=None).run(fmax=fmax, steps=2000) and bool(ours.converged[0])
    final = np.asarray(ours.positions[:r.n_atoms], np.float64)
    if (method, hessian) == ("bfgs", "lindh"):
      rmsd = kabsch_rmsd(final, atoms.positions)
    else:
      rmsd = np.sqrt(np.mean(np.sum((final - atoms.positions) ** 2, axis=1)))  # no alignment
    assert rmsd < 0.01, (mol.smiles, rmsd)
    assert float(ours.energy[0]) == pytest.approx(atoms.get_potential_energy(), abs=1e-4)


# ------------------------------------------------------------- streams with refilled batches

RC = 3.0  # Å, cutoff of the pair energy below


def _pairs(params, batch, positions):
  """A smooth pair energy that ignores pairs beyond RC: Morse wells (bonded pairs at 1.2 Å, others
  at 2.2 Å) times (1 - r^2/RC^2)^2, summed per graph; it depends only on the batch's content, so
  any packing of the molecules gives each the same energy."""

  def per_edge(pos):
    r2 = jnp.sum((pos[batch.receivers] - pos[batch.senders]) ** 2, axis=-1)
    inside = batch.edge_mask & (r2 > 0.0) & (r2 < RC ** 2)
    r = jnp.sqrt(jnp.where(inside, r2, 1.0))
    r0 = jnp.where(batch.bond_order > 0, 1.2, 2.2)
    morse = (1.0 - jnp.exp(-1.5 * (r - r0))) ** 2 - 1.0
    return jnp.where(inside, 0.5 * params["depth"] * morse * (1.0 - r2 / RC ** 2) ** 2, 0.0)

  energy = jax.ops.segment_sum(per_edge(positions), batch.node_graph[batch.senders], num_segments=batch.num_graphs)
  forces = -jax.grad(lambda pos: jnp.sum(per_edge(pos)))(positions)
  return energy, jnp.where(batch.node_mask[:, None], forces, 0.0)


PAIR_PARAMS = {"depth": jnp.asarray(2.0)}


def _stream_records(n=12, seed=0):
  recs = model_fixtures.records(n_off_per_molecule=3, seed=seed)
  rng = np.random.default_rng(seed)
  return [r.replace(positions=r.positions + rng.normal(scale=0.1, size=r.positions.shape)) for r in recs][:n]


@pytest.mark.parametrize("method", relax.METHODS)
def test_a_refilled_stream_matches_one_batch(method):
  recs = _stream_records()
  settings = relax.RelaxSettings(method=method, fmax=1e-3, max_steps=2000)
  stream = relax.StreamRelaxer(_pairs, fidelities=[synthetic.ACCURATE], graphs=3)
  out = stream.relax(PAIR_PARAMS, recs, settings)
  assert stream.stats["calls"] > len(recs) // 3  # refilled: more loop calls than batches of 3
  one = _run(_pairs, PAIR_PARAMS, model_fixtures.batch(recs, Budget(128, 1024, 13)),
             model_fixtures.batch(recs, Budget(128, 1024, 13)).positions, settings, max_atoms=16)
  start = 0
  for g, (r, o) in enumerate(zip(recs, out)):
    nodes = slice(start, start + r.n_atoms)
    start += r.n_atoms
    assert o.converged and bool(one.converged[g]) and o.fmax < 1e-3
    assert abs(o.steps - int(one.steps[g])) <= 1 and o.evaluations == o.steps + 1
    np.testing.assert_allclose(o.positions, np.asarray(one.positions[nodes]), atol=2e-4)
    assert o.energy == pytest.approx(float(one.energy[g]), abs=1e-4)


def test_a_stream_compiles_once_per_shape():
  recs = _stream_records()
  stream = relax.StreamRelaxer(_pairs, fidelities=[synthetic.ACCURATE], graphs=3)
  shape = stream.shape_for(recs)
  settings = relax.RelaxSettings(fmax=1e-2)
  stream.relax(PAIR_PARAMS, recs, settings, shape=shape)
  calls = stream.stats["calls"]
  # Other molecules and structures, another stream, same shape: the compiled loop is reused.
  stream.relax(PAIR_PARAMS, _stream_records(n=7, seed=1)[::-1], settings, shape=shape)
  assert stream.stats["calls"] > calls > 1 and stream.traces == 1
  stream.relax(PAIR_PARAMS, recs, dataclasses.replace(settings, method="lbfgs"), shape=shape)
  assert stream.traces == 2  # other settings: one more


def test_a_stream_reports_unconverged_molecules_and_keeps_converged_ones_put():
  recs = _stream_records(n=6)
  settings = relax.RelaxSettings(fmax=1e-3, max_steps=2000)
  relaxed = relax.StreamRelaxer(_pairs, fidelities=[synthetic.ACCURATE], graphs=2).relax(PAIR_PARAMS, recs, settings)
  # Start two molecules at their minima: they finish at once, exactly where they started.
  recs2 = [r.replace(positions=o.positions) if i in (1, 4) else r for i, (r, o) in enumerate(zip(recs, relaxed))]
  stream = relax.StreamRelaxer(_pairs, fidelities=[synthetic.ACCURATE], graphs=2)
  out = stream.relax(PAIR_PARAMS, recs2, dataclasses.replace(settings, max_steps=5, trajectory=True))
  for i, (r, o) in enumerate(zip(recs2, out)):
    assert o.trajectory.shape == (o.steps + 1, r.n_atoms, 3)
    np.testing.assert_array_equal(o.trajectory[0], np.asarray(r.positions, np.float32))
    np.testing.assert_array_equal(o.trajectory[-1], o.positions)
    if i in (1, 4):
      assert o.converged and o.steps == 0 and o.evaluations == 1
      np.testing.assert_array_equal(o.positions, np.asarray(r.positions, np.float32))
    else:  # at the step limit: reported, with the force there
      assert not o.converged and o.steps == 5 and o.fmax > 1e-3
      assert o.fmax == pytest.approx(np.linalg.norm(o.forces, axis=1).max(), rel=1e-5)


@pytest.mark.parametrize("method", ["bfgs", "fire"])
def test_a_radius_graph_with_skin_gives_the_all_pairs_result(method):
  recs = _stream_records()
  settings = relax.RelaxSettings(method=method, fmax=1e-3, max_steps=2000)
  full = relax.StreamRelaxer(_pairs, fidelities=[synthetic.ACCURATE], graphs=4).relax(PAIR_PARAMS, recs, settings)
  stream = relax.StreamRelaxer(_pairs, fidelities=[synthetic.ACCURATE], graphs=4, cutoff=RC, skin=0.3)
  shape = stream.shape_for(recs)
  assert shape.n_edge < relax.StreamRelaxer(_pairs, graphs=4).shape_for(recs).n_edge or shape.n_edge == 1024
  out = stream.relax(PAIR_PARAMS, recs, settings)
  assert stream.stats["rebuilds"] > 0  # molecules moved more than skin / 2: neighbour lists rebuilt
  for a, b in zip(full, out):
    assert a.converged and b.converged and abs(a.steps - b.steps) <= 1
    np.testing.assert_allclose(a.positions, b.positions, atol=2e-4)
    assert a.energy == pytest.approx(b.energy, abs=1e-4)


def test_padding_of_a_stream_batch_never_moves():
  recs = _stream_records(n=3)
  settings = relax.RelaxSettings(fmax=1e-3, max_steps=50)
  stream = relax.StreamRelaxer(_pairs, fidelities=[synthetic.ACCURATE], graphs=2)
  shape = stream.shape_for(recs)
  mols = [stream._new_molecule(i, r, settings) for i, r in enumerate(recs[:2])]  # pylint: disable=protected-access
  batch, state = stream._pack(mols, shape, settings)  # pylint: disable=protected-access
  pad = ~batch.node_mask
  state["pos"][pad] = 7.0  # padding nodes away from the origin: they would feel a force if relaxed
  state["anchor"][pad] = 7.0
  st, _, iters = relax.run_loop(_pairs, PAIR_PARAMS, jax.tree.map(jnp.asarray, batch),
                                jax.tree.map(jnp.asarray, state), settings=settings, max_iters=100)
  assert int(iters) > 1 and (np.asarray(st["pos"])[pad] == 7.0).all()
  assert np.asarray(st["done"]).all() and (np.asarray(st["steps"])[~batch.graph_mask] == 0).all()


# ------------------------------------------------------------------------ the learned energy


from predict_model import model, workdir  # noqa: E402,F401  (the shared smoke-model fixtures)


SMILES = ("CCO", "CC(=O)N", "c1ccoc1", "CC(C)O", "OC=O")


def _records(model, seed=0):
  out = []
  for i, smiles in enumerate(SMILES):
    mol = molecules.from_smiles(smiles)
    positions = molecules.start_positions(mol, "refine", seed)
    positions = positions + np.random.default_rng(i).normal(scale=0.05, size=positions.shape)
    out.append(molecules.to_record(mol, positions, model.fidelities[0]))
  return out


def test_relaxation_on_the_learned_energy_converges_without_recompiling(model):
  records = _records(model)
  settings = relax.RelaxSettings(fmax=0.05, max_steps=1000)
  before = model.energy_and_forces(records)
  out = model.relax(records, settings)
  for (e0, f0), r in zip(before, out):
    assert r.converged and r.fmax < 0.05 and r.steps > 0
    assert r.energy < e0 and np.isclose(r.fmax, np.linalg.norm(r.forces, axis=1).max(), rtol=1e-5)
  # The reported energy and forces are the model's at the final positions.
  again = model.energy_and_forces([rec.replace(positions=r.positions) for rec, r in zip(records, out)])
  for (e, f), r in zip(again, out):
    assert e == pytest.approx(r.energy, abs=1e-4) and np.allclose(f, r.forces, atol=1e-4)
  compiled = model._stream.traces  # pylint: disable=protected-access
  model.relax(_records(model, seed=1)[::-1], settings)  # other structures, same stream shape
  assert model._stream.traces == compiled  # pylint: disable=protected-access


def test_loading_for_inference_needs_no_trainer(workdir, tmp_path):
  code = ("import sys; import consist.inference as i; "
          "assert 'consist.train' not in sys.modules, 'consist.train imported'; "
          "assert not hasattr(i, 'create_state') and not hasattr(i, 'make_optimizer'); "
          f"m = i.TrainedModel.load({str(workdir)!r}); print(m.step)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]


def test_ema_parameters_are_preferred_when_the_checkpoint_has_them(workdir, tmp_path, model):
  import shutil  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  ema_dir = copy / "checkpoints" / str(model.step) / "ema"
  assert ema_dir.is_dir()  # the trainer saves the EMA parameters
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), model.params)
  shutil.rmtree(ema_dir)  # a checkpoint without them: the plain parameters
  plain = checkpoint.restore_model_params(copy, model.step, abstract)
  ema = jax.tree.map(lambda x: x + 1.0, plain)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(ema_dir, ema)
  restored = checkpoint.restore_model_params(copy, model.step, abstract)
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), restored, ema)))
  bad = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape + (1,), x.dtype), model.params)
  with pytest.raises(checkpoint.CheckpointMismatchError, match="parameter"):
    checkpoint.restore_model_params(copy, model.step, bad)

"""Model benchmark on a fixed batch of the synthetic world (6 molecules, 5-9 atoms, with
off-equilibrium conformations): energy+forces, a multi-task train step, a stage-2 train step with
both consistency terms, and their ratios. Times are medians over repeats, after compilation."""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from consist import diffusion, synthetic
from consist.data.batching import Budget, batch_records
from consist.losses import total
from consist.models import model as model_lib
from consist.models.config import EnergyModelConfig, ModelConfig


def _time(fn, *args, repeats: int) -> tuple[float, float]:
  """(compile + first call s, median call s)."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return first, statistics.median(times)


def _train_step(model, schedule, loss_config, optimizer):
  @jax.jit
  def step(params, opt_state, batch, rng):
    grads, metrics = jax.grad(
        lambda p: total.total_loss(model, schedule, loss_config, p, batch, rng), has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics["loss"]
  return step


def run(quick: bool) -> dict:
  world = synthetic.make_world()
  per_molecule = 1 if quick else 3
  records = world.equilibrium_records() + world.off_equilibrium_records(
      per_molecule, np.random.default_rng(0))
  n_atoms = sum(r.n_atoms for r in records)
  budget = Budget(n_node=n_atoms + 1, n_edge=sum(r.n_atoms * (r.n_atoms - 1) for r in records),
                  n_graph=len(records) + 1)
  batch = jax.tree.map(jnp.asarray,
                       batch_records(records, budget, fidelities=[synthetic.ACCURATE]))
  # Synthetic molecules lie within the cutoff: every other atom is a neighbour; unit force scale.
  energy = EnergyModelConfig(avg_num_neighbors=n_atoms / len(records) - 1.0, scale=1.0)
  if quick:
    config = ModelConfig(energy=dataclasses.replace(energy, channels=8, radial_hidden=(16,)),
                         channels=16, vector_channels=8)
  else:
    config = ModelConfig(energy=energy)
  model = model_lib.Model(config)
  schedule = diffusion.Schedule()
  params = model_lib.init_params(model, jax.random.key(0), batch)
  optimizer = optax.adam(1e-3)
  opt_state = optimizer.init(params)
  rng = jax.random.key(1)
  repeats = 3 if quick else 10

  ef = jax.jit(lambda p, b: model_lib.energy_and_forces(model, p, b))
  ef_compile, ef_s = _time(ef, params, batch, repeats=repeats)
  stage1 = _train_step(model, schedule, total.LossConfig(), optimizer)
  s1_compile, s1_s = _time(stage1, params, opt_state, batch, rng, repeats=repeats)
  stage2_config = total.LossConfig(optimality_weight=1.0, score_weight=1.0)
  stage2 = _train_step(model, schedule, stage2_config, optimizer)
  s2_compile, s2_s = _time(stage2, params, opt_state, batch, rng, repeats=repeats)
  return {
      "batch": {"graphs": len(records), "atoms": n_atoms, "edges": budget.n_edge},
      "model": {"channels": config.channels, "vector_channels": config.vector_channels,
                "max_l": config.max_l, "layers": config.num_layers,
                "params": int(sum(x.size for x in jax.tree.leaves(params)))},
      "energy_forces_s": ef_s,
      "multitask_step_s": s1_s,
      "stage2_consistency_step_s": s2_s,
      "ratio_multitask_over_energy_forces": s1_s / ef_s,
      "ratio_stage2_over_multitask": s2_s / s1_s,
      "compile_s": {"energy_forces": ef_compile, "multitask_step": s1_compile,
                    "stage2_step": s2_compile},
  }

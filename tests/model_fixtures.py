"""Shared fixtures for the model / diffusion / loss tests: a small synthetic world and model."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from consist import synthetic
from consist.data.batching import Budget, batch_records
from consist.models import model as model_lib
from consist.models.config import EnergyModelConfig, ModelConfig

SMILES = ("CCO", "C=CC=O", "OC=O")
# The energy model's data statistics are given (a trainer computes them from the data).
SMALL_ENERGY = EnergyModelConfig(channels=8, radial_hidden=(16,), readout_hidden=8,
                                 avg_num_neighbors=4.0, scale=1.0)
SMALL = ModelConfig(energy=SMALL_ENERGY, channels=8, vector_channels=4, num_layers=2,
                    radial_hidden=16)


@functools.cache
def world() -> synthetic.SyntheticWorld:
  return synthetic.make_world(SMILES)


def records(n_off_per_molecule: int = 1, seed: int = 0):
  w = world()
  return w.equilibrium_records() + w.off_equilibrium_records(
      n_off_per_molecule, np.random.default_rng(seed))


def batch(recs, budget: Budget = Budget(64, 400, 8)):
  return jax.tree.map(jnp.asarray,
                      batch_records(recs, budget, fidelities=[synthetic.ACCURATE]))


def model_and_params(config: ModelConfig = SMALL, seed: int = 0, example=None):
  model = model_lib.Model(config)
  example = batch(records()) if example is None else example
  return model, model_lib.init_params(model, jax.random.key(seed), example)


def random_orthogonal(rng: np.random.Generator, reflect: bool) -> np.ndarray:
  q, r = np.linalg.qr(rng.normal(size=(3, 3)))
  q = q * np.sign(np.diag(r))
  if (np.linalg.det(q) < 0) != reflect:
    q[:, 0] = -q[:, 0]
  return q

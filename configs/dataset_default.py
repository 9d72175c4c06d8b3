r"""The bundled dataset: MMFF94 structures, GFN2-xTB energies/forces, GFN2-xTB minima for val/test.

  python -m launch.build_dataset --config configs/dataset_default.py [--overwrite]

About 40 CPU-minutes per 1,000 molecules on this 2-core machine (2 workers; GFN2-xTB reference
relaxations of val/test dominate). Resumable: re-run the same command after an interruption.
"""

import ml_collections

from consist.build.config import settings_config


def get_config():
  c = ml_collections.ConfigDict()
  c.source = "data/sources/smiles_default.smi"
  c.out = "data/bundled"
  c.workdir = "build/dataset_default"  # journal (git-ignored)
  c.n_molecules = 6600
  c.split_fractions = (("train", 0.8), ("val", 0.1), ("test", 0.1))
  # Off-equilibrium samples (150, 300, 600 K normal-mode displacements) for 42% of the training
  # molecules: >= 2,000 molecules with 3 samples while the repository stays < 20 MB.
  c.settings = settings_config(offeq_fraction=0.42)
  c.chunk_size = 16
  c.workers = 2
  return c

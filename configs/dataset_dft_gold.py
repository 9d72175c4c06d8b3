r"""DFT gold set: MMFF94 structures, B3LYP/6-31G* (PySCF) energies/forces and minima, <= 5 heavy atoms.

  pip install 'consist[dft]'
  python -m launch.build_dataset --config configs/dataset_dft_gold.py

The paper's level of theory on molecules small enough for a CPU: a B3LYP/6-31G* single point +
gradient of a 5-heavy-atom molecule took 40-75 s here (2 shared cores) and a Hessian-seeded
reference relaxation ~10-25 of them, so these 24 molecules (12 train with energy + forces at the
MMFF94 structure, 6 val + 6 test with B3LYP minima) take ~3 CPU-hours. Resumable like every build.
"""

from configs import dataset_default
from consist.build.config import settings_config


def get_config():
  c = dataset_default.get_config()
  c.out = "data/dft_gold"
  c.workdir = "build/dataset_dft_gold"
  c.max_heavy_atoms = 5
  c.n_molecules = 24
  c.split_method = "hash"  # tiny molecules are mostly acyclic: one scaffold group
  c.split_fractions = (("train", 0.5), ("val", 0.25), ("test", 0.25))
  c.settings = settings_config(accurate="b3lyp/6-31g*", offeq_fraction=0.0, ref_fmax=0.02,
                               max_steps=300)
  c.chunk_size = 1
  return c

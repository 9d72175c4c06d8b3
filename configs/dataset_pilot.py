r"""A 200-molecule pilot of the default build (timing estimate; output in build/, not committed).

  python -m launch.build_dataset --config configs/dataset_pilot.py
"""

from configs import dataset_default


def get_config():
  c = dataset_default.get_config()
  c.n_molecules = 200
  c.out = "build/pilot_dataset"
  c.workdir = "build/pilot_work"
  return c

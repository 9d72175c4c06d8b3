r"""data/smoke: the first 64 / 16 / 16 molecules (all their records) of each split of data/bundled.

  python -m launch.build_dataset --config configs/dataset_smoke.py --overwrite   (seconds)
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.subset_of = "data/bundled"
  c.subset_molecules = {"train": 64, "val": 16, "test": 16}
  c.out = "data/smoke"
  return c

"""Reproduction experiment on the smoke dataset: plumbing check in minutes on a CPU, not a result.

  python -m launch.reproduce --config configs/reproduce_smoke.py --workdir /tmp/consist_repro_smoke

Two run configs from configs/smoke.py (`stage1` = smoke, `stage2` = smoke:stage2, which every arm
modifies as `consist.reproduce` describes) and the `reproduce` section
(`consist.reproduce.ReproduceConfig`). "Force data" = the force loss at `force_weight` plus the
off-equilibrium records; runs without it train on the equilibrium records with force labels removed.
Expected cost on a 2-core CPU: ~1 min per training run (mostly compilation) x (1 + 4 arms) x seeds,
plus ~10 s per arm and mode for the evaluation of the 16 test molecules.
"""

from pathlib import Path

import ml_collections

from consist.reproduce import load_config

_SMOKE = Path(__file__).with_name("smoke.py")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.stage1 = load_config(_SMOKE)
  c.stage2 = load_config(_SMOKE, "stage2")
  c.stage2.train.steps = 10
  c.reproduce = dict(
      seeds=2,
      arms=("multitask", "multitask+forces", "consistency", "consistency+forces"),
      stage1_force_data=False,  # stage 1 is shared by all arms, so it sees no force data
      force_weight=1.0,  # loss.forces_weight with force data (smoke's value); 0 without
      split="test", modes=("denoise", "ddim", "refine"),
      samples=2, steps=5, t_start=1.0, t_star=0.1, eta=0.0,
      level="gfn2-xtb", workers=0, max_molecules=0, eval_seed=0)
  return c

"""The reproduction on the bundled dataset (MMFF94 structures, GFN2-xTB labels and minima), CPU.

  python -m launch.reproduce --config configs/reproduce_quickstart.py --workdir runs/repro_qs --seeds 3

Runs (per seed): configs/quickstart.py stage 1 (3,000 steps), then the four arms, each 1,000 steps of
configs/quickstart.py:stage2 from that checkpoint (`consist.reproduce` defines the arms):
  multitask            consistency weights 0, no force data (the compute-matched baseline)
  multitask+forces     consistency weights 0, force data
  consistency          optimality + score consistency (weights 0.1 / 0.1), no force data
  consistency+forces   both
"Force data" = the GFN2-xTB force labels (force loss at weight `force_weight` = 10, the quickstart
value, and F in score consistency) together with the off-equilibrium records (thermal / perturbed
structures with energies and forces). Runs without force data train on the equilibrium (MMFF)
records of the train/val splits with the force labels removed, and forces_weight = 0. Stage 1 is
shared by the arms, so by default it trains without force data (`stage1_force_data`).
Evaluation: the test split (one equilibrium record per molecule, GFN2-xTB minimum as reference) in
denoise, ddim (10 steps) and refine (t* = 0.1, 10 steps) modes, K = 1, accurate level GFN2-xTB.

Expected cost on a 2-core CPU (estimates from configs/quickstart.py): stage 1 ~15-20 min, each
consistency arm ~10-15 min, each multi-task arm ~5-8 min -> ~55-75 min per seed; evaluation
~1-2 min per arm and mode plus ~2 min for the baselines -> ~3.5-4.5 h for 3 seeds. Re-running the
command resumes (finished runs and evaluations are skipped).
"""

from pathlib import Path

import ml_collections

from consist.reproduce import load_config

_QUICKSTART = Path(__file__).with_name("quickstart.py")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.stage1 = load_config(_QUICKSTART)
  c.stage2 = load_config(_QUICKSTART, "stage2")
  c.reproduce = dict(
      seeds=3,
      arms=("multitask", "multitask+forces", "consistency", "consistency+forces"),
      stage1_force_data=False,
      force_weight=10.0,
      split="test", modes=("denoise", "ddim", "refine"),
      samples=1, steps=10, t_start=1.0, t_star=0.1, eta=0.0,
      level="gfn2-xtb", workers=2, max_molecules=0, eval_seed=0)
  return c

"""The reproduction on the bundled energy model: does consistency make refined structures better?

  python -m launch.reproduce --config configs/reproduce_pretrained.py --workdir runs/repro_pretrained

The energy model is the bundled one (models/pretrained: MACE-class, trained on the GFN2-xTB energies
and forces of data/bundled, configs/energy.py); it is frozen. One stage 1, shared by the seeds,
bundled as models/structure_stage1 (`stage1` below is its config; the bundled one is 26,000 steps in
three runs, models/structure_stage1/README.md):
  stage1       the structure model, denoising the MMFF94 structures (configs/pretrained.py:structure,
               EDM preconditioning, two structure levels), on the frozen energy model
then per seed s (run and data-order seeds + s), from it:
  multitask    stage 1 continued, same steps, denoising only (the compute-matched baseline)
  consistency  the same + optimality consistency (descent form) at the accurate structure level:
               the prediction from the unnoised MMFF94 structure at t* is asked to be a minimum of
               the learned energy (configs/pretrained.py:consistency); it trains only level 1's
               own parameter increment, so the arm's level 0 is bitwise its multi-task twin's
Force data reach the structure model only through the energy model, which trained on them before
stage 1 and does not change here; the arms "+forces" of `consist.reproduce` would differ from these
only in the batches' share of off-equilibrium records and are not run.

Evaluation on the whole test split (761 molecules; GFN2-xTB minima as reference): refine
(deterministic, one step from the MMFF94 structure at the highest structure level the arm trained,
at the t* it trained it for: level 0 at 0.005 for multitask, level 1 at 0.02 for consistency), de
novo (one plain ancestral DDIM sample, 200 steps from the graph at level 0, noise scale 1, no
consensus: the sampler results/ was made with, cheaper than `launch.predict`'s default medoid of 16
samples; an arm with a trained level 1 then refines that sample at level 1), relax (the MMFF94 structure relaxed on the learned energy: the same
for every arm, computed once), and the MMFF94 / ETKDG baselines.
"""

from pathlib import Path

import ml_collections

from consist.data.bundled import PRETRAINED_MODEL, STRUCTURE_STAGE1
from consist.reproduce import load_config

_PRETRAINED = Path(__file__).with_name("pretrained.py")
STAGE1_STEPS = 6000  # a stage 1 trained here (reproduce.stage1_workdir=""); the bundled one is longer


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.stage1 = load_config(_PRETRAINED, "structure")
  c.stage1.train.update(init_from=str(PRETRAINED_MODEL), steps=STAGE1_STEPS, eval_every=0)
  c.stage2 = load_config(_PRETRAINED, "consistency")  # 2,000 steps per arm
  c.reproduce = dict(
      seeds=3, arms=("multitask", "consistency"), stage1_force_data=False,
      stage1_workdir=str(STRUCTURE_STAGE1), force_weight=10.0,
      split="test", modes=("refine", "ddim", "relax"),
      samples=1, steps=200, t_start=1.0, t_star=None, eta=None, noise_scale=1.0, candidates=1,
      noise=False, refine_steps=1, level="gfn2-xtb", workers=2, max_molecules=0, eval_seed=0)
  return c

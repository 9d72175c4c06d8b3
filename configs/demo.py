"""The main job (`make demo`): consistency training against its compute-matched multi-task twin on
the bundled dataset, evaluated against the GFN2-xTB minima, on a laptop CPU.

  python -m launch.reproduce --config configs/demo.py --workdir runs/demo

One seed of configs/reproduce_pretrained.py, shortened: from the bundled stage 1
(models/structure_stage1: the structure model trained 26,000 steps by denoising the MMFF94
structures on the frozen bundled energy model), two stage-2 arms of the same steps —
`multitask` (denoising continued: the baseline) and `consistency` (+ optimality consistency at the
accurate structure level) — then refine (one deterministic step from the MMFF94 structure) and
relaxation on the learned energy on 100 test molecules, beside the MMFF94 structures themselves
and RDKit ETKDG. Prints one short table (arm x RMSD, GFN2-xTB energy gap, valid %) and the plot
paths; the full tables are in runs/demo/results/results.md.

A demonstration of the pipeline: one seed and a few hundred steps prove nothing either way (the
3-seed reproduction is configs/reproduce_pretrained.py, its results in results/).
"""

from pathlib import Path

import ml_collections

from consist.reproduce import load_config

_REPRODUCE = Path(__file__).with_name("reproduce_pretrained.py")
STAGE2_STEPS = 200


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = load_config(_REPRODUCE)
  c.stage2.train.update(steps=STAGE2_STEPS, ckpt_every=STAGE2_STEPS)
  c.stage2.optim.warmup_steps = 20
  c.reproduce.update(seeds=1, modes=("refine", "relax"), max_molecules=100)
  return c

"""The main job (`make demo`): a short two-stage run on the bundled dataset and the evaluation of
the compute-matched multi-task baseline against consistency training, on a laptop CPU.

  python -m launch.reproduce --config configs/demo.py --workdir runs/demo --seeds 1

One seed of: stage 1 multi-task with force data (configs/quickstart.py, 600 steps), then two arms of
200 steps each from that checkpoint — `multitask+forces` (consistency weights 0: the baseline) and
`consistency+forces` (optimality + score consistency) — evaluated in refine mode (MMFF94 structure
noised to t* = 0.1, 10 DDIM steps) on 100 test molecules against their GFN2-xTB minima, beside the
MMFF94 structures themselves and RDKit ETKDG. Prints and writes runs/demo/results/results.md, the
JSON and the plots (PNG).

This is a demonstration of the pipeline, far shorter than the reproduction
(configs/reproduce_quickstart.py, three seeds, four arms): one seed proves nothing either way.
Expected cost on a 2-core CPU: ~15 minutes (about a third of it compiling the train steps).
"""

from pathlib import Path

import ml_collections

from consist.reproduce import load_config

_QUICKSTART = Path(__file__).with_name("quickstart.py")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.stage1 = load_config(_QUICKSTART)
  c.stage1.train.steps = 600
  c.stage1.optim.warmup_steps = 50
  c.stage1.train.eval_every = 300
  c.stage1.train.eval_batches = 4
  c.stage2 = load_config(_QUICKSTART, "stage2")
  c.stage2.train.steps = 200
  c.stage2.train.eval_every = 200
  c.stage2.train.eval_batches = 4
  c.reproduce = dict(
      seeds=1,
      arms=("multitask+forces", "consistency+forces"),
      stage1_force_data=True,
      force_weight=10.0,
      split="test", modes=("refine",),
      samples=1, steps=10, t_start=1.0, t_star=0.1, eta=0.0,
      level="gfn2-xtb", workers=2, max_molecules=100, eval_seed=0)
  return c

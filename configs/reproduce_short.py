"""The reproduction sized for a 2-core CPU in about 75 minutes: the run behind results/.

  python -m launch.reproduce --config configs/reproduce_short.py --workdir runs/repro_short

Same design as configs/reproduce_quickstart.py (three seeds; per seed a stage-1 multi-task run
without force data, then the four arms from that checkpoint for the same steps on the same
schedule: multitask, multitask+forces, consistency, consistency+forces; evaluation in denoise, ddim
and refine modes against the GFN2-xTB minima, paired statistics), shortened: stage 1 1,200 steps,
each arm 400 steps, 150 evenly spaced test molecules. Measured cost on the 2-core VM: see
results/README.md. Re-running the command resumes.
"""

from pathlib import Path

import ml_collections

from consist.reproduce import load_config

_REPRODUCE = Path(__file__).with_name("reproduce_quickstart.py")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = load_config(_REPRODUCE)
  c.stage1.train.steps = 1200
  c.stage1.optim.warmup_steps = 100
  c.stage1.train.eval_every = 600
  c.stage1.train.eval_batches = 4
  c.stage2.train.steps = 400
  c.stage2.train.eval_every = 400
  c.stage2.train.eval_batches = 4
  c.reproduce.max_molecules = 150
  return c

"""Smoke run: a tiny model on the smoke dataset, CPU, seconds.

  python -m launch.train --config configs/smoke.py --workdir /tmp/consist_smoke

Stage 2 from it (consistency terms on):
  python -m launch.train --config configs/smoke.py:stage2 --workdir /tmp/consist_smoke2 \
      --config.train.init_from=/tmp/consist_smoke

Expected cost: under a minute on a 2-core laptop CPU (~15-30 s, most of it compiling the train and
eval steps: one shape bucket), a few MB of disk.
Data: `consist.data.bundled.SMOKE_DATASET` (data/smoke, built by `python -m launch.build_dataset`).
"""

import ml_collections
from ml_collections import config_dict

from consist.config import apply_stage_arg
from consist.data.bundled import SMOKE_DATASET


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """arg: "" / "stage1" (multi-task), "stage2" (adds consistency), "baseline" (stage 2, weights 0)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = dict(path=str(SMOKE_DATASET), train_split="train", val_split="val", graphs_per_device=4,
                num_buckets=1, cutoff=config_dict.placeholder(float), max_nodes=0, reference_records=1000, seed=0)
  c.model = dict(energy=dict(channels=8, radial_hidden=(16,), readout_hidden=8), channels=8, vector_channels=4, max_l=1, num_layers=1, num_radial=6, cutoff=5.0,
                 radial_hidden=16, time_frequencies=4, avg_num_neighbors=8.0, prediction="eps")
  c.diffusion = dict(kind="cosine", position_scale=1.0)
  c.loss = dict(energy_weight=1.0, forces_weight=1.0, denoise_weight=1.0, optimality_weight=0.1,
                score_weight=0.1, kT=0.025)
  c.optim = dict(learning_rate=3e-3, warmup_steps=5, end_lr_factor=0.1, clip_norm=10.0)
  c.train = dict(steps=20, stage=1, init_from="", init_mode="params", log_every=5, ckpt_every=10,
                 eval_every=10, eval_batches=2, keep=2, on_nonfinite="stop")
  return apply_stage_arg(c, arg, __file__)

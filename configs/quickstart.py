"""Quickstart: the two-stage run on the bundled dataset (MMFF94 structures, GFN2-xTB labels) on a laptop CPU.

  # stage 1, multi-task (energy + forces + denoising)
  python -m launch.train --config configs/quickstart.py --workdir runs/qs_stage1
  # stage 2 from it: + optimality and score consistency
  python -m launch.train --config configs/quickstart.py:stage2 --workdir runs/qs_stage2 \
      --config.train.init_from=runs/qs_stage1
  # the compute-matched baseline: stage 2 with consistency weights 0, same steps and data
  python -m launch.train --config configs/quickstart.py:baseline --workdir runs/qs_baseline \
      --config.train.init_from=runs/qs_stage1

Expected cost on a 2-core laptop CPU (one JAX CPU device): stage 1 ~0.3 s/step -> 3,000 steps
~15-20 min; stage 2 (stationarity HVP + score terms) ~2x a stage-1 step -> 1,000 steps ~10-15 min, the
baseline ~5-8 min. Checkpoints ~1 MB each (keep 3). Measured numbers: `python -m launch.bench --only train`.
Data: `consist.data.bundled.BUNDLED_DATASET` (data/bundled, `python -m launch.build_dataset`).
"""

import ml_collections
from ml_collections import config_dict

from consist.config import apply_stage_arg
from consist.data.bundled import BUNDLED_DATASET


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """arg: "" / "stage1", "stage2", "baseline" (see `consist.config.apply_stage_arg`)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = dict(path=str(BUNDLED_DATASET), train_split="train", val_split="val", graphs_per_device=16,
                num_buckets=3, cutoff=config_dict.placeholder(float), max_nodes=0, reference_records=20_000,
                seed=0)
  # The BRIEF's CPU calibration model size: 2 layers, l <= 1.
  # The energy model: issue 12's MACE configuration (consist.models.config.EnergyModelConfig
  # defaults), its own trunk; the structure model: the BRIEF's CPU calibration size.
  c.model = dict(energy=dict(), trunk="separate", channels=32, vector_channels=16, max_l=1, num_layers=2, num_radial=8, cutoff=5.0, topology_hops=0,
                 radial_hidden=32, time_frequencies=8, avg_num_neighbors=12.0, prediction="x0")
  c.diffusion = dict(kind="cosine", position_scale=1.0)
  # x0 prediction with min-SNR weights: consistency gradients reach the structure head at small t
  # (with eps, d x0 / d theta carries sigma(t) -> 0). gamma = 100, not 5: with 5 the small-t
  # denoiser stays poor and refine (t* = 0.1) breaks structures (one seed, 600 + 200 steps, 100
  # test molecules: RMSD 0.43 -> 0.30 Å, GFN2-xTB energy gap 45 -> 10 eV; docs/DEVLOG.md).
  c.loss = dict(energy_weight=1.0, forces_weight=10.0, denoise_weight=1.0, energy_per_atom=True,
                denoise_weighting="min_snr", denoise_snr_gamma=100.0,
                optimality_weight=0.1, optimality_form="stationarity", score_weight=0.1, kT=0.025,
                consistency_params="structure_head")
  c.optim = dict(learning_rate=2e-3, warmup_steps=200, end_lr_factor=0.02, weight_decay=0.0, clip_norm=10.0)
  c.train = dict(steps=3000, stage=1, init_from="", init_mode="params", log_every=25, ckpt_every=250,
                 eval_every=500, eval_batches=0, keep=3, on_nonfinite="stop")
  if arg in ("stage2", "baseline"):
    c.train.steps = 1000
    c.optim.learning_rate = 5e-4
    c.optim.warmup_steps = 50
  return apply_stage_arg(c, arg, __file__)

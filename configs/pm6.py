"""PubChemQC B3LYP/6-31G*//PM6 scale (~86M molecules): data-parallel on a GPU cluster or TPU pod.

Data: convert PubChemQC with `python -m launch.convert` into a dataset directory on storage every
host can read (structures: PM6 minima = the cheap equilibrium labels; energies: B3LYP/6-31G*), then
point --config.data.path at it. Every host reads only its slice of each step (consist.data.pipeline).

TPU pod (v4-64, 32 hosts x 4 chips; every worker runs the same command):
  gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all --command \
    "cd consist && CONSIST_JAX_DISTRIBUTED=1 python -m launch.train --config configs/pm6.py \
     --workdir /mnt/shared/runs/pm6_stage1 --config.data.path=/mnt/shared/pubchemqc"
GPU cluster (Slurm, one process per node): `srun python -m launch.train --jax_distributed ...` with
the same flags. Stage 2 / baseline: `--config configs/pm6.py:stage2` (or `:baseline`) with
`--config.train.init_from=/mnt/shared/runs/pm6_stage1`. The workdir must be a filesystem path shared
by all hosts (orbax writes each host's shards there; metrics are written by process 0 only).

Expected cost (estimate, not measured here): 128 chips x 64 graphs = 8,192 molecules/step; one epoch
of 86M molecules ~10.5k steps; stage 1 = 300k steps (~30 epochs) at ~3 steps/s ~28 h on v4-64;
stage 2 (~2x per step) 50k steps ~9 h. Checkpoints ~40 MB each.
"""

import ml_collections

from consist.config import apply_stage_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """arg: "" / "stage1", "stage2", "baseline" (see `consist.config.apply_stage_arg`)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = dict(path="/mnt/shared/pubchemqc", train_split="train", val_split="val", graphs_per_device=64,
                num_buckets=4, cutoff=5.0, max_nodes=0, reference_records=200_000, seed=0)
  c.model = dict(energy=dict(channels=128, max_l_hidden=2, max_l_edge=3, num_layers=2, cutoff=5.0),
                 trunk="separate", channels=256, vector_channels=128, max_l=2, num_layers=5, num_radial=16, cutoff=5.0,
                 radial_hidden=128, time_frequencies=16, avg_num_neighbors=20.0, prediction="x0")
  c.diffusion = dict(kind="cosine", position_scale=1.0)
  # PubChemQC has no forces: the force term is off; consistency links the energy to the structures.
  # x0 prediction with min-SNR weights: consistency gradients reach the structure head at small t
  # (with eps, d x0 / d theta carries sigma(t) -> 0; docs/DEVLOG.md).
  c.loss = dict(energy_weight=1.0, forces_weight=0.0, denoise_weight=1.0, energy_per_atom=True,
                denoise_weighting="min_snr", denoise_snr_gamma=100.0,
                optimality_weight=0.1, optimality_form="stationarity", score_weight=0.1, kT=0.025,
                consistency_params="structure_head")
  c.optim = dict(learning_rate=5e-4, warmup_steps=5000, end_lr_factor=0.01, weight_decay=0.0, clip_norm=10.0)
  c.train = dict(steps=300_000, stage=1, init_from="", init_mode="params", log_every=200, ckpt_every=5000,
                 eval_every=10_000, eval_batches=200, keep=3, on_nonfinite="skip")
  if arg in ("stage2", "baseline"):
    c.train.steps = 50_000
    c.optim.learning_rate = 1e-4
    c.optim.warmup_steps = 1000
  return apply_stage_arg(c, arg, __file__)

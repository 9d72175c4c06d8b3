"""The energy model alone on the bundled dataset: what `python -m launch.bench --only energy` trains.

  python -m launch.train --config configs/energy.py --workdir runs/energy

MACE-class energy model (consist.models.mace, issue 12's configuration: 32x0e + 32x1o hidden, l <= 2
messages, correlation 3, 2 layers, r_max 5 Å, 8 Bessel functions, p = 5 envelope, radial MLP
64-64-64, readout MLP 16) trained on energies and forces only (the structure model gets no loss and
its parameters do not move: separate trunks). The bench sets `train.steps` so that training fills
its wall-clock budget (25 min by default); alone, 3,000 steps take ~30-35 min on a 2-core laptop CPU.

Recipe (issue 12 item 2), each choice measured on the 2-core VM (docs/DEVLOG.md, session 4):
  * radius graph at the model's cutoff (`data.cutoff=5.0`): the energy does not depend on the edge
    set beyond the cutoff, and the all-pairs graph has 1.39x the edges;
  * batch of 32 molecules, AdamW lr 5e-3 (MACE's), 50 warmup steps, cosine decay to 1% over the run;
  * EMA of the parameters, decay 0.99, for validation and the saved model;
  * per-atom energy MSE weight 100, force MSE weight 10 (forces_loss is the per-atom |dF|^2, i.e.
    3x the per-component MSE MACE's weight 10 multiplies). 300-step trials, validation (EMA):
    energy weight 1 / 10 / 100 -> force RMSE 0.209 / 0.206 / 0.204 eV/Å, energy MAE 1.57 / 1.24 /
    0.61 eV per molecule: the energy weight keeps the energy level right and costs no force accuracy;
  * float32 throughout; the float64 per-element reference is subtracted on the host.
"""

import ml_collections

from consist.data.bundled import BUNDLED_DATASET


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = dict(path=str(BUNDLED_DATASET), train_split="train", val_split="val", graphs_per_device=32,
                num_buckets=3, cutoff=5.0, max_nodes=0, reference_records=20_000, seed=0)
  c.model = dict(energy=dict(channels=32, max_l_hidden=1, max_l_edge=2, correlation=3, num_layers=2,
                             num_bessel=8, cutoff=5.0, envelope_p=5, radial_hidden=(64, 64, 64),
                             readout_hidden=16),
                 trunk="separate", prediction="x0")
  c.loss = dict(energy_weight=100.0, forces_weight=10.0, denoise_weight=0.0, energy_per_atom=True,
                optimality_weight=0.0, score_weight=0.0)
  c.optim = dict(learning_rate=5e-3, warmup_steps=50, end_lr_factor=0.01, weight_decay=0.0,
                 clip_norm=10.0, ema_decay=0.99)
  c.train = dict(steps=3000, stage=1, log_every=50, ckpt_every=1000, eval_every=1000, eval_batches=0,
                 keep=1, on_nonfinite="stop")
  return c

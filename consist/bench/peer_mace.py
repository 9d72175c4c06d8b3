"""PyTorch MACE, the peer of consist's energy bench (issue 12): train for a time budget, evaluate.

Standalone: imports only the standard library, numpy, torch and mace-torch (with e3nn, the
equivariance library mace is built on and installs), never consist or jax, so that it runs under
any interpreter with `pip install torch mace-torch` (consist's extra: `pip install -e '.[peer]'`).
`consist.bench.peer_data` writes its input and runs it in a subprocess.

  python consist/bench/peer_mace.py --data DATA.npz --budget_s 1500 --threads 2 --seed 0 \
      --out result.json [--max_train N] [--log_every_s 30]

DATA.npz holds, per split s in (train, test): s_numbers int32 [atoms], s_positions float64
[atoms, 3] Å, s_n_atoms int32 [structures], s_energy float64 [structures] eV, s_forces float64
[atoms, 3] eV/Å (structures concatenated).

The configuration is issue 12's, built from mace's own pieces (Configuration / AtomicData /
torch_geometric DataLoader, ScaleShiftMACE, WeightedEnergyForcesLoss, mace's statistics helpers
and optimizer parameter groups):
  hidden irreps 32x0e+32x1o, max_ell 2, 2 interactions, RealAgnosticResidualInteractionBlock for
  the first and later ones, correlation 3, r_max 5 Å, 8 Bessel functions, polynomial cutoff p = 5,
  MLP readout 16x0e, E0 per element by least squares on the train split
  (mace.data.utils.compute_average_E0s), avg_num_neighbors, shift (mean per-atom interaction
  energy) and scale (RMS of the force components) from the train split
  (compute_avg_num_neighbors, compute_mean_rms_energy_forces: run_train's default
  rms_forces_scaling as its ScaleShiftMACE model applies it), float32, batch 32, shuffled epochs
  over all train structures, loss mean((ΔE/N)^2) + 10 mean(ΔF^2), Adam lr 5e-3 with a cosine decay
  over the budget. The cosine is a function of the elapsed fraction of the training budget
  (lr = 5e-3 * (1 + cos(pi * t / budget)) / 2 at each step), not of an estimated step count.
  No EMA (mace's --ema is off by default; the issue does not use it).
  Choices the issue leaves open take mace run_train's defaults: radial MLP [64, 64, 64], SiLU
  gate, AMSGrad Adam with weight decay 5e-7 on the interaction linear and product weights (mace's
  parameter groups), gradient-norm clipping at 10.

Timing: `budget_s` bounds the training loop only (a step starts only while elapsed < budget); data
preparation (neighbour lists, statistics, model build) is reported apart as `prep_s`. Inference
throughput is energy+forces on the test split, batch 32, after two warm-up batches.

Progress lines start with "peer_mace:". If torch or mace cannot be imported the script prints
"peer_mace: missing <module>" and exits with status 3.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import types

import numpy as np

MISSING_DEPS_EXIT = 3

CONFIG = {
    "model": "ScaleShiftMACE",
    "hidden_irreps": "32x0e+32x1o",
    "max_ell": 2,
    "num_interactions": 2,
    "interaction": "RealAgnosticResidualInteractionBlock",
    "interaction_first": "RealAgnosticResidualInteractionBlock",
    "correlation": 3,
    "r_max": 5.0,
    "num_bessel": 8,
    "num_polynomial_cutoff": 5,
    "MLP_irreps": "16x0e",
    "radial_MLP": [64, 64, 64],
    "gate": "silu",
    "E0s": "least squares on the train split",
    "scaling": "rms_forces_scaling (shift = mean per-atom interaction energy, scale = RMS force)",
    "ema": False,
    "optimizer": "Adam (amsgrad, mace parameter groups)",
    "lr": 5e-3,
    "weight_decay": 5e-7,
    "clip_grad": 10.0,
    "lr_schedule": "cosine over the elapsed fraction of the training budget",
    "energy_weight": 1.0,
    "forces_weight": 10.0,
    "batch_size": 32,
    "dtype": "float32",
}


def log(msg: str) -> None:
  print(f"peer_mace: {msg}", flush=True)


def _import_deps():
  try:
    import torch  # noqa: F401
    import mace  # noqa: F401
    from e3nn import o3  # noqa: F401  (a dependency of mace-torch)
    from mace import data as mace_data  # noqa: F401
    from mace import modules  # noqa: F401
    from mace import tools  # noqa: F401
    from mace.tools import scripts_utils, torch_geometric  # noqa: F401
  except ImportError as e:
    print(f"peer_mace: missing {e.name or e}", flush=True)
    sys.exit(MISSING_DEPS_EXIT)


def load_split(d, split: str, max_n: int | None = None, seed: int = 0):
  """[(numbers, positions, energy, forces)] of one split of the npz."""
  n_atoms = np.asarray(d[f"{split}_n_atoms"], np.int64)
  starts = np.concatenate([[0], np.cumsum(n_atoms)])
  numbers, pos, forces = d[f"{split}_numbers"], d[f"{split}_positions"], d[f"{split}_forces"]
  energy = d[f"{split}_energy"]
  idx = np.arange(len(n_atoms))
  if max_n is not None and max_n < len(idx):
    idx = np.sort(np.random.default_rng(seed).choice(len(idx), max_n, replace=False))
  out = []
  for i in idx:
    a, b = starts[i], starts[i + 1]
    out.append((np.asarray(numbers[a:b], np.int64), np.asarray(pos[a:b], np.float64),
                float(energy[i]), np.asarray(forces[a:b], np.float64)))
  return out


def to_configs(structures):
  from mace.data.utils import Configuration
  return [
      Configuration(atomic_numbers=z, positions=p, properties={"energy": e, "forces": f},
                    property_weights={"energy": 1.0, "forces": 1.0}, cell=np.zeros((3, 3)),
                    pbc=(False, False, False))
      for z, p, e, f in structures
  ]


def evaluate(model, loader, warmup_batches: int = 2):
  """Test metrics and inference throughput (energy + forces) of `model` over `loader`."""
  model.eval()
  for k, batch in enumerate(loader):  # warm-up
    if k >= warmup_batches:
      break
    model(batch.to_dict(), training=False, compute_force=True)
  e_err, n_at, f_err, f_ref = [], [], [], []
  n_struct = 0
  t0 = time.perf_counter()
  for batch in loader:
    out = model(batch.to_dict(), training=False, compute_force=True)
    n = (batch.ptr[1:] - batch.ptr[:-1]).detach()
    e_err.append((out["energy"].detach() - batch.energy).double().numpy())
    n_at.append(n.numpy())
    f_err.append((out["forces"].detach() - batch.forces).double().numpy())
    f_ref.append(batch.forces.double().numpy())
    n_struct += int(batch.num_graphs)
  wall = time.perf_counter() - t0
  e_err, n_at = np.concatenate(e_err), np.concatenate(n_at)
  f_err, f_ref = np.concatenate(f_err), np.concatenate(f_ref)
  return {
      "force_rmse": float(np.sqrt(np.mean(f_err ** 2))),
      "energy_mae_per_atom": float(np.mean(np.abs(e_err) / n_at)),
      "label_force_rms": float(np.sqrt(np.mean(f_ref ** 2))),
      "infer_structures_per_s": n_struct / wall,
      "test_structures": n_struct,
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--data", required=True, help="npz written by consist.bench.peer_data")
  p.add_argument("--budget_s", type=float, required=True, help="training-loop wall-clock seconds")
  p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", required=True, help="result JSON")
  p.add_argument("--max_train", type=int, default=None, help="train on a random subset")
  p.add_argument("--log_every_s", type=float, default=30.0)
  p.add_argument("--interaction_first", default=CONFIG["interaction_first"],
                 help="first interaction block (mace's --model MACE swaps in "
                      "RealAgnosticInteractionBlock; the issue names the residual block)")
  args = p.parse_args(argv)

  _import_deps()
  import torch
  import mace
  from e3nn import o3
  from mace import modules, tools
  from mace.data import AtomicData
  from mace.data.utils import compute_average_E0s
  from mace.tools.scripts_utils import get_params_options
  from mace.tools.torch_geometric import DataLoader

  cfg = dict(CONFIG, interaction_first=args.interaction_first)
  torch.set_default_dtype(torch.float32)
  torch.set_num_threads(args.threads)
  try:
    torch.set_num_interop_threads(1)
  except RuntimeError:
    pass
  np.random.seed(args.seed)
  torch.manual_seed(args.seed)
  bs = cfg["batch_size"]

  # ---- Data preparation (not part of the budget).
  t_prep = time.perf_counter()
  with np.load(args.data) as d:
    train = load_split(d, "train", args.max_train, args.seed)
    test = load_split(d, "test")
  train_cfg, test_cfg = to_configs(train), to_configs(test)
  z_table = tools.get_atomic_number_table_from_zs(
      int(z) for c in train_cfg + test_cfg for z in c.atomic_numbers)
  e0 = compute_average_E0s(train_cfg, z_table)
  atomic_energies = np.array([[e0[z] for z in z_table.zs]])  # [heads, elements]
  heads = ["Default"]

  def graphs(configs):
    return [AtomicData.from_config(c, z_table=z_table, cutoff=cfg["r_max"], heads=heads)
            for c in configs]

  train_data, test_data = graphs(train_cfg), graphs(test_cfg)
  stats_loader = DataLoader(train_data, batch_size=bs, shuffle=False, drop_last=False)
  avg_num_neighbors = float(modules.compute_avg_num_neighbors(stats_loader))
  mean, rms = modules.compute_mean_rms_energy_forces(stats_loader, atomic_energies)
  shift, scale = float(np.ravel(mean)[0]), float(np.ravel(rms)[0])

  model = modules.ScaleShiftMACE(
      r_max=cfg["r_max"], num_bessel=cfg["num_bessel"],
      num_polynomial_cutoff=cfg["num_polynomial_cutoff"], max_ell=cfg["max_ell"],
      interaction_cls=modules.interaction_classes[cfg["interaction"]],
      interaction_cls_first=modules.interaction_classes[cfg["interaction_first"]],
      num_interactions=cfg["num_interactions"], num_elements=len(z_table),
      hidden_irreps=o3.Irreps(cfg["hidden_irreps"]), MLP_irreps=o3.Irreps(cfg["MLP_irreps"]),
      atomic_energies=atomic_energies, avg_num_neighbors=avg_num_neighbors,
      atomic_numbers=z_table.zs, correlation=cfg["correlation"],
      gate=modules.gate_dict[cfg["gate"]], radial_MLP=cfg["radial_MLP"],
      atomic_inter_scale=scale, atomic_inter_shift=shift, heads=heads)
  n_params = sum(q.numel() for q in model.parameters())
  loss_fn = modules.WeightedEnergyForcesLoss(energy_weight=cfg["energy_weight"],
                                             forces_weight=cfg["forces_weight"])
  opt_args = types.SimpleNamespace(lr=cfg["lr"], weight_decay=cfg["weight_decay"], amsgrad=True,
                                   beta=0.9, lr_params_factors="{}", freeze=None)
  optimizer = torch.optim.Adam(**get_params_options(opt_args, model))
  generator = torch.Generator().manual_seed(args.seed)
  train_loader = DataLoader(train_data, batch_size=bs, shuffle=True,
                            drop_last=len(train_data) >= bs, generator=generator)
  test_loader = DataLoader(test_data, batch_size=bs, shuffle=False, drop_last=False)
  prep_s = time.perf_counter() - t_prep
  log(f"torch {torch.__version__}, mace {mace.__version__}, {args.threads} thread(s); "
      f"{len(train_data)} train / {len(test_data)} test structures, elements {z_table.zs}; "
      f"avg_num_neighbors {avg_num_neighbors:.2f}, shift {shift:.4f} eV, scale {scale:.4f}; "
      f"{n_params} parameters; prep {prep_s:.1f} s")

  # ---- Training for the wall-clock budget.
  model.train()
  budget = float(args.budget_s)
  steps = seen = epochs = 0
  def fresh_window():
    return {"loss": 0.0, "f_se": 0.0, "f_n": 0, "e_ae": 0.0, "e_n": 0, "steps": 0}

  win = fresh_window()
  t0 = time.perf_counter()
  next_log = args.log_every_s
  lr = cfg["lr"]
  done = False
  while not done:
    epochs += 1
    for batch in train_loader:
      elapsed = time.perf_counter() - t0
      if elapsed >= budget:
        done = True
        break
      lr = cfg["lr"] * 0.5 * (1.0 + math.cos(math.pi * min(elapsed / budget, 1.0)))
      for group in optimizer.param_groups:
        group["lr"] = lr
      optimizer.zero_grad(set_to_none=True)
      out = model(batch.to_dict(), training=True, compute_force=True)
      loss = loss_fn(pred=out, ref=batch)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=cfg["clip_grad"])
      optimizer.step()
      steps += 1
      seen += int(batch.num_graphs)
      with torch.no_grad():
        n = (batch.ptr[1:] - batch.ptr[:-1]).to(out["energy"].dtype)
        win["loss"] += float(loss)
        win["f_se"] += float(torch.sum((out["forces"] - batch.forces) ** 2))
        win["f_n"] += batch.forces.numel()
        win["e_ae"] += float(torch.sum(torch.abs(out["energy"] - batch.energy) / n))
        win["e_n"] += int(batch.num_graphs)
        win["steps"] += 1
      now = time.perf_counter() - t0
      if now >= next_log:
        log(f"step {steps} epoch {epochs} t {now:.0f}/{budget:.0f} s lr {lr:.2e} "
            f"loss {win['loss'] / win['steps']:.4f} train force RMSE "
            f"{math.sqrt(win['f_se'] / win['f_n']):.4f} eV/A, energy MAE "
            f"{win['e_ae'] / win['e_n']:.4f} eV/atom, {seen / now:.1f} structures/s")
        win = fresh_window()
        next_log = now + args.log_every_s
  train_wall_s = time.perf_counter() - t0
  log(f"trained {steps} steps ({seen} structures, {epochs} epoch(s) begun) in {train_wall_s:.1f} s")

  # ---- Evaluation on the test split.
  metrics = evaluate(model, test_loader)
  result = {
      "force_rmse": metrics["force_rmse"],
      "energy_mae_per_atom": metrics["energy_mae_per_atom"],
      "label_force_rms": metrics["label_force_rms"],
      "steps": steps,
      "train_structures_per_s": seen / train_wall_s if train_wall_s > 0 else 0.0,
      "infer_structures_per_s": metrics["infer_structures_per_s"],
      "budget_s": budget,
      "train_wall_s": train_wall_s,
      "prep_s": prep_s,
      "threads": args.threads,
      "torch_version": torch.__version__,
      "mace_version": mace.__version__,
      "config": dict(cfg, seed=args.seed, n_train=len(train_data), n_test=len(test_data),
                     elements=[int(z) for z in z_table.zs],
                     E0s={int(z): float(e0[z]) for z in z_table.zs},
                     avg_num_neighbors=avg_num_neighbors, shift=shift, scale=scale,
                     n_params=int(n_params), epochs_begun=epochs, final_lr=lr),
  }
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  log(f"test force RMSE {result['force_rmse']:.4f} eV/A (labels' RMS "
      f"{result['label_force_rms']:.4f}), energy MAE {result['energy_mae_per_atom']:.4f} eV/atom, "
      f"train {result['train_structures_per_s']:.1f} / infer "
      f"{result['infer_structures_per_s']:.1f} structures/s; wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

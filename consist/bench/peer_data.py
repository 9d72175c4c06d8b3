"""The PyTorch MACE peer of the energy bench (issue 12): data export and the subprocess runner.

`launch.bench --only energy --peer mace` trains consist's energy model and, in the same run, the
MACE configuration of issue 12 on the same data for the same wall-clock budget. MACE runs in
`consist/bench/peer_mace.py`, a standalone script (standard library, numpy, torch, mace only) that
runs under any interpreter with torch and mace-torch installed: consist's own venv after
`pip install -e '.[peer]'`, or a separate one passed as `python`.

  npz = export_energy_data("data/bundled", "/tmp/energy.npz")
  result = run_peer_mace("/tmp/energy.npz", budget_s=1500, threads=2)

The exchange file (npz), per split `s` in `splits`:
  {s}_numbers    int32   [n_atoms_total]      atomic numbers, structures concatenated
  {s}_positions  float64 [n_atoms_total, 3]   Å
  {s}_n_atoms    int32   [n_structures]
  {s}_energy     float64 [n_structures]       total energy, eV
  {s}_forces     float64 [n_atoms_total, 3]   eV/Å

Command line (export, then optionally run):
  python -m consist.bench.peer_data --dataset data/bundled --out /tmp/energy.npz \
      [--max_train N] [--run --budget_s S --threads T --python PATH --result out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from consist.data.store import open_dataset

PEER_SCRIPT = Path(__file__).with_name("peer_mace.py")
# peer_mace.py exits with this status (after one "peer_mace: missing ..." line) when torch or
# mace cannot be imported.
MISSING_DEPS_EXIT = 3


class PeerError(RuntimeError):
  """The peer could not run or did not produce a result. The message is one line."""


def export_energy_data(dataset_path: str, out_npz: str, splits: Sequence[str] = ("train", "test"),
                       *, max_train: int | None = None, seed: int = 0) -> dict[str, int]:
  """Writes the labelled structures of `splits` of a consist dataset to `out_npz`.

  Records lacking energy or forces are skipped. Positions and forces are stored float32 in
  consist's store and written as float64; energies are float64 throughout.

  Args:
    dataset_path: a consist dataset directory (`consist.data.store.open_dataset`).
    out_npz: the file to write (layout in the module docstring).
    splits: the splits to export.
    max_train: keep at most this many labelled train records, a seeded random subset in dataset
      order (quick checks); None keeps all.
    seed: seed of that subset.

  Returns:
    {split: structures written}.
  """
  dataset = open_dataset(dataset_path)
  arrays: dict[str, np.ndarray] = {}
  counts: dict[str, int] = {}
  for split in splits:
    store = dataset[split]
    numbers, positions, n_atoms, energy, forces = [], [], [], [], []
    for i in range(len(store)):
      rec = store[i]
      if rec.energy is None or rec.forces is None:
        continue
      numbers.append(np.asarray(rec.atomic_numbers, np.int32))
      positions.append(np.asarray(rec.positions, np.float64))
      n_atoms.append(rec.n_atoms)
      energy.append(float(rec.energy))
      forces.append(np.asarray(rec.forces, np.float64))
    if split == "train" and max_train is not None and len(n_atoms) > max_train:
      keep = np.sort(np.random.default_rng(seed).choice(len(n_atoms), max_train, replace=False))
      numbers, positions, forces = ([x[k] for k in keep] for x in (numbers, positions, forces))
      n_atoms, energy = [n_atoms[k] for k in keep], [energy[k] for k in keep]
    if not n_atoms:
      raise ValueError(f"{dataset_path}: split {split!r} has no record with energy and forces")
    arrays[f"{split}_numbers"] = np.concatenate(numbers).astype(np.int32)
    arrays[f"{split}_positions"] = np.concatenate(positions).astype(np.float64)
    arrays[f"{split}_n_atoms"] = np.asarray(n_atoms, np.int32)
    arrays[f"{split}_energy"] = np.asarray(energy, np.float64)
    arrays[f"{split}_forces"] = np.concatenate(forces).astype(np.float64)
    counts[split] = len(n_atoms)
  out = Path(out_npz)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(out.name + ".partial.npz")  # np.savez appends .npz to other names
  np.savez(tmp, **arrays)
  os.replace(tmp, out)
  return counts


def run_peer_mace(npz: str, budget_s: float, threads: int, python: str | None = None,
                  out_json: str | None = None, *, seed: int = 0, max_train: int | None = None,
                  nice: int = 0, log: Callable[[str], None] | None = None) -> dict:
  """Trains and evaluates PyTorch MACE on `npz` in a subprocess; returns its result dict.

  Args:
    npz: the exchange file of `export_energy_data` (train and test splits).
    budget_s: wall-clock seconds of the training loop (data preparation is reported apart).
    threads: torch threads (also OMP_NUM_THREADS / MKL_NUM_THREADS of the subprocess).
    python: the interpreter with torch and mace-torch; default this one (`sys.executable`).
    out_json: where the script writes its result; default a temporary file, removed after.
    seed: torch / shuffling seed.
    max_train: train on at most this many train structures (quick checks).
    nice: niceness increment of the subprocess (0: none).
    log: called with each progress line of the script; default prints it.

  Raises:
    PeerError: the interpreter lacks torch or mace (one line naming the fix), is not found, or
      the script failed.
  """
  python = python or sys.executable
  log = log or (lambda line: print(line, flush=True))
  tmpdir = None
  if out_json is None:
    tmpdir = tempfile.TemporaryDirectory(prefix="peer_mace_")
    out_json = os.path.join(tmpdir.name, "result.json")
  cmd = [python, str(PEER_SCRIPT), "--data", str(npz), "--budget_s", str(budget_s),
         "--threads", str(int(threads)), "--seed", str(int(seed)), "--out", str(out_json)]
  if max_train is not None:
    cmd += ["--max_train", str(int(max_train))]
  if nice:
    cmd = ["nice", "-n", str(int(nice))] + cmd
  env = dict(os.environ, OMP_NUM_THREADS=str(int(threads)), MKL_NUM_THREADS=str(int(threads)),
             PYTHONUNBUFFERED="1")
  missing_line = None
  try:
    try:
      proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env, bufsize=1)
    except FileNotFoundError:
      raise PeerError(f"peer mace: interpreter {python!r} not found; pass the python of an "
                      "environment with torch and mace-torch") from None
    tail: list[str] = []
    assert proc.stdout is not None
    with proc.stdout:
      for line in proc.stdout:
        line = line.rstrip("\n")
        if line.startswith("peer_mace: missing"):
          missing_line = line  # reported by the PeerError below
          continue
        tail = (tail + [line])[-20:]
        log(line)
    rc = proc.wait()
    if rc == MISSING_DEPS_EXIT or missing_line is not None:
      what = missing_line.split("missing", 1)[1].strip() if missing_line else "torch/mace"
      raise PeerError(f"peer mace: {python} cannot import {what}; run `pip install -e '.[peer]'` "
                      "or pass the python of an environment with torch and mace-torch")
    if rc != 0:
      raise PeerError(f"peer mace: {' '.join(cmd)} exited with status {rc}; last output: "
                      + " | ".join(tail[-5:]))
    try:
      with open(out_json, encoding="utf-8") as f:
        return json.load(f)
    except (OSError, ValueError) as e:
      raise PeerError(f"peer mace: no readable result in {out_json}: {e}") from None
  finally:
    if tmpdir is not None:
      tmpdir.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--dataset", default="data/bundled")
  p.add_argument("--out", required=True, help="the npz to write")
  p.add_argument("--max_train", type=int, default=None)
  p.add_argument("--run", action="store_true", help="then train and evaluate MACE on it")
  p.add_argument("--budget_s", type=float, default=1500.0)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--python", default=None, help="interpreter with torch and mace-torch")
  p.add_argument("--result", default=None, help="the JSON result of --run")
  p.add_argument("--nice", type=int, default=0)
  args = p.parse_args(argv)
  counts = export_energy_data(args.dataset, args.out, max_train=args.max_train, seed=args.seed)
  print(f"wrote {args.out}: " + ", ".join(f"{k} {v} structures" for k, v in counts.items()),
        flush=True)
  if args.run:
    try:
      result = run_peer_mace(args.out, args.budget_s, args.threads, args.python, args.result,
                             seed=args.seed, nice=args.nice)
    except PeerError as e:
      print(e, file=sys.stderr)
      return 1
    print(json.dumps(result, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())

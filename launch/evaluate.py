"""Evaluates a trained run and the baselines against the accurate-level minima of a split.

  python -m launch.evaluate --workdir runs/qs_stage2 --data data/bundled --split test \
      --mode refine --samples 4 --steps 10 --t_star 0.1 --out results.json

Every molecule of the split (its equilibrium record with a reference minimum) is predicted K times;
the output JSON holds per-molecule values and a summary of every metric for the model and for the
baselines (the cheap structure itself, RDKit ETKDG without relaxation, the cheap structure relaxed
on the learned energy, with its time), and the energy head's force error at the cheap structures
(`consist.eval.run` documents the metrics). The accurate level runs in --workers single-threaded
processes.
"""

import json
import os
import sys
from pathlib import Path

from absl import app, flags, logging

from launch import _cli
from launch import _sampling_flags as sf


_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory of launch.train (latest checkpoint).")
_DATA = flags.DEFINE_string("data", None, "Dataset directory.")
_SPLIT = flags.DEFINE_string("split", "test", "Split to evaluate.")
_T_START = flags.DEFINE_float("t_start", 1.0, "Start time of denoise / ddim from the prior.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (and the ETKDG baseline's).")
_LEVEL = flags.DEFINE_string("level", "gfn2-xtb", "Accurate level of theory (consist.levels name).")
_WORKERS = flags.DEFINE_integer("workers", min(2, os.cpu_count() or 1),
                                "Processes for the accurate level (0 = in this process).")
_MAX_MOLECULES = flags.DEFINE_integer("max_molecules", 0, "Evenly spaced subset size (0 = all).")
_BASELINES = flags.DEFINE_list("baselines", ["cheap", "etkdg", "relax"], "Baselines to score ('' for none).")
_RELAX_FMAX = flags.DEFINE_float("relax_fmax", 0.05, "relax baseline: to this max force, eV/Å.")
_OUT = flags.DEFINE_string("out", None, "Output JSON file.")
flags.adopt_module_key_flags(sf)  # --help lists the shared sampling flags too
flags.mark_flags_as_required(["workdir", "data", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from consist.eval import run  # after flag parsing: imports jax

  known = run.BASELINES + run.MODEL_BASELINES
  unknown = set(_BASELINES.value) - set(known) - {""}
  if unknown:
    raise app.UsageError(f"--baselines: unknown {sorted(unknown)}; expected some of {known}")
  try:
    sampling = run.Sampling(mode=sf.MODE.value, samples=sf.SAMPLES.value, steps=sf.STEPS.value,
                            t_start=_T_START.value, t_star=sf.T_STAR.value, eta=sf.ETA.value,
                            noise_scale=sf.NOISE_SCALE.value, candidates=sf.CANDIDATES.value,
                            noise=sf.NOISE.value, level=sf.STRUCTURE_LEVEL.value, seed=_SEED.value)
    settings = run.EvalSettings(level=_LEVEL.value, workers=_WORKERS.value,
                                max_molecules=_MAX_MOLECULES.value, etkdg_seed=_SEED.value)
    relax = run.RelaxSettings(fmax=_RELAX_FMAX.value, max_steps=sf.RELAX_STEPS.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  try:
    result = run.evaluate(_WORKDIR.value, _DATA.value, _SPLIT.value, sampling, settings,
                          baselines=[b for b in _BASELINES.value if b], relax=relax,
                          meta={"command": "python -m launch.evaluate " + " ".join(sys.argv[1:])})
  except run.EvaluationError as e:
    sys.exit(f"launch.evaluate: {e}")
  out = Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1))
  rows = {"model": result["model"]["summary"]}
  rows.update({name: b["summary"] for name, b in result["baselines"].items()})
  print(f"{len(result['mol_ids'])} molecules of {_DATA.value}:{_SPLIT.value}, mode {sf.MODE.value}, "
        f"K={sf.SAMPLES.value} -> {out}")
  for metric in ("rmsd_sym_mean", "rmsd_heavy_sym_mean", "bond_mae_mean", "energy_gap_mean",
                 "force_rms_mean", "egap_phi_mean"):
    cells = " ".join(f"{row}={_fmt(s.get(metric, {}).get('mean'))}" for row, s in rows.items())
    print(f"  {metric:22s} {cells}")
  if "relax" in result["baselines"]:
    r = result["baselines"]["relax"]
    print(f"  relax baseline: {r['seconds']:.1f} s ({r['molecules_per_s']:.1f} molecules/s, compilation "
          f"included), {len(r['failures'])} stopped at the step limit")
  if result["force_diagnostic"] is not None:
    d = result["force_diagnostic"]
    print(f"  energy-head force RMSE at the cheap structures {_fmt(d['rmse'])} eV/Å vs accurate "
          f"force RMS {_fmt(d['rms_accurate'])} eV/Å (fraction explained {_fmt(d['fraction_explained'])})")


def _fmt(x) -> str:
  return "–" if x is None else f"{x:.4g}"


if __name__ == "__main__":
  _cli.run(main, "launch.evaluate", log_level=logging.ERROR)

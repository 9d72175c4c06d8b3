"""The reproduction experiment (issue 6): stage 1, four stage-2 arms per seed, evaluation, report.

  python -m launch.reproduce --config configs/reproduce_quickstart.py --workdir runs/repro [--seeds 3]

The config file holds two run configs, `stage1` and `stage2` (what `consist.train` takes), and the
`reproduce` section (`ReproduceConfig`). Per seed s (run seed and data-order seed += s):
  runs/seed<s>/stage1   multi-task stage 1 (`stage1`), with force data only if stage1_force_data
  runs/seed<s>/<arm>    stage 2 (`stage2`) initialised from that stage-1 checkpoint; every arm
                        trains the same steps on the same schedule:
    multitask           consistency weights 0, no force data (the compute-matched baseline)
    multitask+forces    consistency weights 0, force data
    consistency         the stage-2 consistency weights, no force data
    consistency+forces  the stage-2 consistency weights, force data

Force data = the accurate force labels (the force loss at weight `force_weight`, and F in score
consistency) together with the off-equilibrium records (perturbed structures with energies and
forces). A run without force data trains on `data/no_force_data/`: the train and val splits
reduced to their equilibrium records with the force labels removed, and `loss.forces_weight = 0`.
Both see the same energy labels at the equilibrium (cheap) structures. With
`stage2.loss.optimality_form = "relaxed"` every arm of a seed trains stage 2 on that data written
again with the minima of the stage-1 run's (frozen) learned energy as references
(`consist.relaxed_targets`, `data/<name>-relaxed-<energy model fingerprint>/`, once per energy
model): the same records in the same order for every arm; only the consistency arms use them.

Evaluation: the final checkpoint of every arm in every mode of `modes` on `split`
(`consist.eval.run`), and the baselines (cheap structure, ETKDG) once, under evals/. Mode "relax" is
the arm's own baseline: the cheap structures relaxed on its learned energy (`consist.relax`); it
depends on the energy model alone, so arms with bitwise the same energy model (a structure model
trained on a frozen one, `train.init_mode="energy_model"`) share one evaluation. The report is
written by `consist.eval.report.write_report` to results/ (results.md, summary.json, PNG plots),
plus results/results.json (every per-molecule value).

Resumable: a run whose latest checkpoint is at its configured steps is skipped, an unfinished one
resumes from its checkpoint; an evaluation whose file matches the checkpoint step, the settings and
the molecules is skipped. A finished arm initialised from another stage-1 step than the current
one is an error (the stage-1 run changed: use a new workdir).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np

from consist import checkpoint
from consist.config import Config
from consist.data.store import DatasetWriter, open_dataset
from consist.eval import report
from consist.eval import run as eval_run
from consist.inference import MODES, SAMPLER_REVISION, Sampling, TrainedModel
from consist.relax import RelaxSettings
from consist.relaxed_targets import write_relaxed_targets
from consist.train import train_and_evaluate

ARMS = {  # name: (consistency terms on, force data on)
    "multitask": (False, False),
    "multitask+forces": (False, True),
    "consistency": (True, False),
    "consistency+forces": (True, True),
}
NO_FORCE_DATA = "no_force_data"
RELAX_MODE = "relax"  # the cheap structure relaxed on the arm's learned energy
EVAL_MODES = MODES + (RELAX_MODE,)
# Metrics of the tables and paired statistics (results.json keeps every per-molecule metric).
REPORT_METRICS = ("rmsd_mean", "rmsd_heavy_mean", "rmsd_sym_mean", "rmsd_sym_min",
                  "rmsd_heavy_sym_mean", "bond_mae_mean", "dmae_mean", "energy_gap_mean",
                  "energy_gap_min", "force_rms_mean", "force_max_mean", "egap_phi_mean",
                  "broken_frac", "valid_frac", "below_ref_frac", "model_force_rmse")


class ReproduceError(ValueError):
  """Bad reproduction config or an inconsistent workdir; the message names the key or path."""


class ReproduceStopped(Exception):
  """A training run stopped before its last step (Ctrl-C or SIGTERM; its checkpoint is saved):
  the reproduction stops with it, and the same command resumes it."""

  def __init__(self, message: str, interrupted: bool):
    super().__init__(message)
    self.interrupted = interrupted


@dataclasses.dataclass(frozen=True)
class ReproduceConfig:
  """The `reproduce` section of a reproduction config.

  Attributes:
    seeds: number of seeds (stage-1 runs, each with every arm).
    arms: arms to train (names of ARMS); "multitask" (else "multitask+forces") is the reference of
      the paired statistics.
    stage1_force_data: whether stage 1 trains with the force data (then every arm starts from a
      model that has seen it, and "no force data" only concerns stage 2).
    stage1_workdir: an existing run that every seed's arms start from instead of a stage 1 trained
      per seed (e.g. the bundled models/structure_stage1): the seeds then measure the variation
      of stage 2 alone (initialisation of new parameters, data order, noise); "" = train stage 1.
    force_weight: loss.forces_weight of runs with force data (0 without).
    split: evaluation split (records with reference minima).
    modes: generation modes evaluated ("denoise", "ddim", "refine"), and "relax" (the cheap
      structure relaxed on the arm's learned energy to `relax_fmax` eV/Å with `relax_method`;
      "" = `consist.relax.RelaxSettings`' default).
    samples, steps, t_start, t_star, eta, noise_scale, candidates, noise: `consist.inference.Sampling`
      of the evaluation (eta / noise_scale None, candidates 0: each mode's default; by default one
      plain sample; candidates apply to the sampled modes, refine is deterministic; each arm is
      asked for the highest structure level its model was trained for; t_star None: the level's
      own, `TrainedModel.refine_t_star`).
    refine_steps: DDIM steps of mode refine (0: `steps`).
    level, workers, max_molecules: `consist.eval.run.EvalSettings`.
    eval_seed: sampling seed and ETKDG seed.
    relaxed_data: with stage2.loss.optimality_form "relaxed": an existing dataset of
      `launch.relaxed_targets` for the stage-1 energy model (checked by its fingerprint), used
      instead of writing one (e.g. the bundled data/relaxed_stage1); "" = write it.
  """

  seeds: int = 3
  arms: tuple[str, ...] = tuple(ARMS)
  stage1_force_data: bool = False
  stage1_workdir: str = ""
  force_weight: float = 10.0
  split: str = "test"
  modes: tuple[str, ...] = EVAL_MODES
  samples: int = 1
  steps: int = 10
  t_start: float = 1.0
  t_star: float | None = 0.1
  eta: float | None = 0.0
  noise_scale: float | None = 1.0
  candidates: int = 1
  noise: bool = True
  refine_steps: int = 0
  level: str = "gfn2-xtb"
  workers: int = 2
  max_molecules: int = 0
  eval_seed: int = 0
  relax_fmax: float = 0.05
  relax_method: str = ""
  relaxed_data: str = ""

  @property
  def reference_arm(self) -> str:
    """The compute-matched baseline of the paired statistics: "multitask", else the first
    multi-task arm configured (e.g. "multitask+forces" when only force-data arms run)."""
    return next((a for a in ("multitask", "multitask+forces") if a in self.arms), self.arms[0])

  def __post_init__(self):
    if self.seeds < 1:
      raise ReproduceError(f"reproduce.seeds: must be >= 1, got {self.seeds}")
    unknown = [a for a in self.arms if a not in ARMS]
    if unknown or not self.arms:
      raise ReproduceError(f"reproduce.arms: unknown {unknown} (arms: {list(ARMS)})")
    bad = [m for m in self.modes if m not in EVAL_MODES]
    if bad or not self.modes:
      raise ReproduceError(f"reproduce.modes: unknown {bad} (modes: {list(EVAL_MODES)})")
    if self.force_weight <= 0:
      raise ReproduceError(f"reproduce.force_weight: must be > 0, got {self.force_weight}")

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "ReproduceConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
      raise ReproduceError(f"unknown config key(s) {['reproduce.' + k for k in unknown]} "
                           f"(known: {sorted(fields)})")
    kwargs = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in values.items()}
    return cls(**kwargs)

  def sampling(self, mode: str) -> Sampling:
    steps = self.refine_steps if mode == "refine" and self.refine_steps else self.steps
    return Sampling(mode=mode, samples=self.samples, steps=steps, t_start=self.t_start,
                    t_star=self.t_star, eta=self.eta, noise_scale=self.noise_scale,
                    candidates=0 if mode == "refine" else self.candidates, noise=self.noise,
                    seed=self.eval_seed)

  def relax_settings(self) -> RelaxSettings:
    method = {"method": self.relax_method} if self.relax_method else {}
    return RelaxSettings(fmax=self.relax_fmax, **method)

  def eval_settings(self) -> eval_run.EvalSettings:
    return eval_run.EvalSettings(level=self.level, workers=self.workers,
                                 max_molecules=self.max_molecules, etkdg_seed=self.eval_seed)


def load_config(path: str | Path, arg: str | None = None):
  """`get_config(arg)` of a config file (configs/*.py are files, not a package)."""
  path = Path(path)
  spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _plain(cd) -> dict[str, Any]:
  """A ConfigDict (or mapping) as nested plain dicts."""
  return json.loads(json.dumps(cd.to_dict() if hasattr(cd, "to_dict") else dict(cd)))


def run_config(base: Mapping[str, Any], *, seed: int, force_data: bool, consistency: bool,
               data_path: str, force_weight: float, init_from: str = "") -> dict[str, Any]:
  """A train config (plain dict) derived from `base` for one run of the experiment."""
  c = _plain(base)
  c["seed"] = c.get("seed", 0) + seed
  c["data"]["seed"] = c["data"].get("seed", 0) + seed
  c["data"]["path"] = data_path
  c["loss"]["forces_weight"] = force_weight if force_data else 0.0
  if not consistency:
    c["loss"]["optimality_weight"] = 0.0
    c["loss"]["score_weight"] = 0.0
  if init_from:
    c["train"]["init_from"] = init_from
  Config.from_config_dict(c)  # fails early, naming the key
  return c


def write_no_force_data(source: str | Path, dest: Path, splits: list[str]) -> Path:
  """The `splits` of dataset `source` reduced to equilibrium records without force labels, at
  `dest` (written once, atomically; an existing complete copy is reused)."""
  if (dest / "dataset.json").exists():
    return dest
  dataset = open_dataset(source)
  attrs = {"derived_from": str(Path(source).resolve()),
           "filter": "equilibrium records only, force labels removed (consist.reproduce)"}
  with DatasetWriter(dest, overwrite=True, attrs=attrs) as writer:
    for split in splits:
      store = dataset[split]
      out = writer.split(split)
      for i in range(len(store)):
        record = store[i]
        if record.is_equilibrium:
          out.append(record.replace(forces=None), where=f"{source}:{split}[{i}]")
  return dest


def energy_model_fingerprint(params: dict) -> str:
  """sha256 of the energy model's parameters (bytes of every leaf, in tree order)."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(params["energy_model"]):
    digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return digest.hexdigest()


def latest_step(workdir: Path) -> int | None:
  """The latest checkpoint step of a run directory (None without one)."""
  if not (workdir / "checkpoints").is_dir():
    return None
  with checkpoint.Checkpointer(workdir, read_only=True) as ckpt:
    return ckpt.latest_step()


def _init_step(workdir: Path, step: int) -> int | None:
  with checkpoint.Checkpointer(workdir, read_only=True) as ckpt:
    return ckpt.meta(step).get("init_from", {}).get("step")


def _write_json(path: Path, data: Any) -> None:
  """Atomic JSON write (a crash leaves the old file or none)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(data, indent=1))
  os.replace(tmp, path)


def _read_json(path: Path) -> Any | None:
  return json.loads(path.read_text()) if path.exists() else None


class Reproduction:
  """One reproduction workdir: runs/, data/, evals/, results/, log.jsonl."""

  def __init__(self, config, workdir: str | Path, *, log: Callable[[str], None] = print,
               show_progress: bool = True):
    self.stage1 = config["stage1"]
    self.stage2 = config["stage2"]
    self.rc = ReproduceConfig.from_dict(_plain(config["reproduce"]))
    self.workdir = Path(workdir)
    self.log = log
    self.show_progress = show_progress
    s1, s2 = Config.from_config_dict(self.stage1), Config.from_config_dict(self.stage2)
    if s1.train.stage != 1 or s2.train.stage != 2:
      raise ReproduceError(f"stage1.train.stage must be 1 and stage2.train.stage 2, got "
                           f"{s1.train.stage} and {s2.train.stage}")
    if s1.data.path != s2.data.path:
      raise ReproduceError(f"stage1.data.path {s1.data.path} and stage2.data.path {s2.data.path} "
                           "differ")
    if any(ARMS[a][0] for a in self.rc.arms) and not s2.loss.has_consistency:
      raise ReproduceError("stage2.loss: a consistency arm needs optimality_weight or score_weight "
                           "> 0")
    self.data = s1.data.path
    self.splits = [s1.data.train_split] + ([s1.data.val_split] if s1.data.val_split else [])
    self.timings: list[dict[str, Any]] = []

  # ----------------------------------------------------------------------------------- training
  def _data_path(self, force_data: bool) -> str:
    if force_data:
      return self.data
    dest = self.workdir / "data" / NO_FORCE_DATA
    if not (dest / "dataset.json").exists():
      self.log(f"writing {dest} (equilibrium records of {self.splits}, no force labels)")
    return str(write_no_force_data(self.data, dest, self.splits))

  def _stage2_data_path(self, force_data: bool, stage1_dir: Path) -> str:
    """The stage-2 data of an arm: with the "relaxed" optimality form, its data with the minima of
    stage 1's learned energy as references (written once per energy model)."""
    source = self._data_path(force_data)
    if Config.from_config_dict(self.stage2).loss.optimality_form != "relaxed":
      return source
    model = TrainedModel.load(stage1_dir)
    fingerprint = energy_model_fingerprint(model.params)
    if self.rc.relaxed_data:
      if force_data:
        raise ReproduceError("reproduce.relaxed_data holds equilibrium records without force data; the "
                             "arms with force data write their own: set it to ''")
      given = open_dataset(self.rc.relaxed_data).attrs.get("energy_model_fingerprint")
      if given != fingerprint:
        raise ReproduceError(f"reproduce.relaxed_data: {self.rc.relaxed_data} holds minima of another "
                             f"energy model ({given}) than {stage1_dir}'s ({fingerprint})")
      return self.rc.relaxed_data
    dest = self.workdir / "data" / f"{Path(source).name}-relaxed-{fingerprint[:12]}"
    if not (dest / "dataset.json").exists():
      self.log(f"writing {dest} (the equilibrium records of {self.splits} relaxed on the learned "
               f"energy of {stage1_dir})")
      t0 = time.perf_counter()
      write_relaxed_targets(model, source, dest, self.splits, fingerprint=fingerprint, log=self.log,
                            progress_for=lambda split: eval_run.Progress(
                                f"relaxing {split}", enabled=self.show_progress))
      self._timing(f"relaxed targets {dest.name}", time.perf_counter() - t0)
    return str(dest)

  def run_dir(self, seed: int, name: str) -> Path:
    return self.workdir / "runs" / f"seed{seed}" / name

  def _train(self, name: str, config: dict[str, Any], workdir: Path) -> None:
    steps = config["train"]["steps"]
    done = latest_step(workdir)
    if done is not None and done >= steps:
      self.log(f"{name}: finished (step {done}), skipped")
      return
    self.log(f"{name}: training {f'from step {done} ' if done else ''}to step {steps}")
    t0 = time.perf_counter()
    summary = train_and_evaluate(config, workdir)
    if summary["step"] < steps:
      how = "interrupted (Ctrl-C)" if summary.get("interrupted") else "preempted (SIGTERM)"
      raise ReproduceStopped(f"{name} {how} at step {summary['step']} of {steps} (saved in {workdir}); "
                             "run the same command again to resume", bool(summary.get("interrupted")))
    self._timing(name, time.perf_counter() - t0, step=summary["step"],
                 compile_s=round(summary["compile_s"], 1))

  def _timing(self, what: str, wall_s: float, **extra) -> None:
    entry = {"what": what, "wall_s": round(wall_s, 1), **extra}
    self.timings.append(entry)
    with open(self.workdir / "log.jsonl", "a") as f:
      f.write(json.dumps(entry) + "\n")

  def train_seed(self, seed: int) -> None:
    rc = self.rc
    if rc.stage1_workdir:
      stage1_dir = Path(rc.stage1_workdir)
      if latest_step(stage1_dir) is None:
        raise ReproduceError(f"reproduce.stage1_workdir: {stage1_dir} holds no checkpoint")
    else:
      stage1_dir = self.run_dir(seed, "stage1")
      self._train(f"seed{seed}/stage1", run_config(
          self.stage1, seed=seed, force_data=rc.stage1_force_data, consistency=False,
          data_path=self._data_path(rc.stage1_force_data), force_weight=rc.force_weight),
          stage1_dir)
    stage1_step = latest_step(stage1_dir)
    for arm in rc.arms:
      consistency, force_data = ARMS[arm]
      workdir = self.run_dir(seed, arm)
      done = latest_step(workdir)
      if done is not None and _init_step(workdir, done) not in (None, stage1_step):
        raise ReproduceError(f"{workdir}: initialised from stage-1 step {_init_step(workdir, done)}, "
                             f"but {stage1_dir} is at step {stage1_step}; use a new workdir")
      self._train(f"seed{seed}/{arm}", run_config(
          self.stage2, seed=seed, force_data=force_data, consistency=consistency,
          data_path=self._stage2_data_path(force_data, stage1_dir), force_weight=rc.force_weight,
          init_from=str(stage1_dir)), workdir)

  # --------------------------------------------------------------------------------- evaluation
  def records(self):
    where = f"{self.data} split {self.rc.split!r}"
    return eval_run.evaluation_records(eval_run.open_split(self.data, self.rc.split), where=where,
                                       max_molecules=self.rc.max_molecules)

  def _cached(self, path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    stored = _read_json(path)
    return stored if stored is not None and stored["key"] == key else None

  def baselines(self, records) -> dict[str, eval_run.Evaluation]:
    settings = self.rc.eval_settings()
    out = {}
    for name in eval_run.BASELINES:
      path = self.workdir / "evals" / f"baseline_{name}.json"
      key = {"settings": dataclasses.asdict(settings), "mol_ids": [r.mol_id for r in records]}
      stored = self._cached(path, key)
      if stored is None:
        self.log(f"baseline {name}: evaluating {len(records)} molecules")
        t0 = time.perf_counter()
        evaluation = eval_run.evaluate_baseline(records, name, settings,
                                                show_progress=self.show_progress)
        _write_json(path, {"key": key, "evaluation": evaluation.to_json()})
        self._timing(f"baseline {name}", time.perf_counter() - t0)
      else:
        evaluation = eval_run.Evaluation.from_json(stored["evaluation"])
      out[name] = evaluation
    return out

  def evaluate_arm(self, seed: int, arm: str, records) -> tuple[dict[str, eval_run.Evaluation], dict]:
    """({mode: Evaluation}, pooled force diagnostic) of one arm's final checkpoint."""
    workdir = self.run_dir(seed, arm)
    step = latest_step(workdir)
    settings = dataclasses.asdict(self.rc.eval_settings())
    mol_ids = [r.mol_id for r in records]
    model = None
    out = {}
    for mode in self.rc.modes:
      relax = mode == RELAX_MODE
      if relax:
        sampling = self.rc.relax_settings()
      else:  # resolved (level, t*): a cached evaluation is reused only for the same settings
        model = model or TrainedModel.load(workdir)
        sampling = model.resolve(self.rc.sampling(mode))
      path = self.workdir / "evals" / f"seed{seed}" / arm / f"{mode}.json"
      key = {"step": step, "sampling": dataclasses.asdict(sampling), "settings": settings,
             "mol_ids": mol_ids}
      if relax:  # a function of the energy model alone: arms that share it share the evaluation
        model = model or TrainedModel.load(workdir)
        fingerprint = energy_model_fingerprint(model.params)
        path = self.workdir / "evals" / f"relax_{fingerprint[:16]}.json"
        key = dict(key, step=None, energy_model=fingerprint)
      else:
        key["sampler_revision"] = SAMPLER_REVISION
      stored = self._cached(path, key)
      if stored is not None:
        out[mode] = eval_run.Evaluation.from_json(stored["evaluation"])
        continue
      model = model or TrainedModel.load(workdir)
      self.log(f"seed{seed}/{arm}: evaluating {mode} on {len(records)} molecules")
      t0 = time.perf_counter()
      if relax:
        out[mode], seconds = eval_run.evaluate_relax_baseline(model, records, self.rc.eval_settings(), sampling,
                                                              show_progress=self.show_progress)
        self._timing(f"relax seed{seed}/{arm} (relaxation alone)", seconds)
      else:
        out[mode] = eval_run.evaluate_model(model, records, sampling, self.rc.eval_settings(),
                                            show_progress=self.show_progress)
      _write_json(path, {"key": key, "evaluation": out[mode].to_json()})
      self._timing(f"evaluate seed{seed}/{arm}/{mode}", time.perf_counter() - t0)
    path = self.workdir / "evals" / f"seed{seed}" / arm / "force_diagnostic.json"
    key = {"step": step, "mol_ids": mol_ids}
    stored = self._cached(path, key)
    if stored is None:
      model = model or TrainedModel.load(workdir)
      diagnostic = eval_run.force_diagnostic(model, records)
      stored = {"key": key, "diagnostic": None if diagnostic is None else diagnostic.to_json()}
      _write_json(path, stored)
    return out, stored["diagnostic"]

  # ------------------------------------------------------------------------------------- report
  def run(self, meta: dict[str, Any] | None = None) -> list[Path]:
    """Trains, evaluates and writes the report; returns the paths written to results/."""
    self.workdir.mkdir(parents=True, exist_ok=True)
    _write_json(self.workdir / "reproduce_config.json",
                {"stage1": _plain(self.stage1), "stage2": _plain(self.stage2),
                 "reproduce": dataclasses.asdict(self.rc)})
    for seed in range(self.rc.seeds):
      self.train_seed(seed)
    records = self.records()
    baselines = self.baselines(records)
    arms: dict[str, dict[str, dict[str, dict[str, list[float]]]]] = {}
    diagnostics: dict[str, list[dict]] = {}
    for seed in range(self.rc.seeds):
      for arm in self.rc.arms:
        evaluations, diagnostic = self.evaluate_arm(seed, arm, records)
        arms.setdefault(arm, {})[str(seed)] = {m: e.metrics for m, e in evaluations.items()}
        if diagnostic is not None:
          diagnostics.setdefault(arm, []).append(diagnostic)
    results = report.Results(
        mol_ids=[r.mol_id for r in records], arms=arms,
        baselines={name: e.metrics for name, e in baselines.items()},
        meta=self._meta(meta or {}, diagnostics)).validate()
    out = self.workdir / "results"
    written = report.write_report(results, out, metrics=REPORT_METRICS, reference_arm=self.rc.reference_arm)
    results.save(out / "results.json")
    return written + [out / "results.json"]

  def _meta(self, meta: dict[str, Any], diagnostics: dict[str, list[dict]]) -> dict[str, Any]:
    rc = self.rc
    s1, s2 = Config.from_config_dict(self.stage1), Config.from_config_dict(self.stage2)
    ddim, refine = rc.sampling("ddim"), rc.sampling("refine")
    out = dict(eval_run.provenance())
    out.update(meta)
    out.update({
        "dataset": f"{Path(self.data).resolve()} (split {rc.split})",
        "seeds": rc.seeds,
        "training": ((f"stage 1: the existing run {rc.stage1_workdir}, shared by every seed"
                      if rc.stage1_workdir else
                      f"stage 1 {s1.train.steps} steps (force data: {rc.stage1_force_data})")
                     + f"; every arm {s2.train.steps} stage-2 steps from it"),
        "force data": (f"force loss (weight {rc.force_weight}) + off-equilibrium records; without: "
                       "equilibrium records only, no force labels"),
        "sampling": (f"K={rc.samples} per molecule; ddim {ddim.steps} steps from t_start "
                     f"{ddim.t_start}, eta {ddim.eta}, noise scale {ddim.noise_scale}"
                     + (f", each the medoid of {ddim.candidates} samples" if ddim.candidates > 1 else "")
                     + f"; refine {refine.steps} steps from t_star "
                     f"{refine.t_star or 'the level trained for'} "
                     f"({'noised' if refine.noise else 'unnoised'}), eta {refine.eta}; seed {rc.eval_seed}"),
        "accurate level": rc.level,
    })
    if RELAX_MODE in rc.modes:
      out["relax"] = (f"mode relax: the cheap structure relaxed on each arm's learned energy ("
                      f"{rc.relax_settings().method}, fmax {rc.relax_fmax} eV/Å, consist.relax)")
    if diagnostics:
      cells = [f"{arm} {np.mean([d['rmse'] for d in ds]):.4g}" for arm, ds in diagnostics.items()]
      rms = np.mean([d["rms_accurate"] for ds in diagnostics.values() for d in ds])
      out["energy-head force RMSE at the cheap structures (eV/Å, mean over seeds)"] = (
          ", ".join(cells) + f"; RMS of the accurate forces there {rms:.4g}")
    return out

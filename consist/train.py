"""`train_and_evaluate(config, workdir)`: one training stage of a run, resumable, multi-host.

Two-stage schedule (BRIEF section 3): a stage-1 run trains the multi-task terms (the consistency
weights of `config.loss` are set to 0); a stage-2 run (`train.stage=2`) trains `config.loss` as
given, normally starting from another workdir's stage-1 checkpoint (`train.init_from`). The
compute-matched baseline is the same stage-2 config with `loss.optimality_weight=0` and
`loss.score_weight=0`: multi-task training continued for the same number of steps on the same data.

Everything that can be wrong with the input is checked before the first step: unknown config keys,
a missing split or label a configured loss needs, a molecule larger than the batch budget, and a
checkpoint in the workdir written by an incompatible model.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import ase.data
import jax
import jax.numpy as jnp
import numpy as np

from consist import checkpoint, parallel
from consist.config import Config, ConfigError
from consist.data.batching import empty_batch
from consist.data.budgets import Buckets, cutoff_edge_counts, full_graph_edge_counts, make_buckets
from consist.data.pipeline import InputPipeline, to_global
from consist.data.reference import EnergyReference
from consist.data.store import Dataset, Store, open_dataset
from consist.losses.optimality import RELAXED_TAG
from consist.losses.total import LossConfig, total_loss
from consist.models import model as model_lib
from consist.models.statistics import resolve_energy_config
from consist.metrics_log import MetricsLogger
from consist.state import TrainState, create_state, make_optimizer


class NonFiniteError(FloatingPointError):
  """The loss or a gradient became NaN/inf (train.on_nonfinite="stop")."""


class DatasetLabelError(ValueError):
  """A configured loss needs a label the dataset split does not have."""


def stage_loss_config(cfg: Config) -> LossConfig:
  """The loss of this stage: stage 1 switches the consistency terms off."""
  if cfg.train.stage == 1:
    return dataclasses.replace(cfg.loss, optimality_weight=0.0, score_weight=0.0)
  return cfg.loss


def required_labels(loss: LossConfig) -> dict[str, str]:
  """{store label name: loss term needing it} for every enabled term."""
  need = {}
  if loss.energy_weight > 0:
    need["energy"] = "loss.energy_weight"
  if loss.forces_weight > 0:
    need["forces"] = "loss.forces_weight"
  for name in ("denoise_weight", "optimality_weight"):
    if getattr(loss, name) > 0:
      need.setdefault("is_equilibrium", f"loss.{name}")
  if loss.optimality_weight > 0 and loss.optimality_form == "relaxed":
    need["ref_positions"] = "loss.optimality_form='relaxed'"
  return need


def check_labels(store: Store, split: str, path: str, loss: LossConfig) -> None:
  """Raises DatasetLabelError if the split has no record with a label an enabled loss term needs."""
  counts = store.summary()["labels"]
  for label, term in required_labels(loss).items():
    if counts.get(label, 0) == 0:
      raise DatasetLabelError(
          f"{path}: split {split!r} has no '{label}' labels ({len(store)} records), but {term} > 0 "
          f"needs them; set {term}=0 or use a dataset with {label} labels")
  if "ref_positions" in required_labels(loss):
    tags = store.summary()["fidelity_tags"]["ref"]
    if set(tags) != {RELAXED_TAG}:
      raise DatasetLabelError(
          f"{path}: split {split!r} has reference structures at {sorted(tags)}, but "
          f"loss.optimality_form='relaxed' trains toward minima of the learned energy "
          f"({RELAXED_TAG!r}); write them with `python -m launch.relaxed_targets`")


def _open_split(dataset: Dataset, split: str, path: str, key: str = "data") -> Store:
  if split not in dataset.splits:
    hint = ""
    if key == "data.val_split":
      hint = ("; write train/val/test with `python -m launch.convert ... --split_fractions 0.9,0.05,0.05`, "
              "or train without validation: data.val_split=''")
    raise ConfigError(f"{key}: dataset {path} has no split {split!r} (splits: {sorted(dataset.splits)}){hint}")
  return dataset[split]


def _edge_counts(store: Store, cutoff: float | None) -> np.ndarray:
  return full_graph_edge_counts(store.n_atoms) if cutoff is None else cutoff_edge_counts(store, cutoff)


def make_run_buckets(cfg: Config, stores: list[Store], edges: list[np.ndarray]) -> Buckets:
  """Shape buckets from the sizes of all stores used; capped by `data.max_nodes` if set."""
  n_atoms = np.concatenate([np.asarray(s.n_atoms) for s in stores])
  buckets = make_buckets(n_atoms, cfg.data.graphs_per_device, n_edges=np.concatenate(edges),
                         n_buckets=cfg.data.num_buckets, seed=cfg.data.seed)
  if cfg.data.max_nodes:
    capped = sorted({dataclasses.replace(b, n_node=min(b.n_node, cfg.data.max_nodes)) for b in buckets.budgets})
    buckets = Buckets(tuple(capped))
  return buckets


def fit_reference(store: Store, fidelities: list[str], n_records: int) -> EnergyReference:
  """Per-element reference energies from an evenly spaced sample of at most `n_records` records."""
  idx = np.unique(np.linspace(0, len(store) - 1, min(n_records, len(store))).astype(np.int64))
  reference = EnergyReference.fit((store[int(i)] for i in idx), fidelities)
  fitted = np.isfinite(reference.element_energy).any(axis=0)
  present = {ase.data.atomic_numbers[symbol] for symbol in store.summary()["elements"]}
  missing = sorted(present - set(np.flatnonzero(fitted).tolist()))
  if missing:
    raise ValueError(f"{store.path}: the energy reference fitted on {len(idx)} sampled records has no energy "
                     f"for element(s) Z={missing} present in the split; raise data.reference_records")
  return reference


def init_meta(workdir: str, fidelities: list[str]) -> dict:
  """The checkpoint meta of the run a stage-2 run starts from (its energy reference and model
  statistics define the function its params compute: refitting would shift the targets)."""
  with checkpoint.Checkpointer(workdir, read_only=True) as ckpt:
    step = ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f"{ckpt.directory}: no checkpoint to initialise from")
    meta = ckpt.meta(step)
  if list(meta["fidelities"]) != list(fidelities):
    raise ConfigError(f"train.init_from: {workdir} was trained on fidelities {meta['fidelities']}, "
                      f"this dataset has {fidelities}")
  return meta


STATISTICS_RECORDS = 2000


def with_energy_statistics(cfg: Config, train_store: Store, reference: EnergyReference,
                           stored_config: dict | None) -> Config:
  """`cfg` with the energy model's data statistics (`consist.models.statistics`): those of the run
  it continues or starts from (`stored_config`), else computed on an evenly spaced sample of at most
  STATISTICS_RECORDS training records."""
  energy = cfg.model.energy
  if stored_config is not None:
    stored = stored_config["model"]["energy"]
    energy = dataclasses.replace(energy, **{k: stored[k] for k in ("avg_num_neighbors", "scale", "shift")})
  else:
    n = min(STATISTICS_RECORDS, len(train_store))
    idx = np.unique(np.linspace(0, len(train_store) - 1, n).astype(np.int64))
    energy = resolve_energy_config(energy, [train_store[int(i)] for i in idx], reference)
  return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, energy=energy))


@dataclasses.dataclass(frozen=True)
class Task:
  """What the generic train loop trains: pure functions over params (see `consist.parallel`)."""

  init_fn: Callable[[jax.Array, Any], Any]
  loss_fn: parallel.LossFn
  metrics_fn: parallel.MetricsFn


def make_task(cfg: Config, fidelities: list[str]) -> Task:
  """The consist model and this stage's weighted loss."""
  model = model_lib.model_for_dataset(cfg.model, fidelities)
  loss_cfg = stage_loss_config(cfg)
  schedule = cfg.diffusion
  loss_fn = lambda params, batch, rng: total_loss(model, schedule, loss_cfg, params, batch, rng)
  return Task(init_fn=lambda rng, batch: model_lib.init_params(model, rng, batch), loss_fn=loss_fn,
              metrics_fn=lambda params, batch, rng: loss_fn(params, batch, rng)[1])


def _abstract(create: Callable[[], TrainState], mesh) -> TrainState:
  sharding = parallel.replicated(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), jax.eval_shape(create))


def _real_counts(graphs) -> tuple[int, int, int]:
  """(real graphs, real atoms, node slots) of a host batch."""
  return int(np.sum(graphs.graph_mask)), int(np.sum(graphs.node_mask)), int(np.size(graphs.node_mask))


def train_and_evaluate(config: Mapping[str, Any] | Config, workdir: str | Path) -> dict[str, Any]:
  """Trains one stage in `workdir` (resuming from its latest checkpoint); returns a summary dict.

  Returns:
    {"step", "preempted", "nonfinite_steps", "train": last logged train metrics, "val": last
    validation metrics, "compiles": train-step executables (one per shape bucket seen), "buckets",
    "wall_s", "loop_s", "compile_s", "eval_s", and the steady-state throughput over the steps
    that did not compile (checkpoint time included): "structures_per_s", "atoms_per_s" (all
    processes), "padding_efficiency" (real atoms / padded node slots).
  """
  t_start = time.perf_counter()
  cfg = Config.from_config_dict(config)
  workdir = Path(workdir)
  data_path = str(Path(cfg.data.path).resolve())
  dataset = open_dataset(cfg.data.path)
  train_store = _open_split(dataset, cfg.data.train_split, data_path, "data.train_split")
  check_labels(train_store, cfg.data.train_split, data_path, stage_loss_config(cfg))
  val_store = None
  if cfg.data.val_split and cfg.train.eval_every:
    val_store = _open_split(dataset, cfg.data.val_split, data_path, "data.val_split")

  with checkpoint.Checkpointer(workdir, keep=cfg.train.keep) as ckpt:
    return _setup_and_run(cfg, workdir, ckpt, dataset, train_store, val_store, data_path, t_start)


def _setup_and_run(cfg: Config, workdir: Path, ckpt: checkpoint.Checkpointer, dataset: Dataset,
                   train_store: Store, val_store: Store | None, data_path: str, t_start: float) -> dict[str, Any]:
  """Data layout, model, state (fresh, resumed or initialised from another run), then the loop."""
  fidelities = list(dataset.fidelities)
  latest = ckpt.latest_step()
  stored_meta = ckpt.meta(latest) if latest is not None else None
  stores = [train_store] + ([val_store] if val_store is not None else [])
  edges = [_edge_counts(s, cfg.data.cutoff) for s in stores]
  if stored_meta is not None:  # resume with exactly the data layout of the checkpointed run
    buckets = Buckets.from_json(stored_meta["buckets"])
    reference = EnergyReference.from_json(stored_meta["energy_reference"])
    stored_config = stored_meta["config"]
  else:
    buckets = make_run_buckets(cfg, stores, edges)
    if cfg.train.init_from:  # the energy model learned residuals to the initialising run's reference
      source = init_meta(cfg.train.init_from, fidelities)
      reference, stored_config = EnergyReference.from_json(source["energy_reference"]), source["config"]
    else:
      reference, stored_config = fit_reference(train_store, fidelities, cfg.data.reference_records), None
  cfg = with_energy_statistics(cfg, train_store, reference, stored_config)
  pipe_kw = dict(fidelities=fidelities, energy_reference=reference, cutoff=cfg.data.cutoff, seed=cfg.data.seed)
  train_pipe = InputPipeline(train_store, buckets, n_edges=edges[0], **pipe_kw)  # checks molecule sizes
  val_pipe = InputPipeline(val_store, buckets, n_edges=edges[1], **pipe_kw) if val_store is not None else None

  task = make_task(cfg, fidelities)
  mesh = parallel.make_mesh()
  tx, schedule = make_optimizer(cfg.optim, cfg.train.steps)
  example = empty_batch(buckets.budgets[0])
  create = lambda: create_state(task.init_fn, tx, cfg.seed, example)
  abstract = _abstract(create, mesh)
  meta = {"config": cfg.to_dict(), "buckets": buckets.to_json(), "energy_reference": reference.to_json(),
          "fidelities": fidelities, "dataset": data_path,
          # Charges / multiplicities the model saw: predict refuses others (consist.predict.molecules).
          "coverage": train_store.coverage()}
  if latest is not None:
    state, data_state, _ = ckpt.restore(latest, abstract)
    if "init_from" in stored_meta:
      meta["init_from"] = stored_meta["init_from"]
  else:
    state, data_state = parallel.init_state_sharded(create, mesh), None
    if cfg.train.init_from:
      with_opt = cfg.train.init_mode == "params+opt"
      if cfg.train.init_mode == "energy_model":
        loaded, from_step = checkpoint.load_init_subtrees(cfg.train.init_from, abstract.params,
                                                          ("energy_model",))
        params, opt_state = state.params | loaded, None
      elif not with_opt and model_lib.LEVEL_INCREMENT in abstract.params and (
          model_lib.LEVEL_INCREMENT not in checkpoint.stored_param_subtrees(cfg.train.init_from)):
        # A run without level increments (e.g. a stage 1): its parameters, the increments at 0.
        names = tuple(k for k in abstract.params if k != model_lib.LEVEL_INCREMENT)
        loaded, from_step = checkpoint.load_init_subtrees(cfg.train.init_from, abstract.params, names)
        params, opt_state = state.params | loaded, None
      else:
        params, opt_state, from_step = checkpoint.load_init(cfg.train.init_from, abstract,
                                                            with_opt=with_opt)
      # The EMA starts at the initial params, in buffers of its own (the step donates both).
      state = state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params),
                            opt_state=opt_state if with_opt else state.opt_state)
      meta["init_from"] = {"workdir": str(Path(cfg.train.init_from).resolve()), "step": from_step,
                           "mode": cfg.train.init_mode}
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(meta["config"], indent=2))
    (workdir / "energy_reference.json").write_text(json.dumps(reference.to_json()))

  loop = _Loop(cfg, workdir, mesh, task, tx, schedule, ckpt, meta, train_pipe, val_pipe,
               start_step=int(jax.device_get(state.step)))
  loop.resumed = latest is not None
  try:
    return loop.run(state, data_state, t_start)
  finally:
    loop.logger.close()


class _Loop:
  """The step loop: dispatch step t, then fetch and check step t-1's metrics."""

  def __init__(self, cfg: Config, workdir: Path, mesh, task: Task, tx, schedule, ckpt: checkpoint.Checkpointer,
               meta: dict, train_pipe: InputPipeline, val_pipe: InputPipeline | None, start_step: int):
    self.cfg, self.mesh, self.ckpt, self.meta = cfg, mesh, ckpt, meta
    self.workdir = workdir
    self.resumed = False
    self.interrupted = False  # Ctrl-C (SIGINT): saved and stopped like a SIGTERM
    self.train_pipe, self.val_pipe = train_pipe, val_pipe
    self.train_step = parallel.make_train_step(task.loss_fn, tx, schedule, mesh, cfg.optim.ema_decay)
    self.eval_step = parallel.make_eval_step(task.metrics_fn, mesh)
    self.logger = MetricsLogger(workdir, total_steps=cfg.train.steps, start_step=start_step)
    self.last_train: dict[str, float] = {}
    self.last_val: dict[str, float] = {}
    self.skipped = 0
    self.eval_s = 0.0

  def _check(self, step: int, metrics: dict) -> dict[str, float]:
    """Host side of step `step`'s metrics: stop or count on non-finite, log."""
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not values.pop("finite"):
      term = parallel.nonfinite_term_name(values)
      if self.cfg.train.on_nonfinite == "stop":
        raise NonFiniteError(f"step {step}: non-finite '{term}' (loss {values['loss']}); the parameters of "
                             f"this step were not applied; set train.on_nonfinite='skip' to skip such steps")
      self.skipped += 1
      self.logger.message(f"step {step}: non-finite '{term}': update skipped ({self.skipped} so far)")
    values.pop("nonfinite_term")
    return values

  def _evaluate(self, state: TrainState, step: int) -> None:
    t0 = time.perf_counter()
    sums: dict[str, float] = {}
    total = 0.0
    rng = jax.device_put(np.asarray(jax.random.key_data(jax.random.key(self.cfg.seed + 1))),
                         parallel.replicated(self.mesh))
    for i, host_batch in enumerate(self.val_pipe.eval_iterator()):
      if self.cfg.train.eval_batches and i >= self.cfg.train.eval_batches:
        break
      metrics, count = self.eval_step(state.ema_params, to_global(host_batch.graphs, self.mesh), rng)
      count = float(count)
      for k, v in jax.device_get(metrics).items():
        sums[k] = sums.get(k, 0.0) + float(v) * count
      total += count
    self.last_val = {k: v / max(total, 1.0) for k, v in sums.items()}
    self.logger.write(self.cfg.data.val_split, step, self.last_val)
    self.eval_s += time.perf_counter() - t0

  def run(self, state: TrainState, data_state: dict | None, t_start: float) -> dict[str, Any]:
    cfg = self.cfg.train
    step = int(jax.device_get(state.step))
    it = self.train_pipe.train_iterator(data_state)
    self.ckpt.install_sigterm_handler()
    if self.resumed and step >= cfg.steps:
      self.logger.message(f"the run in {self.workdir} is already complete (step {step} of {cfg.steps}); nothing "
                          "to do: raise --config.train.steps to train on, or give a new --workdir")
    elif self.resumed:
      self.logger.message(f"resuming from the checkpoint of step {step} in {self.workdir}")
    if step < cfg.steps:
      self.logger.message(f"training stage {cfg.stage} from step {step} to {cfg.steps} on {jax.device_count()} "
                          f"devices ({jax.process_count()} processes), buckets {self.train_pipe.buckets.to_json()}")
    installed, previous_sigint = self._install_sigint_handler()
    try:
      return self._run(state, it, step, t_start)
    finally:
      if installed:
        signal.signal(signal.SIGINT, signal.default_int_handler if previous_sigint is None else previous_sigint)

  def _install_sigint_handler(self):
    """Single process, main thread: the first Ctrl-C stops the run like a SIGTERM (checkpoint, then
    return); a second one interrupts at once. Returns (installed, the previous handler)."""
    if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
      return False, None

    def handler(signum, frame):
      del signum, frame
      self.interrupted = True
      signal.signal(signal.SIGINT, signal.default_int_handler)

    return True, signal.signal(signal.SIGINT, handler)

  def _run(self, state: TrainState, it, step: int, t_start: float) -> dict[str, Any]:
    cfg = self.cfg.train
    pending = None
    preempted = False
    graphs = atoms = slots = 0  # of steps that did not compile (steady-state throughput)
    compile_s = 0.0
    t_loop = time.perf_counter()
    while step < cfg.steps and not preempted:
      host_batch = next(it)
      n_exec, t_call = self.train_step.traces(), time.perf_counter()
      state, metrics = self.train_step(state, to_global(host_batch.graphs, self.mesh))
      step += 1
      if self.train_step.traces() > n_exec:  # this call traced and compiled a new bucket
        compile_s += time.perf_counter() - t_call
      else:
        g, a, s = _real_counts(host_batch.graphs)
        graphs, atoms, slots = graphs + g, atoms + a, slots + s
      if pending is not None:
        self._handle(*pending)
      pending = (step, metrics)
      preempted = self.ckpt.preempted(step) or self.interrupted
      if preempted or step % cfg.ckpt_every == 0 or step == cfg.steps:
        self._handle(*pending)
        pending = None
        self.ckpt.save(state, data_state=it.state, meta=self.meta)
      if self.val_pipe is not None and (step % cfg.eval_every == 0 or step == cfg.steps) and not preempted:
        self._evaluate(state, step)
    if pending is not None:
      self._handle(*pending)
    jax.block_until_ready(state)
    self.ckpt.wait()
    wall = time.perf_counter() - t_loop
    steady = wall - compile_s - self.eval_s
    if self.interrupted:
      self.logger.message(f"interrupted (Ctrl-C): saved the checkpoint of step {step} in {self.workdir}; run "
                          "the same command again to resume")
    elif preempted:
      self.logger.message(f"preempted (SIGTERM): saved the checkpoint of step {step}; exiting cleanly")
    n_proc = jax.process_count()
    return {"step": step, "preempted": preempted and not self.interrupted, "interrupted": self.interrupted,
            "nonfinite_steps": int(jax.device_get(state.nonfinite_steps)),
            "train": self.last_train, "val": self.last_val, "compiles": self.train_step.traces(),
            "buckets": len(self.train_pipe.buckets.budgets),
            "wall_s": time.perf_counter() - t_start, "loop_s": wall, "compile_s": compile_s,
            "eval_s": self.eval_s, "structures_per_s": graphs * n_proc / steady if steady > 0 else 0.0,
            "atoms_per_s": atoms * n_proc / steady if steady > 0 else 0.0,
            "padding_efficiency": atoms / max(slots, 1)}

  def _handle(self, step: int, metrics: dict) -> None:
    values = self._check(step, metrics)
    if step % self.cfg.train.log_every == 0 or step == self.cfg.train.steps:
      self.last_train = values
      self.logger.write("train", step, values)

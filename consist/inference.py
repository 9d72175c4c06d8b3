"""A trained model loaded from a run's workdir: energies, forces and 3D structures for records.

Used by `launch.evaluate`, `launch.predict` and `consist.calculator`. Inference runs on one device
and goes through the run's own shape buckets (stored with every checkpoint), so molecules of a new
size reuse a compiled bucket instead of recompiling; a molecule larger than every bucket is an error
naming it. Energies are returned as totals in eV: the model's energy plus the run's fitted float64
per-element reference (`consist.data.reference`). Loading restores the model parameters alone (the
EMA ones where the run keeps them; `checkpoint.restore_model_params`): no optimizer, no trainer.

`TrainedModel.relax` relaxes structures on the learned energy with `consist.relax.StreamRelaxer`
(BFGS from Lindh's model Hessian by default; FIRE, L-BFGS): RELAX_GRAPHS molecules per batch,
refilled each time RELAX_REFILL_AT of them have converged, on a radius graph at the energy model's
cutoff plus RELAX_SKIN, one compilation per stream shape.

Sampling modes (BRIEF section 2):
  denoise  one-step x0 prediction from the prior at `t_start` (default 1);
  ddim     `steps` DDIM steps from the prior at `t_start`; by default ancestral (eta = 1: the
           noise re-injected at each step corrects early errors that deterministic DDIM keeps), 100
           steps at noise scale 0.5, each structure the medoid of 16 samples.
           Asked for a level l >= 1, which consistency trains only at its `t_star`, the trajectory
           runs at level 0 (trained at every t) and its sample is then refined at level l, as
           refine mode does (one deterministic step from it at `t_star`). `noise_scale` < 1 lowers
           the sampler's temperature; `candidates` C > 1 returns, for each structure, the medoid
           of C samples (`consist.consensus`);
  refine   the record's own positions (e.g. an MMFF structure) at `t_star`, then `steps` DDIM
           steps to 0: noised there (SDEdit, `noise=True`) or taken unnoised (deterministic; with
           the "edm" parameterisation the identity dominates at small t_star); `steps=1` is one
           x0 prediction from the given structure.

The structure level asked for (`level`): None = the highest level the model was trained for
(`TrainedModel.trained_level`: 1, the accurate level, once consistency has moved its own
parameters; an untrained level 1 is exactly level 0, so a multi-task model is asked for level 0). Refine's `t_star`:
None = the time the level was trained to refine from (`TrainedModel.refine_t_star`): LEVEL0_T_STAR
for level 0, which denoising trains to give the cheap structure back; for level l >= 1 the start of
the run's `optimality_t_range`, where consistency trained it.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from consist import checkpoint, consensus, diffusion, relax
from consist.config import Config
from consist.data.batching import empty_batch
from consist.data.budgets import Buckets
from consist.data.bundled import PRETRAINED_MODEL
from consist.data.pipeline import InputPipeline
from consist.data.record import MoleculeRecord
from consist.data.reference import EnergyReference
from consist.models import model as model_lib
from consist.types import GraphBatch

MODES = ("denoise", "ddim", "refine")
# Relaxation: molecules per batch, the Verlet skin (Å) of its radius graph, and how many molecules
# finish before the loop returns to the host to refill (each return costs ~20 ms, about half an
# iteration, on the CPU). Measured choices: docs/DEVLOG.md, sessions 5 and 9.
RELAX_GRAPHS = 24
RELAX_SKIN = 1.0
RELAX_REFILL_AT = 6
# Refine: one deterministic x0 prediction from the unnoised input (with the "edm" parameterisation
# the identity up to an O(s) correction). Level 0 at t* = 0.005, chosen on the val split: a 2,000-step
# multi-task model gives the MMFF94 structures back with a GFN2-xTB gap 0.98x the input's, 1.09x at
# t* = 0.01, 1.2-1.6x at 0.02 (docs/DEVLOG.md, session 7).
# De novo DDIM: ancestral (eta 1; deterministic 10-step DDIM made 15% valid molecules, session 10),
# at noise scale 0.5, each structure the medoid of 16 samples of 100 steps. 60 test molecules,
# bundled model: heavy-atom RMSD 0.64 Å, bond MAE 0.020 Å, 100% valid, against 0.80 Å, 0.030 Å, 98%
# for one sample of 200 steps at noise scale 1 (the default until session 13), at 8x its network
# calls (docs/DEVLOG.md, session 13). Refine stays deterministic.
DEFAULT_STEPS = {"denoise": 1, "ddim": 100, "refine": 1}
DEFAULT_ETA = {"denoise": 0.0, "ddim": 1.0, "refine": 0.0}
DEFAULT_NOISE_SCALE = {"denoise": 1.0, "ddim": 0.5, "refine": 1.0}
DEFAULT_CANDIDATES = {"denoise": 1, "ddim": 16, "refine": 1}
LEVEL0_T_STAR = 0.005
# Bumped whenever a setting of `Sampling` comes to mean a different computation (a cached
# evaluation keyed on the settings is then not reused): 2 = ddim at level >= 1 hands off from level 0.
SAMPLER_REVISION = 2
# progress(records done, records total), called after every batch.
Progress = Callable[[int, int], None]


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How structures are generated (see the module docstring).

  Attributes:
    mode: "denoise" | "ddim" | "refine".
    samples: K structures per molecule, drawn in one batched call.
    steps: DDIM steps (ddim, refine); 0 = the mode's default (`DEFAULT_STEPS`).
    t_start: start time of denoise / ddim from the prior.
    t_star: noise level the input structure (refine) or the level-0 sample (ddim at a level >= 1)
      is refined from; None = the level's own (`TrainedModel.refine_t_star`).
    eta: DDIM stochasticity in [0, 1] (0 = deterministic, 1 ~ ancestral); None = the mode's
      default (`DEFAULT_ETA`).
    noise_scale: the noise re-injected at each stochastic DDIM step is scaled by it, in [0, 1]
      (1 = the learned distribution; < 1 = lower temperature, toward its modes); None = the
      mode's default (`DEFAULT_NOISE_SCALE`).
    candidates: denoise / ddim: each returned structure is the consensus (`consist.consensus`, the
      medoid) of this many sampled candidates (1 = the sample itself); 0 = the mode's default
      (`DEFAULT_CANDIDATES`).
    noise: refine mode: noise the input structure to t_star (SDEdit) or not (deterministic).
    level: structure level (see the module docstring); None = the highest trained one.
    seed: sampling seed; batch b uses fold_in(key(seed), b).
  """

  mode: str = "refine"
  samples: int = 1
  steps: int = 0
  t_start: float = 1.0
  t_star: float | None = None
  eta: float | None = None
  noise_scale: float | None = None
  candidates: int = 0
  noise: bool = False
  level: int | None = None
  seed: int = 0

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"mode: must be one of {MODES}, got {self.mode!r}")
    if self.level is not None and self.level < 0:
      raise ValueError(f"level: must be >= 0, got {self.level}")
    if self.steps == 0 and self.mode in DEFAULT_STEPS:
      object.__setattr__(self, "steps", DEFAULT_STEPS[self.mode])
    if self.eta is None:
      object.__setattr__(self, "eta", DEFAULT_ETA[self.mode])
    if self.noise_scale is None:
      object.__setattr__(self, "noise_scale", DEFAULT_NOISE_SCALE[self.mode])
    if self.candidates == 0:
      object.__setattr__(self, "candidates", DEFAULT_CANDIDATES[self.mode])
    if self.samples < 1 or self.steps < 1:
      raise ValueError(f"samples and steps must be >= 1, got {self.samples}, {self.steps}")
    if not 0.0 < self.t_start <= 1.0 or (self.t_star is not None and not 0.0 < self.t_star <= 1.0):
      raise ValueError(f"t_star and t_start must lie in (0, 1], got {self.t_star}, {self.t_start}")
    if not 0.0 <= self.eta <= 1.0:
      raise ValueError(f"eta: must lie in [0, 1], got {self.eta}")
    if not 0.0 <= self.noise_scale <= 1.0:
      raise ValueError(f"noise_scale: must lie in [0, 1], got {self.noise_scale}")
    if self.candidates < 1 or (self.candidates > 1 and self.mode == "refine"):
      raise ValueError(f"candidates: must be >= 1, and 1 in refine mode (deterministic), got "
                       f"{self.candidates} in mode {self.mode!r}")


def graph_slices(graphs: GraphBatch) -> list[slice]:
  """Node slice of each real graph of one (unstacked) batch; real graphs' nodes are contiguous."""
  n_node = np.asarray(graphs.n_node)
  real = np.asarray(graphs.graph_mask)
  offsets = np.concatenate([[0], np.cumsum(n_node)])
  return [slice(int(offsets[g]), int(offsets[g + 1])) for g in range(len(n_node)) if real[g]]


class TrainedModel:
  """Params, model, diffusion schedule and data layout of one checkpoint of a run."""

  def __init__(self, *, config: Config, params, fidelities: Sequence[str], buckets: Buckets,
               reference: EnergyReference, workdir: Path, step: int):
    self.config = config
    self.params = params
    self.fidelities = list(fidelities)
    self.buckets = buckets
    self.reference = reference
    self.workdir = workdir
    self.step = step
    self.model = model_lib.model_for_dataset(config.model, fidelities)
    self.schedule = config.diffusion
    self._energy_forces = jax.jit(functools.partial(model_lib.energy_and_forces, self.model))
    self._sample = jax.jit(self._sample_graphs, static_argnames=("sampling",))
    # The energy model ignores pairs beyond its cutoff (consist.models.mace), so relaxation may use
    # a radius graph at that cutoff (+ skin) whatever edges the run trained on.
    self._stream = relax.StreamRelaxer(functools.partial(model_lib.energy_and_forces, self.model),
                                       fidelities=self.fidelities, cutoff=config.model.energy.cutoff,
                                       skin=RELAX_SKIN, graphs=RELAX_GRAPHS, refill_at=RELAX_REFILL_AT)

  @classmethod
  def load(cls, workdir: str | Path, step: int | None = None) -> "TrainedModel":
    """Loads the latest (or `step`'s) checkpoint of a `launch.train` workdir: its model parameters
    only (the EMA ones where the run keeps them), no optimizer state.

    Raises:
      FileNotFoundError: no checkpoint there (the message names the directory).
      checkpoint.CheckpointMismatchError: the checkpoint does not fit the model its config describes.
    """
    workdir = Path(workdir)
    with checkpoint.Checkpointer(workdir, read_only=True) as ckpt:
      step = ckpt.latest_step() if step is None else step
      if step is None:
        raise FileNotFoundError(f"{ckpt.directory}: no checkpoint in this workdir")
      meta = ckpt.meta(step)
      try:
        cfg = Config.from_config_dict(meta["config"])
      except ValueError as e:
        raise checkpoint.CheckpointMismatchError(
            f"{ckpt.directory / str(step)}: the stored run config does not fit this version of consist: {e}") from e
      fidelities = meta["fidelities"]
      buckets = Buckets.from_json(meta["buckets"])
    model = model_lib.model_for_dataset(cfg.model, fidelities)
    example = empty_batch(buckets.budgets[0])
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                            jax.eval_shape(lambda: model_lib.init_params(model, jax.random.key(0), example)))
    params = checkpoint.restore_model_params(workdir, step, abstract)
    return cls(config=cfg, params=params, fidelities=fidelities, buckets=buckets,
               reference=EnergyReference.from_json(meta["energy_reference"]), workdir=workdir, step=step)

  # --- batching ---
  def _batches(self, records: Sequence[MoleculeRecord]):
    """(one-device GraphBatch as jax arrays, record indices of its real graphs) over `records`, in order."""
    pipe = InputPipeline(list(records), self.buckets, fidelities=self.fidelities, energy_reference=None,
                         cutoff=self.config.data.cutoff, process_index=0, process_count=1,
                         local_device_count=1)
    for host_batch in pipe.eval_iterator():
      graphs = jax.tree.map(lambda x: jnp.asarray(x[0]), host_batch.graphs)
      yield graphs, [int(i) for i in host_batch.record_index[0] if i >= 0]

  def _reference_energy(self, record: MoleculeRecord) -> float:
    fid = self.fidelities.index(record.label_fidelity) if record.label_fidelity in self.fidelities else 0
    return float(self.reference.energy(record.atomic_numbers, fid))

  # --- energies and forces ---
  def energy_and_forces(self, records: Sequence[MoleculeRecord],
                        progress: Progress | None = None) -> list[tuple[float, np.ndarray]]:
    """(total energy eV, forces [n, 3] eV/Å) of each record at its own positions, in input order.

    The energy is reported at the record's `label_fidelity` (its per-fidelity offset and reference),
    or at the run's first fidelity for unlabelled records.
    """
    out: list[tuple[float, np.ndarray] | None] = [None] * len(records)
    done = 0
    for graphs, indices in self._batches(records):
      energy, forces = jax.device_get(self._energy_forces(self.params, graphs))
      for g, (i, nodes) in enumerate(zip(indices, graph_slices(graphs))):
        out[i] = (float(energy[g]) + self._reference_energy(records[i]), np.asarray(forces[nodes], np.float64))
      done += len(indices)
      if progress is not None:
        progress(done, len(records))
    return out

  # --- structures ---
  @functools.cached_property
  def trained_level(self) -> int:
    """The highest structure level whose own parameters (offset, increment) training has moved
    from their zero initialisation (0 if none: such a level is exactly level 0)."""
    table = self.params.get("encoder", {}).get("level_embedding")
    moved = set()
    if table is not None:
      moved = {int(l) + 1 for l in np.flatnonzero(np.any(np.asarray(table) != 0, axis=-1))}
    for level, increment in self.params.get(model_lib.LEVEL_INCREMENT, {}).items():
      if any(np.any(np.asarray(leaf) != 0) for leaf in jax.tree.leaves(increment)):
        moved.add(int(level))
    return max(moved, default=0)

  def refine_t_star(self, level: int) -> float:
    """The noise level refine takes the input to at `level`: LEVEL0_T_STAR for level 0; for
    l >= 1 the start of the run's `loss.optimality_t_range` (where consistency trained it)."""
    return LEVEL0_T_STAR if level == 0 else float(self.config.loss.optimality_t_range[0])

  def resolve(self, sampling: Sampling) -> Sampling:
    """`sampling` with its defaults made concrete for this model: level (None -> `trained_level`)
    and t_star (None -> `refine_t_star(level)`).

    Raises:
      ValueError: a level the model does not have.
    """
    level = self.trained_level if sampling.level is None else sampling.level
    levels = self.config.model.structure_levels
    if not 0 <= level < levels:
      raise ValueError(f"structure level {level}: this model has structure levels 0..{levels - 1}")
    t_star = self.refine_t_star(level) if sampling.t_star is None else sampling.t_star
    return dataclasses.replace(sampling, level=level, t_star=t_star)

  def _sample_graphs(self, params, graphs: GraphBatch, seeds_G: jax.Array, sampling: Sampling) -> jax.Array:
    key = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(0), seeds_G)  # one per graph
    eps_fn = diffusion.model_denoiser(self.model, params, graphs, self.schedule, level=sampling.level)
    if sampling.mode == "denoise":
      sampler = lambda k: diffusion.sample_one_step(eps_fn, graphs, self.schedule, k, t_start=sampling.t_start)
    elif sampling.mode == "ddim" and sampling.level > 0:  # level 0 from the prior, then refine at the level
      eps0_fn = diffusion.model_denoiser(self.model, params, graphs, self.schedule, level=0)
      sampler = lambda k: diffusion.refine(
          eps_fn, graphs, self.schedule, k,
          diffusion.sample_ddim(eps0_fn, graphs, self.schedule, k, num_steps=sampling.steps,
                                t_start=sampling.t_start, eta=sampling.eta,
                                noise_scale=sampling.noise_scale),
          t_star=sampling.t_star, num_steps=1, noise=False)
    elif sampling.mode == "ddim":
      sampler = lambda k: diffusion.sample_ddim(eps_fn, graphs, self.schedule, k, num_steps=sampling.steps,
                                                t_start=sampling.t_start, eta=sampling.eta,
                                                noise_scale=sampling.noise_scale)
    else:
      sampler = lambda k: diffusion.refine(eps_fn, graphs, self.schedule, k, graphs.positions,
                                           t_star=sampling.t_star, num_steps=sampling.steps, eta=sampling.eta,
                                           noise_scale=sampling.noise_scale, noise=sampling.noise)
    return diffusion.sample_k(sampler, key, sampling.samples * sampling.candidates)

  def sample(self, records: Sequence[MoleculeRecord], sampling: Sampling,
             progress: Progress | None = None, seeds: Sequence[int] | None = None) -> list[np.ndarray]:
    """K structures [K, n, 3] (Å) per record, in input order. Refine starts from `record.positions`.

    Each record's noise comes from its own key, key(seeds[i]) (seeds < 2**32): its structures do
    not depend on the other records or on how they are batched. Default seeds: (sampling.seed, i).
    """
    if seeds is None:
      seeds = [(sampling.seed * 2654435761 + i) % 2**32 for i in range(len(records))]
    if len(seeds) != len(records):
      raise ValueError(f"sample: {len(seeds)} seeds for {len(records)} records")
    out: list[np.ndarray | None] = [None] * len(records)
    static = dataclasses.replace(self.resolve(sampling), seed=0)  # seeds enter as an array: no recompile per seed
    done = 0
    for graphs, indices in self._batches(records):
      graph_seeds = np.zeros(graphs.num_graphs, np.uint32)
      graph_seeds[:len(indices)] = [seeds[i] for i in indices]
      positions = np.asarray(jax.device_get(self._sample(self.params, graphs, graph_seeds, static)),
                             np.float64)
      for i, nodes in zip(indices, graph_slices(graphs)):
        out[i] = self._consensus(records[i], positions[:, nodes], static)
      done += len(indices)
      if progress is not None:
        progress(done, len(records))
    return out

  @staticmethod
  def _consensus(record: MoleculeRecord, samples: np.ndarray, sampling: Sampling) -> np.ndarray:
    """[K, n, 3]: of samples [K * C, n, 3] (C = sampling.candidates), each group of C's medoid."""
    if sampling.candidates == 1:
      return samples
    groups = samples.reshape(sampling.samples, sampling.candidates, *samples.shape[1:])
    return np.stack([g[consensus.medoid_index(record.atomic_numbers, record.bonds, g, record.charge)]
                     for g in groups])

  # --- relaxation on the learned energy ---
  def relax(self, records: Sequence[MoleculeRecord], settings: relax.RelaxSettings = relax.RelaxSettings(),
            progress: Progress | None = None) -> list["Relaxed"]:
    """Each record's positions relaxed on the learned energy (`consist.relax.StreamRelaxer`: one
    batch refilled as molecules finish, compiled once per stream shape and settings), in input
    order. Energies are totals at the record's `label_fidelity` as in `energy_and_forces`."""
    results = self._stream.relax(self.params, records, settings, progress=progress)
    return [Relaxed(positions=r.positions, energy=r.energy + self._reference_energy(record), forces=r.forces,
                    fmax=r.fmax, steps=r.steps, converged=r.converged, trajectory=r.trajectory,
                    evaluations=r.evaluations)
            for record, r in zip(records, results)]


@dataclasses.dataclass(frozen=True)
class Relaxed:
  """One molecule relaxed on the learned energy.

  Attributes:
    positions: [n, 3] Å final structure.
    energy: total energy there, eV; forces: [n, 3] eV/Å there.
    fmax: max atomic force there, eV/Å; converged: fmax < the settings' fmax.
    steps: optimiser steps the molecule moved (the step limit if it did not converge).
    trajectory: [steps + 1, n, 3] Å, start to end, when the settings ask for it.
    evaluations: energy + forces evaluations spent on it.
  """

  positions: np.ndarray
  energy: float
  forces: np.ndarray
  fmax: float
  steps: int
  converged: bool
  trajectory: np.ndarray | None = None
  evaluations: int = 0


class CheckpointError(ValueError):
  """The checkpoint cannot be used (missing, not a run's workdir, or an incompatible config)."""


def load_model(workdir: str | Path | None = None, step: int | None = None) -> TrainedModel:
  """The latest (or `step`'s) checkpoint of a `launch.train` workdir; None = the bundled
  pretrained model (models/pretrained).

  Raises:
    CheckpointError: naming the path and what is wrong.
  """
  path = Path(PRETRAINED_MODEL if workdir is None else workdir)
  if not path.exists():
    if path.resolve() == PRETRAINED_MODEL.resolve():
      raise CheckpointError(f"{path}: the bundled pretrained model is not in this checkout; rebuild it "
                            "with the commands in configs/pretrained.py, or pass a run's workdir")
    raise CheckpointError(f"{path}: no such directory")
  try:
    return TrainedModel.load(path, step)
  except (FileNotFoundError, KeyError, checkpoint.CheckpointMismatchError) as e:
    raise CheckpointError(f"{path}: cannot load a model: {e}") from e

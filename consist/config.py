"""Typed, frozen run configuration, built from an ml_collections ConfigDict at the library boundary.

`Config.from_config_dict(cd)` is the only place a ConfigDict is read: every key must name a field
(an unknown key anywhere raises `ConfigError` naming the full dotted key, e.g. `train.stpes`), values
are type-checked, and missing keys take the dataclass defaults. The rest of the code sees only these
dataclasses.

Sections: `data`, `model` (`consist.models.config.ModelConfig`; its `num_fidelities` is set from the
dataset), `diffusion` (`consist.diffusion.Schedule`), `loss` (`consist.losses.total.LossConfig`),
`optim`, `train`, and the run `seed`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

from consist.diffusion import Schedule
from consist.losses.total import LossConfig
from consist.models.config import ModelConfig


INIT_MODES = ("params", "params+opt", "energy_model")


class ConfigError(ValueError):
  """A configuration key or value is invalid. The message names the dotted key."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Input data.

  Attributes:
    path: dataset directory (written by `consist.data.store.DatasetWriter`).
    train_split: split trained on.
    val_split: split evaluated every `train.eval_every` steps ("" disables validation).
    graphs_per_device: real molecules per device sub-batch (the budget adds one padding graph).
    num_buckets: number of shape buckets (padded sizes); the step compiles once per bucket.
    cutoff: radius graph cutoff in Å, or None for all intra-molecular pairs.
    max_nodes: cap on the padded atoms per device sub-batch (device memory); 0 = from the data.
      A molecule larger than the cap is an error naming it, raised before training.
    reference_records: records (an evenly spaced sample of the train split) the per-element
      energy reference is fitted on.
    seed: shuffling seed (the data order is a function of (seed, epoch) only).
  """

  path: str = ""
  train_split: str = "train"
  val_split: str = "val"
  graphs_per_device: int = 8
  num_buckets: int = 2
  cutoff: float | None = None
  max_nodes: int = 0
  reference_records: int = 20_000
  seed: int = 0

  def check(self):
    if not self.path:
      raise ConfigError("path: no dataset path given")
    if self.graphs_per_device < 1:
      raise ConfigError(f"graphs_per_device: must be >= 1, got {self.graphs_per_device}")
    if self.num_buckets < 1:
      raise ConfigError(f"num_buckets: must be >= 1, got {self.num_buckets}")
    if self.cutoff is not None and self.cutoff <= 0:
      raise ConfigError(f"cutoff: must be positive (Å) or None, got {self.cutoff}")
    if self.max_nodes < 0 or self.reference_records < 1:
      raise ConfigError("max_nodes: must be >= 0 and reference_records >= 1")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with linear warmup + cosine decay and global-norm clipping (`consist.state.make_optimizer`).

  ema_decay: decay of the parameters' exponential moving average (`TrainState.ema_params`, used for
    validation, inference and stage-2 initialisation); 0 = no averaging.
  """

  learning_rate: float = 1e-3
  warmup_steps: int = 100
  end_lr_factor: float = 0.01
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  clip_norm: float = 10.0  # <= 0 disables clipping
  ema_decay: float = 0.99

  def check(self):
    if self.learning_rate <= 0:
      raise ConfigError(f"learning_rate: must be positive, got {self.learning_rate}")
    if self.warmup_steps < 0:
      raise ConfigError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
    if not 0.0 <= self.ema_decay < 1.0:
      raise ConfigError(f"ema_decay: must be in [0, 1), got {self.ema_decay}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The training loop.

  Attributes:
    steps: total number of updates of this run (a resumed run continues up to it).
    stage: 1 = multi-task only (the consistency weights of `loss` are set to 0); 2 = `loss` as given.
    init_from: workdir of a run whose latest checkpoint initialises this run (ignored when this
      workdir already holds a checkpoint: then the run resumes): stage 2 from its stage-1 run, or
      any stage with init_mode "energy_model" (a structure model trained on a finished energy model).
    init_mode: "params" (fresh optimizer, step 0; a run without the level increments this model
      has, e.g. a stage 1 for a stage 2 with `level_params="increment"`, starts them at zero),
      "params+opt" (also the optimizer moments; the
      step counter still restarts at 0 so the new schedule runs in full) or "energy_model" (only the
      energy model's parameters; the structure model starts fresh, e.g. with another architecture).
    log_every / ckpt_every / eval_every: intervals in steps (eval_every 0 disables validation).
    eval_batches: validation batches per evaluation (0 = the whole validation split).
    keep: number of most recent checkpoints kept.
    on_nonfinite: "stop" raises naming the step and the loss term; "skip" leaves the parameters
      unchanged for that step and counts it (`nonfinite_steps`).
  """

  steps: int = 1000
  stage: int = 1
  init_from: str = ""
  init_mode: str = "params"
  log_every: int = 10
  ckpt_every: int = 500
  eval_every: int = 500
  eval_batches: int = 0
  keep: int = 3
  on_nonfinite: str = "stop"

  def check(self):
    if self.steps < 1:
      raise ConfigError(f"steps: must be >= 1, got {self.steps}")
    if self.stage not in (1, 2):
      raise ConfigError(f"stage: must be 1 or 2, got {self.stage}")
    if self.init_from and self.stage != 2 and self.init_mode != "energy_model":
      raise ConfigError("init_from: only a stage-2 run starts from another workdir's checkpoint "
                        "(or a stage-1 run from its energy model: init_mode='energy_model')")
    if self.init_mode not in INIT_MODES:
      raise ConfigError(f"init_mode: must be one of {INIT_MODES}, got {self.init_mode!r}")
    if self.on_nonfinite not in ("stop", "skip"):
      raise ConfigError(f"on_nonfinite: must be 'stop' or 'skip', got {self.on_nonfinite!r}")
    for name in ("log_every", "ckpt_every", "keep"):
      if getattr(self, name) < 1:
        raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
    for name in ("eval_every", "eval_batches"):
      if getattr(self, name) < 0:
        raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class Config:
  """A whole run."""

  data: DataConfig
  model: ModelConfig = ModelConfig()
  diffusion: Schedule = Schedule()
  loss: LossConfig = LossConfig()
  optim: OptimConfig = OptimConfig()
  train: TrainConfig = TrainConfig()
  seed: int = 0

  def check(self):
    if self.loss.consistency_level >= self.model.structure_levels:
      raise ConfigError(f"loss.consistency_level: {self.loss.consistency_level} needs "
                        f"model.structure_levels > {self.loss.consistency_level}, got "
                        f"{self.model.structure_levels}")
    if self.loss.consistency_params == "level_increment" and (
        self.model.level_params != "increment" or self.loss.consistency_level < 1):
      raise ConfigError("loss.consistency_params: 'level_increment' needs model.level_params="
                        f"'increment' and loss.consistency_level >= 1, got "
                        f"{self.model.level_params!r} and {self.loss.consistency_level}")

  @classmethod
  def from_config_dict(cls, cd: Mapping[str, Any]) -> "Config":
    """Builds the typed config; raises ConfigError naming the dotted key on any bad key/value."""
    if isinstance(cd, Config):
      return cd
    return _build(cls, _to_dict(cd), "")

  def to_dict(self) -> dict[str, Any]:
    """JSON-able nested dict (stored with every checkpoint)."""
    return dataclasses.asdict(self)


def _to_dict(cd: Mapping[str, Any]) -> dict[str, Any]:
  if hasattr(cd, "to_dict"):
    return cd.to_dict()
  return dict(cd)


def _build(cls: type, values: Mapping[str, Any], prefix: str):
  """Instantiates dataclass `cls` from a mapping, recursing into dataclass-typed fields."""
  if not isinstance(values, Mapping):
    raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a section (mapping), got {values!r}")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  hints = typing.get_type_hints(cls)
  for key in values:
    if key not in fields:
      raise ConfigError(f"unknown config key '{prefix}{key}' (known keys of "
                        f"'{prefix.rstrip('.') or 'config'}': {', '.join(sorted(fields))})")
  kwargs = {}
  for name, f in fields.items():
    dotted = prefix + name
    if name not in values:
      no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
      if no_default and dataclasses.is_dataclass(hints[name]):
        kwargs[name] = _build(hints[name], {}, dotted + ".")
      elif no_default:
        raise ConfigError(f"missing config key '{dotted}'")
      continue
    kwargs[name] = _convert(hints[name], values[name], dotted)
  try:
    obj = cls(**kwargs)
  except (TypeError, ValueError) as e:
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from e
  check = getattr(obj, "check", None)
  if check is not None:
    try:
      check()
    except ConfigError as e:
      raise ConfigError(f"{prefix}{e}") from None
  return obj


def _convert(tp: Any, value: Any, dotted: str):
  """Checks/converts one value against a type hint."""
  origin = typing.get_origin(tp)
  if dataclasses.is_dataclass(tp):
    return _build(tp, _to_dict(value) if hasattr(value, "to_dict") else value, dotted + ".")
  if origin in (typing.Union, types.UnionType):
    options = typing.get_args(tp)
    if value is None and type(None) in options:
      return None
    errors = []
    for option in options:
      if option is type(None):
        continue
      try:
        return _convert(option, value, dotted)
      except ConfigError as e:
        errors.append(str(e))
    raise ConfigError(errors[0] if len(errors) == 1 else f"{dotted}: {value!r} matches none of {tp}")
  if origin is typing.Literal:
    if value not in typing.get_args(tp):
      raise ConfigError(f"{dotted}: must be one of {typing.get_args(tp)}, got {value!r}")
    return value
  if origin is tuple:
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{dotted}: expected a sequence, got {value!r}")
    args = typing.get_args(tp)
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(_convert(args[0], v, f"{dotted}[{i}]") for i, v in enumerate(value))
    if len(args) != len(value):
      raise ConfigError(f"{dotted}: expected {len(args)} values, got {len(value)}")
    return tuple(_convert(a, v, f"{dotted}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
  if tp is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{dotted}: expected a number, got {value!r}")
    return float(value)
  if tp is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f"{dotted}: expected an integer, got {value!r}")
    return value
  if tp in (str, bool):
    if not isinstance(value, tp):
      raise ConfigError(f"{dotted}: expected {tp.__name__}, got {value!r}")
    return value
  return value


STAGE_ARGS = ("stage1", "stage2", "baseline")


def apply_stage_arg(c, arg: str | None, where: str):
  """The `configs/*.py:ARG` convention: "" / "stage1" = multi-task, "stage2" = adds the consistency
  terms, "baseline" = stage 2 with consistency weights 0 (compute-matched multi-task baseline)."""
  if arg in (None, "", "stage1"):
    return c
  if arg not in STAGE_ARGS:
    raise ConfigError(f"{where}: unknown config argument {arg!r}; use one of {STAGE_ARGS}")
  c.train.stage = 2
  if arg == "baseline":
    c.loss.optimality_weight = 0.0
    c.loss.score_weight = 0.0
  return c

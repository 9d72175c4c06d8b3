"""Checkpoints of whole runs over orbax's CheckpointManager (V0 args API). The only module importing orbax.

One checkpoint = step directory `<workdir>/checkpoints/<step>/` with five items:
  params  StandardSave(state.params)                                    (sharded arrays)
  ema     StandardSave(state.ema_params)                                (sharded arrays)
  train   StandardSave({step, opt_state, rng, nonfinite_steps})          (sharded arrays)
  data    JsonSave(iterator state)                                       (continues with the next batch)
  meta    JsonSave({config, signature, ...})   signature = {"params": {path: [shape, dtype]}, "opt": ...}
Params and the rest are separate items so a stage-2 run or inference can take only the (EMA) params.

Restores go into an abstract, sharded target (`jax.eval_shape` of the init + shardings), so arrays come
back already placed. Before any restore the stored signature is compared with the target's: an
incompatible checkpoint raises `CheckpointMismatchError` naming the path and the first parameter whose
presence, shape or dtype differs.

Preemption: a SIGTERM sets a flag (single process); with several processes orbax's
`reached_preemption` (JAX's preemption sync point, fed by its own SIGTERM notifier) makes every
process agree on the step. The train loop polls `preempted(step)` each step, saves and exits cleanly.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from consist.state import TrainState


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the current model / optimizer. Names the path and the parameter."""


def signature(tree: Any) -> dict[str, list]:
  """{'/'-joined key path: [shape, dtype]} of every array leaf (of arrays or ShapeDtypeStructs)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = "/".join(_key_name(k) for k in path)
    out[name] = [list(leaf.shape), str(leaf.dtype)]
  return out


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def compare_signatures(stored: dict[str, list], expected: dict[str, list], where: str, what: str) -> None:
  """Raises CheckpointMismatchError on the first difference (sorted by parameter path)."""
  for name in sorted(set(stored) | set(expected)):
    if name not in stored:
      raise CheckpointMismatchError(
          f"{where}: incompatible checkpoint: {what} '{name}' {expected[name]} of this model is missing "
          f"from the checkpoint (was it written by a different model config?)")
    if name not in expected:
      raise CheckpointMismatchError(
          f"{where}: incompatible checkpoint: it holds {what} '{name}' {stored[name]} that this model "
          f"does not have (was it written by a different model config?)")
    if list(stored[name][0]) != list(expected[name][0]) or stored[name][1] != expected[name][1]:
      raise CheckpointMismatchError(
          f"{where}: incompatible checkpoint: {what} '{name}' has shape {tuple(stored[name][0])} "
          f"{stored[name][1]} in the checkpoint but {tuple(expected[name][0])} {expected[name][1]} "
          f"in this model")


def _train_part(state: TrainState) -> dict[str, Any]:
  return {"step": state.step, "opt_state": state.opt_state, "rng": state.rng,
          "nonfinite_steps": state.nonfinite_steps}


def state_signature(state: TrainState) -> dict[str, dict[str, list]]:
  return {"params": signature(state.params), "opt": signature(state.opt_state)}


class Checkpointer:
  """Saves and restores runs under `<workdir>/checkpoints`; keeps the last `keep` checkpoints."""

  def __init__(self, workdir: str | Path, *, keep: int = 3, read_only: bool = False):
    self.directory = Path(workdir).resolve() / "checkpoints"
    if read_only and not self.directory.is_dir():
      raise FileNotFoundError(f"{self.directory}: no checkpoints (is {workdir} the workdir of a run?)")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                           enable_async_checkpointing=not read_only)
    self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                       item_names=("params", "ema", "train", "data", "meta"))
    self._sigterm = False
    self._previous_handler = None

  # --- saving ---
  def save(self, state: TrainState, *, data_state: dict, meta: dict) -> int:
    """Saves (asynchronously) at `state.step`; returns that step. `meta` gets the signature added."""
    step = int(jax.device_get(state.step))
    meta = dict(meta, signature=state_signature(state))
    self._mngr.save(step, force=True, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        ema=ocp.args.StandardSave(state.ema_params),
        train=ocp.args.StandardSave(_train_part(state)),
        data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)))
    return step

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._mngr.wait_until_finished()

  # --- restoring ---
  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def meta(self, step: int) -> dict:
    return self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def check_compatible(self, step: int, abstract: TrainState, *, with_opt: bool = True) -> dict:
    """Compares the stored signature with `abstract`'s; returns the checkpoint's meta."""
    meta = self.meta(step)
    stored = meta.get("signature", {})
    where = str(self.directory / str(step))
    expected = state_signature(abstract)
    compare_signatures(stored.get("params", {}), expected["params"], where, "parameter")
    if with_opt:
      compare_signatures(stored.get("opt", {}), expected["opt"], where, "optimizer state")
    return meta

  def restore(self, step: int, abstract: TrainState) -> tuple[TrainState, dict, dict]:
    """Restores (state, data_state, meta) of `step` into the sharded `abstract` state."""
    meta = self.check_compatible(step, abstract)
    out = self._mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract.params),
        ema=ocp.args.StandardRestore(abstract.ema_params),
        train=ocp.args.StandardRestore(_train_part(abstract)),
        data=ocp.args.JsonRestore()))
    train = out["train"]
    state = TrainState(step=train["step"], params=out["params"], ema_params=out["ema"],
                       opt_state=train["opt_state"],
                       rng=train["rng"], nonfinite_steps=train["nonfinite_steps"])
    return state, out["data"], meta

  def restore_params(self, step: int, abstract: TrainState, *, with_opt: bool) -> tuple[Any, Any]:
    """(EMA params, opt_state or None) of `step`, for initialising another run (stage 2 from 1)."""
    self.check_compatible(step, abstract, with_opt=with_opt)
    items = {"ema": ocp.args.StandardRestore(abstract.ema_params)}
    if with_opt:
      items["train"] = ocp.args.StandardRestore(_train_part(abstract))
    out = self._mngr.restore(step, args=ocp.args.Composite(**items))
    return out["ema"], out["train"]["opt_state"] if with_opt else None

  # --- preemption ---
  def install_sigterm_handler(self) -> None:
    """Single process: SIGTERM sets a flag that `preempted` reports at the next step."""
    if jax.process_count() > 1:
      return  # JAX's own preemption notifier catches SIGTERM and syncs the processes.

    def handler(signum, frame):
      del signum, frame
      self._sigterm = True

    self._previous_handler = signal.signal(signal.SIGTERM, handler)

  def preempted(self, step: int) -> bool:
    """True once a SIGTERM was received (all processes agree on the step when multi-process)."""
    if jax.process_count() > 1:
      return self._mngr.reached_preemption(step)
    return self._sigterm

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def load_init(workdir: str | Path, abstract: TrainState, *, with_opt: bool) -> tuple[Any, Any, int]:
  """(params, opt_state or None, step) from the latest checkpoint of another run's workdir."""
  with Checkpointer(workdir, read_only=True) as ckpt:
    step = ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f"{ckpt.directory}: no checkpoint to initialise from")
    params, opt_state = ckpt.restore_params(step, abstract, with_opt=with_opt)
  return params, opt_state, step


def _latest_params_item(workdir: str | Path) -> tuple[Path, int]:
  """(the EMA or params item of the latest checkpoint of a run's workdir, its step)."""
  with Checkpointer(workdir, read_only=True) as ckpt:
    step = ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f"{ckpt.directory}: no checkpoint to initialise from")
    step_dir = ckpt.directory / str(step)
  return step_dir / ("ema" if (step_dir / "ema").is_dir() else "params"), step


def stored_param_subtrees(workdir: str | Path) -> set[str]:
  """The top-level parameter subtrees of the latest checkpoint of a run's workdir."""
  item, _ = _latest_params_item(workdir)
  with ocp.StandardCheckpointer() as checkpointer:
    return set(checkpointer.metadata(item).item_metadata)


def load_init_subtrees(workdir: str | Path, abstract_params: dict, names: tuple[str, ...]) -> tuple[dict, int]:
  """({name: EMA params} of the latest checkpoint of another run, step) for the top-level param
  subtrees `names` only (e.g. a trained energy model under a new structure model).

  Each named subtree must match `abstract_params[name]` exactly (CheckpointMismatchError, naming the
  parameter, otherwise); the other stored subtrees are read and dropped. Arrays come back with the
  shardings of `abstract_params`.
  """
  item, step = _latest_params_item(workdir)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with ocp.StandardCheckpointer() as checkpointer:
    stored = checkpointer.metadata(item).item_metadata
    missing = [n for n in names if n not in stored]
    if missing:
      raise CheckpointMismatchError(f"{item}: incompatible checkpoint: no parameter subtree(s) {missing}")
    for n in names:
      compare_signatures(signature({n: stored[n]}), signature({n: abstract_params[n]}), str(item),
                         "parameter")
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), dict(stored))
    restored = checkpointer.restore(item, target)
  out = {n: jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), restored[n], abstract_params[n])
         for n in names}
  return out, step


def restore_model_params(workdir: str | Path, step: int, abstract_params: Any) -> Any:
  """The model parameters of checkpoint `step`, for inference (no optimizer state, no trainer).

  Restores the EMA parameters (item "ema") when the checkpoint holds them, else item "params", into
  `abstract_params` (ShapeDtypeStructs, with shardings). `workdir` is a run's workdir or its
  `checkpoints` directory.

  Raises:
    FileNotFoundError: no checkpoint `step` there.
    CheckpointMismatchError: a stored parameter is missing, extra, or of another shape / dtype.
  """
  root = Path(workdir).resolve()
  step_dir = (root / "checkpoints" if (root / "checkpoints").is_dir() else root) / str(step)
  item = "ema" if (step_dir / "ema").is_dir() else "params"
  if not (step_dir / item).is_dir():
    raise FileNotFoundError(f"{step_dir}: no checkpoint parameters there")
  with ocp.StandardCheckpointer() as checkpointer:
    stored = checkpointer.metadata(step_dir / item).item_metadata
    compare_signatures(signature(stored), signature(abstract_params), str(step_dir / item), "parameter")
    return checkpointer.restore(step_dir / item, abstract_params)

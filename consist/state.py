"""Train state (arrays only, so it checkpoints and shards as one pytree) and the optimizer.

The optimizer transformation itself is static and lives beside the state (`make_optimizer`), never in
it: every leaf of `TrainState` is an array that orbax can save and `jax.jit(out_shardings=...)` can
place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from consist.types import GraphBatch

if TYPE_CHECKING:
  from consist.config import OptimConfig

Params = Any
InitFn = Callable[[jax.Array, GraphBatch], Params]


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue bit-exactly (besides the data-iterator state).

  Attributes:
    step: int32 [], number of completed updates.
    params: model parameters.
    ema_params: exponential moving average of `params` (`OptimConfig.ema_decay`); what validation,
      checkpoints for inference and stage-2 initialisation use.
    opt_state: optax state of `make_optimizer(...)[0]`.
    rng: uint32 [2], raw key data; step t uses `fold_in(rng, t)`.
    nonfinite_steps: int32 [], updates skipped because the loss or a gradient was NaN/inf.
  """

  step: jax.Array
  params: Params
  ema_params: Params
  opt_state: Any
  rng: jax.Array
  nonfinite_steps: jax.Array


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with linear warmup then cosine decay to `end_lr_factor * learning_rate`, after clipping.

  Args:
    cfg: optimizer section of the config.
    total_steps: length of the run; the cosine decays over `total_steps - warmup_steps` updates.
  Returns:
    (transformation, schedule: step -> learning rate).
  """
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else cfg.learning_rate,
      peak_value=cfg.learning_rate,
      warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=cfg.learning_rate * cfg.end_lr_factor,
  )
  parts = []
  if cfg.clip_norm > 0:
    parts.append(clip_by_subtree_norm(cfg.clip_norm))
  parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
  return optax.chain(*parts), schedule


def clip_by_subtree_norm(max_norm: float) -> optax.GradientTransformation:
  """`optax.clip_by_global_norm` applied to each top-level subtree of a dict of params on its own
  (the energy model, the structure encoder, the structure head), so a large structure-loss gradient
  cannot scale down the energy model's update; other pytrees are clipped as one."""
  clip = optax.clip_by_global_norm(max_norm)

  def update(updates, state, params=None):
    del params
    if isinstance(updates, dict):
      return {k: clip.update(v, state)[0] for k, v in updates.items()}, state
    return clip.update(updates, state)[0], state

  return optax.GradientTransformation(clip.init, update)


def create_state(init_fn: InitFn, tx: optax.GradientTransformation, seed: int,
                 example_batch: GraphBatch) -> TrainState:
  """A fresh state (traceable: `parallel.init_state_sharded` runs it under jit).

  Args:
    init_fn: (rng, one device's sub-batch) -> params.
    tx: the optimizer.
    seed: run seed; params use `fold_in(key(seed), 0)`, the step keys `fold_in(key(seed), 1)`.
    example_batch: one device's sub-batch (no device axis), for shapes.
  """
  key = jax.random.key(seed)
  params = init_fn(jax.random.fold_in(key, 0), example_batch)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      ema_params=params,
      opt_state=tx.init(params),
      rng=jax.random.key_data(jax.random.fold_in(key, 1)),
      nonfinite_steps=jnp.zeros((), jnp.int32),
  )


def ema_update(ema: Params, params: Params, decay: float, step: jax.Array) -> Params:
  """One EMA step with warm-up: the decay is min(decay, (1 + step) / (10 + step)), so early
  averages are not dominated by the random initialisation; decay 0 returns `params`."""
  if decay <= 0:
    return params
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  # e + (1 - d)(p - e): exactly e where p == e (frozen parameters stay bitwise frozen).
  return jax.tree.map(lambda e, p: (e + (1.0 - d) * (p - e)).astype(p.dtype), ema, params)

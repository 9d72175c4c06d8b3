"""consist: molecular multi-task learning with physical-consistency losses, in JAX.

Importing consist adds one XLA flag for the CPU backend (unless XLA_FLAGS already sets it): XLA's
default YNNPACK "reduce" and "dot" library fusions run the small per-edge contractions of the
equivariant models 2-5x slower than XLA's own fused loops (measured on a 2-core x86 VM, MACE energy
model, batch of 32 molecules: train step 2.6 s -> 0.62 s, energy+forces 0.9 s -> 0.21 s;
docs/DEVLOG.md, session 4). Like every XLA flag it only takes effect if consist is imported before
JAX initialises its backends (the first computation).
"""

import os

__version__ = "0.1.0"

_CPU_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-reduce,-dot"


def _configure_xla_cpu() -> None:
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_cpu_experimental_ynn_fusion_type" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {_CPU_FUSION_FLAG}".strip()


_configure_xla_cpu()

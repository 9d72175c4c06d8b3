"""Model size and structure-head options (typed, frozen; built from ml_collections by the trainer)."""

from __future__ import annotations

import dataclasses

PREDICTIONS = ("eps", "x0")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Sizes of the shared encoder and the two heads.

  Attributes:
    channels: scalar (0e) channels per atom.
    vector_channels: channels per non-scalar irrep (1o, 2e, ... up to `max_l`).
    max_l: highest spherical-harmonic degree on edges and in the hidden features.
    num_layers: message-passing layers.
    num_radial: Gaussian radial basis functions on [0, cutoff].
    cutoff: Å. Non-bonded edges are switched off smoothly at `cutoff` (polynomial envelope);
      bonded edges (bond_order > 0) always carry messages, so a strongly noised structure keeps
      its bond graph.
    radial_hidden: width of the MLP that turns edge scalars into tensor-product weights.
    time_frequencies: sinusoidal frequencies of the diffusion-time embedding.
    num_fidelities: size of the label-fidelity vocabulary (per-fidelity energy offsets).
    avg_num_neighbors: aggregated messages are divided by sqrt(this).
    prediction: structure-head parameterisation: "eps" (noise) or "x0" (clean scaled
      coordinates, as x_t + a predicted equivariant displacement). With "eps", the x0 prediction
      moves by only sigma(t) per unit of output, so consistency gradients through it vanish as
      t -> 0; "x0" keeps them O(1) (train it with `LossConfig.denoise_weighting="min_snr"`).
  """

  channels: int = 32
  vector_channels: int = 16
  max_l: int = 1
  num_layers: int = 2
  num_radial: int = 8
  cutoff: float = 5.0
  radial_hidden: int = 32
  time_frequencies: int = 8
  num_fidelities: int = 1
  avg_num_neighbors: float = 8.0
  prediction: str = "eps"

  def __post_init__(self):
    if self.prediction not in PREDICTIONS:
      raise ValueError(f"ModelConfig.prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
    for name in ("channels", "num_layers", "num_radial", "radial_hidden", "time_frequencies",
                 "num_fidelities"):
      if getattr(self, name) < 1:
        raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.max_l < 1 or self.vector_channels < 1:
      raise ValueError("ModelConfig: max_l >= 1 and vector_channels >= 1 are needed for the "
                       f"equivariant structure head, got max_l={self.max_l}, "
                       f"vector_channels={self.vector_channels}")
    if self.cutoff <= 0:
      raise ValueError(f"ModelConfig.cutoff must be > 0 Å, got {self.cutoff}")

"""Model sizes and options (typed, frozen; built from ml_collections by the trainer).

`ModelConfig` holds the structure model (encoder + head) and, in `energy`, the energy model.
"""

from __future__ import annotations

import dataclasses

PREDICTIONS = ("eps", "x0", "edm")
TRUNKS = ("separate", "shared")
LEVEL_PARAMS = ("offset", "increment")


@dataclasses.dataclass(frozen=True)
class EnergyModelConfig:
  """Sizes of the energy model (defaults: the MACE configuration of issue 12, 32x0e + 32x1o).

  Attributes:
    channels: channels per irrep of the hidden features and of A.
    max_l_hidden: highest l of the hidden node features (1: 32x0e + 32x1o).
    max_l_edge: highest l of the edge spherical harmonics and of A.
    correlation: body order - 1 of the product basis (3 = four-body features per layer).
    num_layers: interaction layers; the last keeps scalars only.
    num_bessel: Bessel radial basis functions on [0, cutoff].
    cutoff: Å.
    envelope_p: the polynomial cutoff envelope's order (smooth to order p - 1 at 0 ... continuous
      to second order at the cutoff).
    radial_hidden: widths of the radial MLP.
    readout_hidden: width of the last layer's readout MLP.
    avg_num_neighbors: messages are divided by this; 0 = from the training data.
    scale, shift: per-atom energy = scale * model + shift (eV); scale 0 = from the training data.
  """

  channels: int = 32
  max_l_hidden: int = 1
  max_l_edge: int = 2
  correlation: int = 3
  num_layers: int = 2
  num_bessel: int = 8
  cutoff: float = 5.0
  envelope_p: int = 5
  radial_hidden: tuple[int, ...] = (64, 64, 64)
  readout_hidden: int = 16
  avg_num_neighbors: float = 0.0
  scale: float = 0.0
  shift: float = 0.0

  def __post_init__(self):
    for name in ("channels", "correlation", "num_layers", "num_bessel", "readout_hidden",
                 "envelope_p"):
      if getattr(self, name) < 1:
        raise ValueError(f"EnergyModelConfig.{name} must be >= 1, got {getattr(self, name)}")
    if not 0 <= self.max_l_hidden <= self.max_l_edge:
      raise ValueError("EnergyModelConfig: need 0 <= max_l_hidden <= max_l_edge, got "
                       f"{self.max_l_hidden}, {self.max_l_edge}")
    if self.cutoff <= 0 or self.avg_num_neighbors < 0 or self.scale < 0:
      raise ValueError("EnergyModelConfig: cutoff > 0 Å, avg_num_neighbors >= 0 and scale >= 0 "
                       f"needed, got {self.cutoff}, {self.avg_num_neighbors}, {self.scale}")

  @property
  def resolved(self) -> bool:
    """True once the data statistics are set (see `consist.models.statistics`)."""
    return self.avg_num_neighbors > 0 and self.scale > 0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The structure model's encoder and head, the energy model, and how they share a trunk.

  Attributes:
    energy: the energy model (`consist.models.mace.MACE`).
    trunk: "separate" (default): the energy model and the structure model have no parameter in
      common, so no structure loss can change the energy (measured: docs/DEVLOG.md, session 4);
      "shared": the structure encoder also reads the energy model's invariant node features at the
      (noisy) positions, so denoising gradients reach the energy model's trunk too.
    channels: scalar (0e) channels per atom of the structure encoder.
    vector_channels: channels per non-scalar irrep (1o, 2e, ... up to `max_l`).
    max_l: highest spherical-harmonic degree on edges and in the hidden features.
    num_layers: message-passing layers.
    num_radial: Gaussian radial basis functions on [0, cutoff].
    cutoff: Å. Non-bonded edges are switched off smoothly at `cutoff` (polynomial envelope);
      bonded edges (bond_order > 0) always carry messages, so a strongly noised structure keeps
      its bond graph.
    topology_hops: 0 or 1: edges know only whether their pair is bonded; H >= 2: also whether it
      is 2, 3, ..., H bonds apart (or further), and pairs up to H bonds apart always carry messages
      (as bonded ones do). Generation from the graph needs it: at high noise the distances say
      nothing, and 1-3 / 1-4 pairs fix the angles and torsions.
    radial_hidden: width of the MLP that turns edge scalars into tensor-product weights.
    time_frequencies: sinusoidal frequencies of the diffusion-time embedding.
    num_fidelities: size of the label-fidelity vocabulary (per-fidelity energy offsets).
    avg_num_neighbors: the structure encoder's aggregated messages are divided by sqrt(this).
    prediction: structure-head parameterisation: "eps" (noise) or "x0" (clean scaled
      coordinates, as x_t + a predicted equivariant displacement). With "eps", the x0 prediction
      moves by only sigma(t) per unit of output, so consistency gradients through it vanish as
      t -> 0; "x0" keeps them O(1) (train it with `LossConfig.denoise_weighting="min_snr"`);
      "edm": x0 = c_skip y + c_out F (`consist.diffusion`, preconditioning): the x0 prediction
      tends to its input as t -> 0, and F is unit-scale at every t (train it with
      `denoise_weighting="edm"`).
    structure_levels: levels of theory the structure model can be asked for: level 0 is the
      training structures' own (cheap) level, which denoising learns; level 1 the accurate level
      that consistency terms train (`LossConfig.consistency_level`). Level l > 0 adds a learned
      embedding to the time conditioning, initialised to 0, so an untrained level 1 is exactly
      level 0. Default 1 (runs stored before levels existed load unchanged); the configs use 2.
    level_params: what a level l > 0 has of its own. "offset": the conditioning embedding alone
      (every other structure parameter shared with level 0); "increment": also an increment of
      every structure-model parameter (`params["level_increment"]`, zero at init), so level l's
      network is level 0's plus its increment, and consistency routed to "level_increment" trains
      level l without moving anything level 0 uses.
  """

  energy: EnergyModelConfig = EnergyModelConfig()
  trunk: str = "separate"
  channels: int = 32
  vector_channels: int = 16
  max_l: int = 1
  num_layers: int = 2
  num_radial: int = 8
  cutoff: float = 5.0
  topology_hops: int = 0
  radial_hidden: int = 32
  time_frequencies: int = 8
  num_fidelities: int = 1
  avg_num_neighbors: float = 8.0
  prediction: str = "eps"
  structure_levels: int = 1
  level_params: str = "offset"

  def __post_init__(self):
    if self.trunk not in TRUNKS:
      raise ValueError(f"ModelConfig.trunk must be one of {TRUNKS}, got {self.trunk!r}")
    if self.level_params not in LEVEL_PARAMS:
      raise ValueError(f"ModelConfig.level_params must be one of {LEVEL_PARAMS}, got {self.level_params!r}")
    if self.prediction not in PREDICTIONS:
      raise ValueError(f"ModelConfig.prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
    for name in ("channels", "num_layers", "num_radial", "radial_hidden", "time_frequencies",
                 "num_fidelities", "structure_levels"):
      if getattr(self, name) < 1:
        raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.max_l < 1 or self.vector_channels < 1:
      raise ValueError("ModelConfig: max_l >= 1 and vector_channels >= 1 are needed for the "
                       f"equivariant structure head, got max_l={self.max_l}, "
                       f"vector_channels={self.vector_channels}")
    if self.cutoff <= 0:
      raise ValueError(f"ModelConfig.cutoff must be > 0 Å, got {self.cutoff}")
    if self.topology_hops < 0:
      raise ValueError(f"ModelConfig.topology_hops must be >= 0, got {self.topology_hops}")

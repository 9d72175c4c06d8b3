"""consist: molecular multi-task learning with physical-consistency losses, in JAX."""

__version__ = "0.1.0"

"""Pure, masked, per-molecule-normalised losses; each returns (scalar, metrics dict)."""

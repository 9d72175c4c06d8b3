"""Thin absl entry points: `python -m launch.<name>` from the repository root."""

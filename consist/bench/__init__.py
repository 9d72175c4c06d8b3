"""Benchmarks behind `python -m launch.bench`. Each module exposes `run(quick: bool) -> dict`.

Numbers are wall-clock on a shared machine: compare ratios measured in one run, never absolute
values across runs.
"""

SUITES = ("data", "model", "train", "predict", "energy")

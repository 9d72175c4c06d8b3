"""Paired comparison of two arms on the same molecules, and aggregation over seeds.

Per-molecule values are float arrays [M] in one molecule order; NaN marks a failed molecule and is
removed pairwise (a molecule counts only if both arms have a value), with the count reported.
Differences are a - b: for lower-is-better metrics a negative mean difference favours arm a.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from scipy import stats as sps


@dataclasses.dataclass(frozen=True)
class PairedComparison:
  """Arm a against arm b on the molecules both have.

  n: molecules compared; n_dropped: molecules removed because either value is NaN.
  mean_a, mean_b, mean_diff (a - b) with its bootstrap confidence interval [ci_low, ci_high];
  p_ttest: two-sided paired t-test; p_wilcoxon: two-sided Wilcoxon signed-rank (zero differences
  discarded); both 1.0 when every difference is zero, NaN with fewer than 2 molecules.
  frac_lower: fraction of molecules where a < b (ties count half).
  """

  n: int
  n_dropped: int
  mean_a: float
  mean_b: float
  mean_diff: float
  ci_low: float
  ci_high: float
  p_ttest: float
  p_wilcoxon: float
  frac_lower: float

  def to_json(self) -> dict:
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v)
            for k, v in dataclasses.asdict(self).items()}


def paired_comparison(a, b, *, confidence: float = 0.95, n_bootstrap: int = 10_000,
                      seed: int = 0) -> PairedComparison:
  """Paired statistics of per-molecule values a [M] vs b [M] (see PairedComparison)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f"paired values must be two 1-D arrays of one length, got {a.shape} and "
                     f"{b.shape}")
  keep = np.isfinite(a) & np.isfinite(b)
  a, b = a[keep], b[keep]
  n, nan = a.shape[0], float("nan")
  if n == 0:
    return PairedComparison(0, int((~keep).sum()), nan, nan, nan, nan, nan, nan, nan, nan)
  d = a - b
  frac_lower = float(np.mean(d < 0) + 0.5 * np.mean(d == 0))
  constant = np.ptp(d) <= 1e-12 * np.abs(d).max()  # the same difference on every molecule
  if np.all(d == 0):
    p_t = p_w = 1.0
  elif n < 2:
    p_t = p_w = nan
  else:
    # A constant non-zero difference has zero spread: an infinite t statistic.
    p_t = 0.0 if constant else float(sps.ttest_rel(a, b).pvalue)
    p_w = float(sps.wilcoxon(d).pvalue)
  if constant:  # nothing to resample
    ci_low = ci_high = float(d[0])
  else:
    ci = sps.bootstrap((d,), np.mean, confidence_level=confidence, n_resamples=n_bootstrap,
                       method="percentile", rng=np.random.default_rng(seed)).confidence_interval
    ci_low, ci_high = float(ci.low), float(ci.high)
  return PairedComparison(n=n, n_dropped=int((~keep).sum()), mean_a=float(a.mean()),
                          mean_b=float(b.mean()), mean_diff=float(d.mean()), ci_low=ci_low,
                          ci_high=ci_high, p_ttest=p_t, p_wilcoxon=p_w, frac_lower=frac_lower)


@dataclasses.dataclass(frozen=True)
class SeedSummary:
  """mean ± std (ddof=1; 0 for one seed) over seeds of each seed's mean over its finite molecules.

  per_seed: those per-seed means; n_failed: NaN (failed) molecule values summed over seeds.
  """

  mean: float
  std: float
  n_seeds: int
  per_seed: tuple[float, ...]
  n_failed: int

  def to_json(self) -> dict:
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v)
            for k, v in dataclasses.asdict(self).items()}


def seed_summary(per_seed_values: Sequence[Sequence[float]]) -> SeedSummary:
  """Aggregates one arm's per-molecule values, one array [M] per seed."""
  if not per_seed_values:
    raise ValueError("no seeds to summarise")
  means, n_failed = [], 0
  for values in per_seed_values:
    v = np.asarray(values, np.float64)
    finite = v[np.isfinite(v)]
    n_failed += int(v.size - finite.size)
    means.append(float(finite.mean()) if finite.size else float("nan"))
  m = np.asarray(means)
  std = float(np.std(m, ddof=1)) if m.size > 1 else 0.0
  return SeedSummary(mean=float(m.mean()), std=std, n_seeds=int(m.size), per_seed=tuple(means),
                     n_failed=n_failed)


def seed_average(per_seed_values: Sequence[Sequence[float]]) -> np.ndarray:
  """Per-molecule mean over seeds [M]; NaN where any seed failed on the molecule."""
  arr = np.asarray(per_seed_values, np.float64)
  if arr.ndim != 2:
    raise ValueError(f"expected per-seed per-molecule values [S, M], got shape {arr.shape}")
  return arr.mean(axis=0)


def compare_over_seeds(a_per_seed: Sequence[Sequence[float]], b_per_seed: Sequence[Sequence[float]],
                       **kwargs) -> PairedComparison:
  """Paired comparison of per-molecule values averaged over each arm's seeds: [S_a, M], [S_b, M]."""
  return paired_comparison(seed_average(a_per_seed), seed_average(b_per_seed), **kwargs)

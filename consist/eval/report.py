"""Results tables (Markdown + JSON) and plots (PNG) for arms x seeds x generation modes.

The evaluation launcher fills a `Results`; `write_report(results, out_dir)` writes
  results.md     per mode: arms x metrics (mean ± std over seeds of the per-seed means), then per
                 metric the paired statistics of every arm against the compute-matched multi-task
                 arm and against the cheap-structure baseline (per-molecule values averaged
                 over seeds)
  summary.json   the same numbers, machine-readable
  rmsd_ecdf.png  ECDF of per-molecule RMSD per arm, one panel per mode
  energy_gap.png accurate-level energy gap per arm (box plots), one panel per mode
  ephi_gap.png   E_phi(R_pred) - E_phi(R_ref) against E_phi(R_ref) per arm and mode (points below 0:
                 the model scores its prediction below the reference minimum)
A plot whose metrics are absent from the results is not written.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np

from consist.eval import stats  # pylint: disable=g-import-not-at-top,wrong-import-position

REFERENCE_ARM = "multitask"
CHEAP_BASELINE = "cheap"
RMSD_METRIC = "rmsd_sym_mean"
ENERGY_GAP_METRIC = "energy_gap_mean"
EPHI_PRED_METRIC, EPHI_REF_METRIC = "e_phi_pred_mean", "e_phi_ref"
# Absolute model energies: plotted, not averaged over molecules in tables.
NON_TABLE_METRICS = (EPHI_PRED_METRIC, EPHI_REF_METRIC)

PerMolecule = list  # [M] floats in `Results.mol_ids` order; None / NaN = failed molecule


@dataclasses.dataclass
class Results:
  """Per-molecule evaluation results of every arm, seed and generation mode.

  mol_ids: [M] molecule ids; every per-molecule list follows this order.
  arms: {arm: {seed: {mode: {metric: [M]}}}} for trained arms ("multitask", "multitask+forces",
    "consistency", "consistency+forces"); seed keys are strings (JSON object keys); modes
    "denoise" | "ddim" | "refine"; metrics as produced by `consist.eval.structure` / `physics`
    ("rmsd_sym_mean", "energy_gap_mean", ...).
  baselines: {name: {metric: [M]}} for deterministic, mode-independent baselines ("cheap": the
    cheap structure itself, "etkdg": RDKit ETKDG without relaxation).
  meta: free-form provenance (command, machine, dataset, levels, date).
  JSON: NaN is written as null.
  """

  mol_ids: list[str]
  arms: dict[str, dict[str, dict[str, dict[str, PerMolecule]]]]
  baselines: dict[str, dict[str, PerMolecule]] = dataclasses.field(default_factory=dict)
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)

  def validate(self) -> "Results":
    """Raises ValueError naming the arm/seed/mode/metric whose list length is not len(mol_ids)."""
    m = len(self.mol_ids)
    for arm, seeds in self.arms.items():
      if not seeds:
        raise ValueError(f"results: arm {arm!r} has no seeds")
      for seed, modes in seeds.items():
        for mode, metrics in modes.items():
          for metric, values in metrics.items():
            if len(values) != m:
              raise ValueError(f"results: arm {arm!r} seed {seed!r} mode {mode!r} metric "
                               f"{metric!r} has {len(values)} values for {m} molecules")
    for name, metrics in self.baselines.items():
      for metric, values in metrics.items():
        if len(values) != m:
          raise ValueError(f"results: baseline {name!r} metric {metric!r} has {len(values)} values "
                           f"for {m} molecules")
    return self

  def to_json(self) -> dict[str, Any]:
    return _json_safe(dataclasses.asdict(self))

  @classmethod
  def from_json(cls, data: dict[str, Any]) -> "Results":
    return cls(mol_ids=list(data["mol_ids"]), arms=data["arms"],
               baselines=data.get("baselines", {}), meta=data.get("meta", {})).validate()

  def save(self, path) -> None:
    Path(path).write_text(json.dumps(self.validate().to_json(), indent=1))

  @classmethod
  def load(cls, path) -> "Results":
    try:
      return cls.from_json(json.loads(Path(path).read_text()))
    except (KeyError, ValueError) as e:
      raise ValueError(f"{path}: not a results file: {e}") from e

  def modes(self) -> list[str]:
    return _unique(mode for seeds in self.arms.values() for modes in seeds.values()
                   for mode in modes)

  def metrics(self) -> list[str]:
    return _unique([metric for seeds in self.arms.values() for modes in seeds.values()
                    for metrics in modes.values() for metric in metrics]
                   + [metric for metrics in self.baselines.values() for metric in metrics])

  def arm_values(self, arm: str, mode: str, metric: str) -> np.ndarray | None:
    """[S, M] per-seed per-molecule values (NaN for failures), or None if no seed has them."""
    rows = [modes[mode][metric] for modes in self.arms[arm].values()
            if metric in modes.get(mode, {})]
    return _floats(rows) if rows else None

  def baseline_values(self, name: str, metric: str) -> np.ndarray | None:
    """[1, M] values of a baseline (one deterministic "seed"), or None if it lacks the metric."""
    values = self.baselines[name].get(metric)
    return None if values is None else _floats([values])


def _unique(items) -> list:
  return list(dict.fromkeys(items))


def _floats(rows) -> np.ndarray:
  return np.array([[np.nan if v is None else v for v in row] for row in rows], np.float64)


def _json_safe(obj):
  if isinstance(obj, dict):
    return {str(k): _json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple, np.ndarray)):
    return [_json_safe(v) for v in obj]
  if isinstance(obj, (float, np.floating)):
    return None if not math.isfinite(obj) else float(obj)
  if isinstance(obj, np.integer):
    return int(obj)
  return obj


def _rows(results: Results, mode: str, metric: str) -> dict[str, np.ndarray]:
  """{row name: [S, M]} for every arm and baseline holding `metric` in `mode`."""
  rows = {}
  for arm in results.arms:
    values = results.arm_values(arm, mode, metric)
    if values is not None:
      rows[arm] = values
  for name in results.baselines:
    values = results.baseline_values(name, metric)
    if values is not None:
      rows[f"{name} (baseline)"] = values
  return rows


def summarise(results: Results, *, metrics: Sequence[str] | None = None,
              reference_arm: str = REFERENCE_ARM, cheap_baseline: str = CHEAP_BASELINE,
              seed: int = 0) -> dict[str, Any]:
  """Per mode: {"table": {row: {metric: SeedSummary json}},
                "vs_<reference_arm>": {arm: {metric: PairedComparison json}},
                "vs_<cheap_baseline>": {arm: {metric: PairedComparison json}}}."""
  results.validate()
  if not metrics:
    metrics = [m for m in results.metrics() if m not in NON_TABLE_METRICS]
  out = {}
  for mode in results.modes():
    table, vs_ref, vs_cheap = {}, {}, {}
    for metric in metrics:
      for row, values in _rows(results, mode, metric).items():
        table.setdefault(row, {})[metric] = stats.seed_summary(list(values)).to_json()
      ref = (results.arm_values(reference_arm, mode, metric) if reference_arm in results.arms
             else None)
      cheap = (results.baseline_values(cheap_baseline, metric)
               if cheap_baseline in results.baselines else None)
      for arm in results.arms:
        values = results.arm_values(arm, mode, metric)
        if values is None:
          continue
        if ref is not None and arm != reference_arm:
          vs_ref.setdefault(arm, {})[metric] = stats.compare_over_seeds(
              values, ref, seed=seed).to_json()
        if cheap is not None:
          vs_cheap.setdefault(arm, {})[metric] = stats.compare_over_seeds(
              values, cheap, seed=seed).to_json()
    out[mode] = {"table": table, f"vs_{reference_arm}": vs_ref, f"vs_{cheap_baseline}": vs_cheap}
  return out


SHORT_METRICS = (("rmsd_sym_mean", "RMSD (Å)"), ("energy_gap_mean", "GFN2 gap (eV)"),
                 ("valid_frac", "valid"))


def short_table(summary: dict[str, Any]) -> str:
  """One plain-text table of `summarise`'s output: (mode, arm or baseline) x mean RMSD, accurate
  energy gap and valid fraction (mean over seeds); baselines once, after the arms."""
  header = f"{'mode':8s} {'arm':22s} " + " ".join(f"{label:>14s}" for _, label in SHORT_METRICS)
  lines, baselines = [header, "-" * len(header)], {}
  for mode, parts in summary.items():
    for row, metrics in parts["table"].items():
      if row.endswith("(baseline)"):
        baselines.setdefault(row, metrics)
        continue
      lines.append(_short_row(mode, row, metrics))
  lines += [_short_row("", row, metrics) for row, metrics in baselines.items()]
  return "\n".join(lines)


def _short_row(mode: str, row: str, metrics: dict[str, Any]) -> str:
  cells = []
  for metric, _ in SHORT_METRICS:
    value = metrics.get(metric, {}).get("mean")
    cells.append("–" if value is None else (f"{100 * value:.0f}%" if metric == "valid_frac"
                                           else f"{value:.4g}"))
  return f"{mode:8s} {row:22s} " + " ".join(f"{c:>14s}" for c in cells)


def _fmt(x, digits: int = 4) -> str:
  return "–" if x is None else f"{x:.{digits}g}"


def _fmt_p(p) -> str:
  return "–" if p is None else (f"{p:.2e}" if p < 1e-3 else f"{p:.3f}")


def markdown(results: Results, summary: dict[str, Any], *, reference_arm: str = REFERENCE_ARM,
             cheap_baseline: str = CHEAP_BASELINE) -> str:
  """The Markdown report of `summarise`'s output."""
  lines = ["# Results", ""]
  for key, value in results.meta.items():
    lines.append(f"- **{key}**: {value}")
  lines += [f"- **molecules**: {len(results.mol_ids)}", ""]
  for mode, parts in summary.items():
    table = parts["table"]
    metrics = _unique(m for row in table.values() for m in row)
    lines += [f"## Mode `{mode}`", "",
              "Mean ± std over seeds of the per-seed mean over molecules (failed molecules "
              "excluded, count in `summary.json`).", "",
              "| arm | seeds | " + " | ".join(f"`{m}`" for m in metrics) + " |",
              "|---|---|" + "---|" * len(metrics)]
    for row, cells in table.items():
      n_seeds = max(c["n_seeds"] for c in cells.values())
      vals = []
      for m in metrics:
        c = cells.get(m)
        vals.append("–" if c is None else
                    _fmt(c["mean"]) + (f" ± {_fmt(c['std'], 2)}" if c["n_seeds"] > 1 else ""))
      lines.append(f"| {row} | {n_seeds} | " + " | ".join(vals) + " |")
    lines.append("")
    comparisons = [(name, parts[f"vs_{name}"]) for name in (reference_arm, cheap_baseline)]
    if any(c for _, c in comparisons):
      lines += ["Paired statistics on per-molecule values averaged over seeds; "
                "Δ = arm − comparison (negative: arm lower), 95% bootstrap CI, two-sided "
                "p-values, fraction of molecules where the arm is lower.", ""]
    for metric in metrics:
      rows = [(arm, name, c[arm][metric]) for name, c in comparisons for arm in c
              if metric in c[arm]]
      if not rows:
        continue
      lines += [f"### `{metric}` ({mode})", "",
                "| arm | vs | n (dropped) | Δ mean [95% CI] | p t-test | p Wilcoxon | frac lower |",
                "|---|---|---|---|---|---|---|"]
      for arm, name, c in rows:
        lines.append(f"| {arm} | {name} | {c['n']} ({c['n_dropped']}) | {_fmt(c['mean_diff'], 3)} "
                     f"[{_fmt(c['ci_low'], 3)}, {_fmt(c['ci_high'], 3)}] | "
                     f"{_fmt_p(c['p_ttest'])} | "
                     f"{_fmt_p(c['p_wilcoxon'])} | {_fmt(c['frac_lower'], 3)} |")
      lines.append("")
  return "\n".join(lines)


def _mode_axes(n: int, title: str):
  fig, axes = plt.subplots(1, n, figsize=(5 * n, 4), squeeze=False)
  fig.suptitle(title)
  return fig, axes[0]


def plot_rmsd_ecdf(results: Results, path: Path, metric: str = RMSD_METRIC) -> bool:
  """ECDF of the seed-averaged per-molecule `metric` per arm and baseline, one panel per mode."""
  modes = [m for m in results.modes() if _rows(results, m, metric)]
  if not modes:
    return False
  fig, axes = _mode_axes(len(modes), f"{metric} (Å), per molecule, averaged over seeds")
  for ax, mode in zip(axes, modes):
    for row, values in _rows(results, mode, metric).items():
      v = np.sort(stats.seed_average(values))
      v = v[np.isfinite(v)]
      ax.step(v, np.arange(1, v.size + 1) / max(v.size, 1), where="post", label=row,
              linestyle="--" if row.endswith("(baseline)") else "-")
    ax.set(title=mode, xlabel=f"{metric} (Å)", ylabel="fraction of molecules")
    ax.legend(fontsize="small")
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return True


def plot_energy_gap(results: Results, path: Path, metric: str = ENERGY_GAP_METRIC) -> bool:
  """Box plots of the seed-averaged accurate-level energy gap per arm and baseline, per mode."""
  modes = [m for m in results.modes() if _rows(results, m, metric)]
  if not modes:
    return False
  fig, axes = _mode_axes(len(modes), f"{metric}: E_acc(R_pred) − E_acc(R_ref min) (eV)")
  for ax, mode in zip(axes, modes):
    rows = _rows(results, mode, metric)
    data = []
    for values in rows.values():
      v = stats.seed_average(values)
      data.append(v[np.isfinite(v)])
    ax.boxplot(data, tick_labels=list(rows), showmeans=True)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set(title=mode, ylabel="eV")
    ax.tick_params(axis="x", labelrotation=30)
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return True


def plot_ephi(results: Results, path: Path, pred_metric: str = EPHI_PRED_METRIC,
              ref_metric: str = EPHI_REF_METRIC) -> bool:
  """E_phi(R_pred) − E_phi(R_ref) against E_phi(R_ref), seed-averaged; a panel per arm and mode."""
  modes = results.modes()
  arms = [a for a in results.arms
          if any(results.arm_values(a, m, pred_metric) is not None
                 and results.arm_values(a, m, ref_metric) is not None for m in modes)]
  if not arms:
    return False
  fig, axes = plt.subplots(len(modes), len(arms), figsize=(4 * len(arms), 3.5 * len(modes)),
                           squeeze=False)
  fig.suptitle("Model energy at the prediction vs at the reference minimum "
               "(below 0: prediction scored below the minimum)")
  for i, mode in enumerate(modes):
    for j, arm in enumerate(arms):
      ax = axes[i, j]
      pred = results.arm_values(arm, mode, pred_metric)
      ref = results.arm_values(arm, mode, ref_metric)
      if pred is not None and ref is not None:
        e_ref = stats.seed_average(ref)
        ax.scatter(e_ref, stats.seed_average(pred) - e_ref, s=8)
      ax.axhline(0.0, color="grey", linewidth=0.8)
      ax.set(title=f"{arm} / {mode}", xlabel="E_phi(R_ref) (eV)",
             ylabel="E_phi(R_pred) − E_phi(R_ref) (eV)")
  fig.tight_layout()
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return True


def write_report(results: Results, out_dir, *, metrics: Sequence[str] | None = None,
                 reference_arm: str = REFERENCE_ARM, cheap_baseline: str = CHEAP_BASELINE,
                 seed: int = 0) -> list[Path]:
  """Writes results.md, summary.json and the plots into out_dir; returns the paths written."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  summary = summarise(results, metrics=metrics, reference_arm=reference_arm,
                      cheap_baseline=cheap_baseline, seed=seed)
  written = [out_dir / "results.md", out_dir / "summary.json"]
  written[0].write_text(markdown(results, summary, reference_arm=reference_arm,
                                 cheap_baseline=cheap_baseline))
  written[1].write_text(json.dumps(_json_safe({"meta": results.meta, "modes": summary}), indent=1))
  for name, plot in (("rmsd_ecdf.png", plot_rmsd_ecdf), ("energy_gap.png", plot_energy_gap),
                     ("ephi_gap.png", plot_ephi)):
    if plot(results, out_dir / name):
      written.append(out_dir / name)
  return written

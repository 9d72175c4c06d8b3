"""The datasheet of a built dataset: sizes, elements, sizes, levels, provenance and the fidelity gap.

  python -m launch.build_dataset --datasheet [--dataset data/bundled] [--docs docs]

Writes `<docs>/datasheet.md` and `<docs>/datasheet_*.png`. Everything is computed from the dataset
on disk (records and `dataset.json` attrs), so the sheet is current whenever it is regenerated.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import ase.data
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top

from consist.eval.structure import kabsch_rmsd  # noqa: E402


def _stats(x) -> dict[str, float]:
  x = np.asarray(x, np.float64)
  if x.size == 0:
    return {"n": 0}
  return {"n": int(x.size), "mean": float(x.mean()), "median": float(np.median(x)),
          "p90": float(np.percentile(x, 90)), "max": float(x.max())}


def split_summary(store) -> dict[str, Any]:
  """Counts and per-molecule quantities of one split."""
  per_mol = collections.defaultdict(lambda: {"offeq": 0})
  elements = collections.Counter()
  heavy, gap = [], collections.defaultdict(list)
  eq_force_rms, offeq_de = [], []
  eq_energy = {}
  offeq_energies = collections.defaultdict(list)
  for i in range(len(store)):
    r = store[i]
    m = per_mol[r.mol_id]
    if not r.is_equilibrium:
      m["offeq"] += 1
      offeq_energies[r.mol_id].append(r.energy)
      continue
    z = np.asarray(r.atomic_numbers)
    elements.update(ase.data.chemical_symbols[int(a)] for a in z)
    heavy.append(int((z > 1).sum()))
    if r.forces is not None:
      eq_force_rms.append(float(np.sqrt(np.mean(np.sum(np.asarray(r.forces, np.float64) ** 2, 1)))))
      gap["residual_max_force"].append(float(np.linalg.norm(r.forces, axis=1).max()))
    if r.energy is not None:
      eq_energy[r.mol_id] = r.energy
    if r.ref_positions is not None:
      pos, ref = np.asarray(r.positions, np.float64), np.asarray(r.ref_positions, np.float64)
      gap["rmsd_all"].append(float(kabsch_rmsd(pos, ref)))
      gap["rmsd_heavy"].append(float(kabsch_rmsd(pos[z > 1], ref[z > 1])))
      if r.bonds is not None and len(r.bonds):
        b = np.asarray(r.bonds)
        d_cheap = np.linalg.norm(pos[b[:, 0]] - pos[b[:, 1]], axis=1)
        d_ref = np.linalg.norm(ref[b[:, 0]] - ref[b[:, 1]], axis=1)
        gap["bond_length_diff"].extend((d_cheap - d_ref).tolist())
        gap["bond_length_mae"].append(float(np.abs(d_cheap - d_ref).mean()))
      if r.ref_energy is not None and r.energy is not None:
        gap["energy_drop"].append(float(r.energy - r.ref_energy))
  for mol_id, es in offeq_energies.items():
    if mol_id in eq_energy:
      offeq_de.extend(float(e - eq_energy[mol_id]) for e in es)
  n_offeq = collections.Counter(m["offeq"] for m in per_mol.values())
  return {
      "records": len(store),
      "molecules": len(per_mol),
      "atoms": int(np.asarray(store.n_atoms).sum()),
      "molecules_with_ge3_offeq": sum(v for k, v in n_offeq.items() if k >= 3),
      "offeq_records": sum(m["offeq"] for m in per_mol.values()),
      "elements": dict(sorted(elements.items(), key=lambda kv: -kv[1])),
      "heavy_atoms": heavy,
      "total_atoms": [int(n) for n in np.asarray(store.n_atoms)],
      "eq_force_rms": eq_force_rms,
      "offeq_energy_above_eq": offeq_de,
      "gap": {k: v for k, v in gap.items()},
  }


def _plot_sizes(summaries: dict[str, dict], path: Path) -> None:
  fig, ax = plt.subplots(1, 1, figsize=(6, 3.5))
  bins = np.arange(0.5, max(max(s["heavy_atoms"] or [1]) for s in summaries.values()) + 1.5)
  for name, s in summaries.items():
    ax.hist(s["heavy_atoms"], bins=bins, histtype="step", label=f"{name} ({s['molecules']})",
            density=True)
  ax.set_xlabel("heavy atoms per molecule")
  ax.set_ylabel("fraction of molecules")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _plot_gap(gap: dict[str, list], cheap: str, accurate: str, path: Path) -> None:
  panels = [("rmsd_all", f"RMSD {cheap} vs {accurate} minimum (Å)"),
            ("bond_length_diff", f"bond length {cheap} - {accurate} minimum (Å)"),
            ("energy_drop", f"{accurate} energy drop on relaxation (eV)"),
            ("residual_max_force", f"{accurate} max force at {cheap} structure (eV/Å)")]
  fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
  for ax, (key, label) in zip(axes, panels):
    ax.hist(gap.get(key, []), bins=50)
    ax.set_xlabel(label)
    ax.set_ylabel("count")
  fig.suptitle("Fidelity gap on the validation + test molecules")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _fmt(st: dict[str, float], digits: int = 3) -> str:
  if not st.get("n"):
    return "n/a"
  return " / ".join(f"{st[k]:.{digits}f}" for k in ("mean", "median", "p90", "max"))


def _display_path(path: Path) -> str:
  from consist.data.bundled import REPO_ROOT  # pylint: disable=g-import-not-at-top
  try:
    return str(Path(path).resolve().relative_to(REPO_ROOT))
  except ValueError:
    return str(path)


def write_datasheet(dataset_path: Path, docs: Path) -> Path:
  """Writes docs/datasheet.md and the PNG plots for the dataset at `dataset_path`."""
  from consist.data.store import open_dataset  # pylint: disable=g-import-not-at-top
  ds = open_dataset(dataset_path)
  attrs = ds.attrs
  summaries = {name: split_summary(store) for name, store in ds.splits.items()}
  docs.mkdir(parents=True, exist_ok=True)
  cheap, accurate = attrs["levels"]["cheap"], attrs["levels"]["accurate"]
  gap = collections.defaultdict(list)
  for name in attrs["settings"]["ref_splits"]:
    for k, v in summaries.get(name, {}).get("gap", {}).items():
      gap[k].extend(v)
  _plot_sizes(summaries, docs / "datasheet_sizes.png")
  _plot_gap(gap, cheap, accurate, docs / "datasheet_fidelity_gap.png")

  elements = collections.Counter()
  for s in summaries.values():
    elements.update(s["elements"])
  lines = [
      f"# Datasheet: consist dataset `{_display_path(dataset_path)}`",
      "",
      "Generated by `python -m launch.build_dataset --datasheet --dataset "
      f"{_display_path(dataset_path)}` from the",
      "dataset on disk; regenerate after every rebuild.",
      "",
      "## Contents",
      "",
      "| split | molecules | records | off-eq. records | molecules with >= 3 off-eq. | atoms |",
      "| --- | --- | --- | --- | --- | --- |",
  ]
  for name, s in summaries.items():
    lines.append(f"| {name} | {s['molecules']} | {s['records']} | {s['offeq_records']} | "
                 f"{s['molecules_with_ge3_offeq']} | {s['atoms']} |")
  all_heavy = np.concatenate([s["heavy_atoms"] for s in summaries.values()])
  all_atoms = np.concatenate([s["total_atoms"] for s in summaries.values()])
  settings = attrs["settings"]
  lines += [
      "",
      "Each molecule has one equilibrium record: the "
      f"`{cheap}` minimum (`is_equilibrium=True`, `structure_fidelity={cheap}`) with `{accurate}`",
      f"energy and forces (`label_fidelity={accurate}`). Off-equilibrium records (`is_equilibrium="
      "False`) are thermal",
      f"normal-mode displacements of it on the `{cheap}` Hessian at "
      f"{', '.join(f'{t:g}' for t in settings['offeq_temperatures'])} K (soft modes capped at "
      f"curvature {settings['offeq_min_curvature']} eV/Å²), with `{accurate}` energy and forces,",
      f"for {settings['offeq_fraction']:.0%} of the molecules of splits {settings['offeq_splits']}"
      " (chosen by hash).",
      f"Splits {settings['ref_splits']} carry the `{accurate}` reference minimum (`ref_positions`, "
      f"`ref_energy`, relaxed from the `{cheap}` structure to max force <= {settings['ref_fmax']} "
      "eV/Å at the stored float32 coordinates); the training split never does.",
      "Positions and forces are stored float32 and every label was computed at the float32 "
      "coordinates.",
      "",
      f"Size: heavy atoms per molecule mean {all_heavy.mean():.1f}, median "
      f"{np.median(all_heavy):.0f}, max {all_heavy.max()}; {np.mean(all_heavy <= 15):.1%} have "
      f"<= 15 heavy atoms. All atoms per molecule mean {all_atoms.mean():.1f}, max {all_atoms.max()}.",
      "",
      "![heavy atoms per molecule](datasheet_sizes.png)",
      "",
      "Elements (atoms, equilibrium records): "
      + ", ".join(f"{k} {v}" for k, v in sorted(elements.items(), key=lambda kv: -kv[1])) + ".",
      "",
      "## Levels of theory and settings",
      "",
      *(f"- {k}: {v}" for k, v in attrs["levels"].items()),
      f"- split: {attrs['split']['method']}, fractions {attrs['split']['fractions']}",
      "- settings: `" + json.dumps(settings, sort_keys=True) + "`",
      "- software: " + ", ".join(f"{k} {v}" for k, v in attrs.get("versions", {}).items()),
      "",
      "## Provenance and licences",
      "",
      f"Source: `{attrs['source']['path']}` (sha256 `{attrs['source']['sha256'][:16]}...`), first "
      f"{attrs['source']['n_molecules_planned']} molecules. Its header:",
      "",
      *(f"    {h}" for h in attrs["source"]["header"]),
      "",
      "## Failures",
      "",
      "Molecules rejected by the build, by reason (each listed with SMILES and detail in "
      "`dataset.json` attrs):",
      "",
      *(f"- {k}: {v}" for k, v in attrs["failures"]["counts"].items()),
      *(["- none"] if not attrs["failures"]["counts"] else []),
      "",
      f"## Fidelity gap ({cheap} structures vs {accurate} minima, splits {settings['ref_splits']})",
      "",
      "mean / median / p90 / max over molecules:",
      "",
      "| quantity | value |",
      "| --- | --- |",
      f"| all-atom Kabsch RMSD (Å) | {_fmt(_stats(gap['rmsd_all']))} |",
      f"| heavy-atom Kabsch RMSD (Å) | {_fmt(_stats(gap['rmsd_heavy']))} |",
      f"| bond-length MAE per molecule (Å) | {_fmt(_stats(gap['bond_length_mae']), 4)} |",
      f"| abs. bond-length difference, all bonds (Å) | "
      f"{_fmt(_stats(np.abs(gap['bond_length_diff'])), 4)} |",
      f"| {accurate} energy drop on relaxation (eV) | {_fmt(_stats(gap['energy_drop']))} |",
      f"| {accurate} max atomic force at the {cheap} structure (eV/Å) | "
      f"{_fmt(_stats(gap['residual_max_force']))} |",
      "",
      "![fidelity gap](datasheet_fidelity_gap.png)",
      "",
  ]
  if "train" in summaries:
    t = summaries["train"]
    lines += [
        "Training split: RMS atomic force at the equilibrium (cheap) structures "
        f"{_fmt(_stats(t['eq_force_rms']))} eV/Å; off-equilibrium energy above the molecule's "
        f"equilibrium record {_fmt(_stats(t['offeq_energy_above_eq']))} eV.",
        "",
    ]
  path = docs / "datasheet.md"
  path.write_text("\n".join(lines))
  return path

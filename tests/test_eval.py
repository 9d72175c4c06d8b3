"""Evaluation metrics, statistics and reporting (consist.eval)."""

import json

import numpy as np
import pytest
from rdkit import Chem
from rdkit.Chem import AllChem
from scipy.spatial.transform import Rotation

from consist.data.record import MoleculeRecord
from consist.eval import physics, report, stats, structure


def _rigid(x, seed):
  """x [..., n, 3] under a random proper rotation and translation."""
  rot = Rotation.random(random_state=seed).as_matrix()
  return x @ rot.T + np.random.default_rng(seed).normal(size=3) * 3.0


def _embedded(smiles: str, seed: int = 7):
  """(atomic numbers, bonds, bond orders, MMFF positions) of a molecule with explicit hydrogens."""
  mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
  AllChem.EmbedMolecule(mol, randomSeed=seed)
  AllChem.MMFFOptimizeMolecule(mol)
  z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()])
  bonds = np.array([(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in mol.GetBonds()])
  orders = np.array([b.GetBondTypeAsDouble() for b in mol.GetBonds()])
  return z, bonds, orders, mol.GetConformer().GetPositions()


# ----------------------------------------------------------------------------------- structure


def test_rmsd_invariant_to_rotation_and_translation():
  z, bonds, _, ref = _embedded("CC(O)C(=O)N")
  noisy = ref + np.random.default_rng(0).normal(size=ref.shape) * 0.1
  metrics = structure.sample_structure_metrics(z, bonds, noisy, ref)
  moved = structure.sample_structure_metrics(z, bonds, _rigid(noisy, 1), _rigid(ref, 2))
  for name in structure.STRUCTURE_METRICS:
    np.testing.assert_allclose(moved[name], metrics[name], rtol=1e-9, err_msg=name)
  assert metrics["rmsd"][0] > 0.05
  np.testing.assert_allclose(structure.kabsch_rmsd(_rigid(ref, 3), ref), 0.0, atol=1e-9)


def test_stretched_square_known_rmsd():
  square = np.array([[0.5, 0.5, 0], [-0.5, 0.5, 0], [-0.5, -0.5, 0], [0.5, -0.5, 0]])
  stretched = square * np.array([2.0, 1.0, 1.0])  # every atom 0.5 Å off in x after alignment
  np.testing.assert_allclose(structure.kabsch_rmsd(_rigid(stretched, 4), square), 0.5, atol=1e-12)


def test_mirror_image_is_not_aligned_away():
  # Regular tetrahedron of labelled atoms and its mirror image z -> -z: H = 4 diag(1, 1, -1), the best
  # proper rotation reaches trace 4 (a reflection would reach 12): RMSD^2 = (3 + 3 - 2 * 4 / 4) / 1
  # per atom = 4 at unit scale, so RMSD = 2 * 0.5 = 1.0 Å at half scale.
  tet = 0.5 * np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], float)
  mirror = tet * np.array([1, 1, -1])
  np.testing.assert_allclose(structure.kabsch_rmsd(_rigid(mirror, 5), tet), 1.0, atol=1e-9)
  # A generic chiral structure: still far from its mirror image, unlike a reflecting fit (0).
  chiral = np.random.default_rng(1).normal(size=(5, 3))
  assert structure.kabsch_rmsd(chiral * np.array([-1, 1, 1]), chiral) > 0.1


def test_weighted_kabsch_matches_scipy_align_vectors():
  rng = np.random.default_rng(2)
  ref = rng.normal(size=(7, 3))
  pred = _rigid(ref + 0.2 * rng.normal(size=ref.shape), 6)
  w = rng.uniform(0.1, 2.0, size=7)
  a = ref - w @ ref / w.sum()
  b = pred - w @ pred / w.sum()
  _, rssd = Rotation.align_vectors(a, b, weights=w)
  np.testing.assert_allclose(structure.kabsch_rmsd(pred, ref, w), rssd / np.sqrt(w.sum()), rtol=1e-9)
  # 0/1 weights are the RMSD over the selected atoms.
  mask = np.array([1, 0, 1, 1, 0, 1, 1], float)
  sel = mask > 0
  np.testing.assert_allclose(structure.kabsch_rmsd(pred, ref, mask),
                             structure.kabsch_rmsd(pred[sel], ref[sel]), rtol=1e-9)


def _swap(x, perm_pairs):
  out = x.copy()
  for i, j in perm_pairs:
    out[[i, j]] = x[[j, i]]
  return out


def test_symmetry_corrected_rmsd_ignores_symmetric_atom_order():
  # Acetate: Kekulé bond orders differ for the two O, the graph symmetry does not.
  z, bonds, orders, ref = _embedded("CC(=O)[O-]")
  o = np.flatnonzero(z == 8)
  h = np.flatnonzero(z == 1)
  assert sorted(orders[(bonds == o[0]).any(1)].tolist()) != sorted(orders[(bonds == o[1]).any(1)].tolist())
  pred = _rigid(_swap(ref, [(o[0], o[1]), (h[0], h[1])]), 8)
  m = structure.sample_structure_metrics(z, bonds, pred, ref)
  assert m["rmsd"][0] > 0.3
  np.testing.assert_allclose([m["rmsd_sym"][0], m["rmsd_heavy_sym"][0]], 0.0, atol=1e-7)
  # Cycling the methyl hydrogens only: heavy-atom RMSD untouched.
  cyc = ref.copy()
  cyc[h] = ref[np.roll(h, 1)]
  m = structure.sample_structure_metrics(z, bonds, _rigid(cyc, 9), ref)
  assert m["rmsd"][0] > 0.3
  np.testing.assert_allclose([m["rmsd_heavy"][0], m["rmsd_sym"][0]], 0.0, atol=1e-7)


def test_symmetry_corrected_heavy_rmsd_swapped_methyls():
  # Isopropanol: swapping the two methyl groups (with their H) mirrors the pyramidal heavy-atom frame,
  # which no proper rotation undoes; the graph automorphism does.
  z, bonds, _, ref = _embedded("CC(C)O")
  neighbours = [set(bonds[bonds[:, 0] == i, 1]) | set(bonds[bonds[:, 1] == i, 0]) for i in range(len(z))]
  methyls = [i for i in range(len(z)) if z[i] == 6 and sum(z[j] == 1 for j in neighbours[i]) == 3]
  h = [sorted(j for j in neighbours[c] if z[j] == 1) for c in methyls]
  pred = _rigid(_swap(ref, [tuple(methyls)] + list(zip(h[0], h[1]))), 10)
  m = structure.sample_structure_metrics(z, bonds, pred, ref)
  assert m["rmsd_heavy"][0] > 0.3 and m["rmsd"][0] > 0.3
  np.testing.assert_allclose([m["rmsd_sym"][0], m["rmsd_heavy_sym"][0]], 0.0, atol=1e-7)


def test_automorphism_counts_and_cap():
  z, bonds, _, _ = _embedded("CC(C)(C)C")  # neopentane: 4! (methyls) * (3!)^4 (hydrogens)
  perms, truncated = structure.automorphisms(z, bonds, max_count=40_000)
  assert perms.shape == (24 * 6 ** 4, 17) and not truncated
  np.testing.assert_array_equal(perms[0], np.arange(17))
  assert all(np.array_equal(z[p], z) for p in perms[:50])
  sym = structure.graph_symmetry(z, bonds)
  assert sym.core.shape == (5,) and sym.core_perms.shape == (24, 5) and sym.order == perms.shape[0]
  capped, truncated = structure.automorphisms(z, bonds, max_count=100)
  assert capped.shape == (100, 17) and truncated
  z, bonds, _, _ = _embedded("CCO")  # 3! * 2! hydrogen permutations
  sym = structure.graph_symmetry(z, bonds)
  exact = structure.automorphisms(z, bonds)[0]
  assert sym.order == 12 and {tuple(p) for p in sym.all_perms()} == {tuple(p) for p in exact}


def test_large_group_hydrogen_assignment_matches_exact_enumeration():
  # Neopentane's 31,104 automorphisms exceed EXACT_GROUP_LIMIT: core automorphisms with hydrogen
  # assignment must find the exact minimum over the enumerated group.
  z, bonds, _, ref = _embedded("CC(C)(C)C")
  sym = structure.graph_symmetry(z, bonds)
  assert sym.order > structure.EXACT_GROUP_LIMIT
  rng = np.random.default_rng(11)
  shuffled = structure.automorphisms(z, bonds, max_count=40_000)[0]
  pred = np.stack([_rigid(ref[shuffled[i]] + rng.normal(size=ref.shape) * s, i)
                   for i, s in ((5, 0.0), (1000, 0.05), (20000, 0.1), (31000, 0.2))])
  exact = structure.symmetric_rmsd(pred, ref, shuffled)
  fast = structure.sample_structure_metrics(z, bonds, pred, ref)["rmsd_sym"]
  np.testing.assert_allclose(fast, exact, atol=1e-9)
  assert fast[0] < 1e-7 and structure.kabsch_rmsd(pred[0], ref) > 0.3


def test_bond_length_and_distance_matrix_known_values():
  ref = np.array([[0, 0, 0], [1.0, 0, 0], [2.5, 0, 0]])
  pred = np.array([[0, 0, 0], [1.1, 0, 0], [2.4, 0, 0]])
  bonds = np.array([[0, 1], [1, 2]])
  # bonds: |1.1-1.0|, |1.3-1.5| -> 0.15; pairs add |2.4-2.5| -> (0.1+0.2+0.1)/3.
  np.testing.assert_allclose(structure.bond_length_mae(pred, ref, bonds), 0.15)
  np.testing.assert_allclose(structure.distance_matrix_mae(pred, ref), 0.4 / 3)
  np.testing.assert_allclose(structure.distance_matrix_mae(np.stack([pred, ref]), ref), [0.4 / 3, 0])


def test_aggregate_over_samples_mean_min_and_nan():
  z, bonds, _, ref = _embedded("CCO")
  rng = np.random.default_rng(3)
  samples = ref + rng.normal(size=(4,) + ref.shape) * np.array([0.02, 0.1, 0.2, 0.3])[:, None, None]
  per_sample = structure.sample_structure_metrics(z, bonds, samples, ref)
  agg = structure.molecule_structure_metrics(z, bonds, samples, ref)
  for name in structure.STRUCTURE_METRICS:
    assert agg[f"{name}_mean"] == pytest.approx(per_sample[name].mean())
    assert agg[f"{name}_min"] == pytest.approx(per_sample[name].min())
  assert agg["rmsd_min"] == pytest.approx(per_sample["rmsd"][0])
  assert structure.aggregate_samples({"x": np.array([np.nan, 2.0, 4.0])}) == {"x_mean": 3.0, "x_min": 2.0}
  with pytest.raises(ValueError, match="expected pred"):
    structure.sample_structure_metrics(z, bonds, samples[:, :-1], ref)


# ----------------------------------------------------------------------------------- stats


def test_paired_shift_detected_and_identical_arms_not():
  rng = np.random.default_rng(4)
  base = rng.gamma(2.0, 0.1, size=60)
  better = base - 0.03 + rng.normal(size=60) * 0.01
  c = stats.paired_comparison(better, base)
  assert c.p_ttest < 1e-6 and c.p_wilcoxon < 1e-6 and c.frac_lower > 0.9
  assert c.ci_low < -0.03 + 0.01 < 0 and c.ci_high < 0 and c.ci_low < c.mean_diff < c.ci_high
  same = stats.paired_comparison(base, base)
  assert (same.p_ttest, same.p_wilcoxon, same.mean_diff, same.frac_lower) == (1.0, 1.0, 0.0, 0.5)
  noise = stats.paired_comparison(base + rng.normal(size=60) * 0.01, base + rng.normal(size=60) * 0.01)
  assert noise.p_ttest > 0.01 and noise.ci_low < 0 < noise.ci_high


def test_nan_pairwise_deletion():
  a = np.array([1.0, np.nan, 3.0, 4.0, np.nan, 6.0, 7.0])
  b = np.array([2.0, 2.0, np.nan, 5.0, np.nan, 8.0, 7.5])
  c = stats.paired_comparison(a, b)
  assert (c.n, c.n_dropped) == (4, 3)
  assert c.mean_diff == pytest.approx(np.mean([-1.0, -1.0, -2.0, -0.5]))
  assert json.dumps(stats.paired_comparison([np.nan], [1.0]).to_json())  # NaN -> null


def test_seed_aggregation():
  s = stats.seed_summary([[1.0, 1.0], [2.0, np.nan], [3.0, 3.0]])
  assert (s.mean, s.std, s.n_seeds, s.n_failed) == (2.0, 1.0, 3, 1)
  a = [[1.0, 2.0, 3.0, 4.0], [1.2, 2.2, np.nan, 4.2]]
  b = [[2.0, 3.5, 4.0, 5.0]]
  c = stats.compare_over_seeds(a, b)
  assert (c.n, c.n_dropped) == (3, 1) and c.mean_diff == pytest.approx(np.mean([-0.9, -1.4, -0.9]))


# ----------------------------------------------------------------------------------- physics


def test_model_diagnostics():
  m = physics.model_energy_metrics(np.array([-1.0, 1.0, 2.0]), 0.0)
  assert m["egap_phi_mean"] == pytest.approx(2 / 3) and m["egap_phi_min"] == -1.0
  assert m["below_ref_frac"] == pytest.approx(1 / 3)
  rng = np.random.default_rng(5)
  acc = [rng.normal(size=(n, 3)) for n in (3, 5, 8)]
  half = physics.force_diagnostic([0.5 * f for f in acc], acc)
  assert half.fraction_explained == pytest.approx(0.75)
  np.testing.assert_allclose(half.per_molecule["fraction_explained"], 0.75)
  assert half.rmse == pytest.approx(0.5 * half.rms_accurate) and half.n_atoms == 16
  zero = physics.force_diagnostic([np.zeros_like(f) for f in acc[:2]] + [np.full((8, 3), np.nan)], acc)
  assert zero.fraction_explained == pytest.approx(0.0) and zero.n_skipped == 1
  assert zero.rmse == pytest.approx(zero.rms_accurate)
  assert json.dumps(zero.to_json())


@pytest.fixture(scope="module")
def xtb_minimum():
  """Ethanol relaxed with GFN2-xTB from its MMFF structure, as a record with the reference minimum."""
  from consist.levels import get_level  # pylint: disable=g-import-not-at-top
  z, bonds, orders, mmff = _embedded("CCO")
  relaxed = get_level("gfn2-xtb").relax(z, mmff, fmax=0.005)
  assert relaxed.converged
  return MoleculeRecord(mol_id="ethanol", atomic_numbers=z, positions=mmff, smiles="CCO",
                        bonds=bonds, bond_orders=orders, ref_positions=relaxed.positions,
                        ref_fidelity="gfn2-xtb", ref_energy=relaxed.energy).validate()


def test_accurate_metrics_with_gfn2_xtb_in_a_pool(xtb_minimum):
  rec = xtb_minimum
  kicked = rec.ref_positions + np.random.default_rng(6).normal(size=rec.ref_positions.shape) * 0.05
  pred = np.stack([rec.ref_positions, kicked, rec.positions])
  own = physics.AccurateJob.from_record(rec, pred, "gfn2-xtb")
  assert own.ref_energy == rec.ref_energy
  recomputed = physics.AccurateJob.from_record(rec.replace(ref_energy=None), pred, "gfn2-xtb")
  uranium = physics.AccurateJob(mol_id="U2", atomic_numbers=np.array([92, 92]),
                                pred_positions=np.array([[[0, 0, 0], [0, 0, 2.5]]], float),
                                ref_positions=np.array([[0, 0, 0], [0, 0, 2.4]]))
  seen = []
  out = physics.evaluate_accurate([own, uranium, recomputed], "gfn2-xtb", workers=2,
                                  progress=lambda done, total: seen.append((done, total)))
  assert [r.mol_id for r in out] == ["ethanol", "U2", "ethanol"] and seen[-1] == (3, 3)
  for r in (out[0], out[2]):
    assert not r.failures
    assert abs(r.energy_gap[0]) < 1e-6          # the reference minimum against itself
    assert r.force_max[0] < 0.006               # relaxed to fmax 0.005 eV/Å
    assert r.energy_gap[1] > 0.01 and r.force_max[1] > 0.3   # a 0.05 Å kick
    assert r.energy_gap[2] > 0                  # the MMFF structure lies above the GFN2-xTB minimum
    assert r.force_rms[1] < r.force_max[1]
  np.testing.assert_allclose(out[0].energy_gap, out[2].energy_gap, atol=1e-6)
  assert np.isnan(out[1].energy_gap).all() and "element not supported" in out[1].failures[0]
  metrics = out[0].metrics()
  assert metrics["energy_gap_min"] == pytest.approx(out[0].energy_gap.min())


# ----------------------------------------------------------------------------------- report


def _fake_results(n_mol=25):
  """Synthetic per-molecule numbers with a known effect: consistency arms have lower RMSD."""
  rng = np.random.default_rng(7)
  base = rng.gamma(2.0, 0.05, size=n_mol)
  e_ref = rng.normal(size=n_mol) * 50 - 300
  arms = {}
  for arm, shift in (("multitask", 0.0), ("multitask+forces", 0.0), ("consistency", -0.03),
                     ("consistency+forces", -0.04)):
    arms[arm] = {}
    for seed in ("0", "1", "2"):
      arms[arm][seed] = {}
      for mode in ("denoise", "refine"):
        rmsd = np.maximum(base + shift + rng.normal(size=n_mol) * 0.005, 0.0).tolist()
        rmsd[3] = None  # a failed molecule
        arms[arm][seed][mode] = {
            "rmsd_sym_mean": rmsd,
            "energy_gap_mean": (base * 2 + shift + rng.normal(size=n_mol) * 0.01).tolist(),
            "e_phi_pred_mean": (e_ref + rng.normal(size=n_mol) * 0.1).tolist(),
            "e_phi_ref": e_ref.tolist(),
        }
  baselines = {"cheap": {"rmsd_sym_mean": base.tolist(), "energy_gap_mean": (base * 2).tolist()},
               "etkdg": {"rmsd_sym_mean": (base * 3).tolist()}}
  return report.Results(mol_ids=[f"m{i}" for i in range(n_mol)], arms=arms, baselines=baselines,
                        meta={"command": "pytest", "machine": "test"})


def test_report_files_table_and_statistics(tmp_path):
  results = _fake_results()
  written = report.write_report(results, tmp_path)
  names = sorted(p.name for p in written)
  assert names == ["energy_gap.png", "ephi_gap.png", "results.md", "rmsd_ecdf.png", "summary.json"]
  for p in written:
    assert p.stat().st_size > 500, p
  md = (tmp_path / "results.md").read_text()
  for arm in list(results.arms) + ["cheap (baseline)", "etkdg (baseline)"]:
    assert f"| {arm} |" in md, arm
  for metric in ("rmsd_sym_mean", "energy_gap_mean"):
    assert f"`{metric}`" in md
  assert "e_phi_ref" not in md.split("## Mode")[1]  # absolute energies are plotted, not tabled
  summary = json.loads((tmp_path / "summary.json").read_text())
  refine = summary["modes"]["refine"]
  assert refine["table"]["consistency"]["rmsd_sym_mean"]["n_seeds"] == 3
  assert refine["table"]["consistency"]["rmsd_sym_mean"]["n_failed"] == 3
  vs_mt = refine["vs_multitask"]["consistency"]["rmsd_sym_mean"]
  assert vs_mt["p_wilcoxon"] < 1e-3 and vs_mt["mean_diff"] < 0 and vs_mt["n_dropped"] == 1
  assert refine["vs_multitask"]["multitask+forces"]["rmsd_sym_mean"]["p_ttest"] > 1e-3
  assert "multitask" not in refine["vs_multitask"]
  assert refine["vs_cheap"]["consistency+forces"]["energy_gap_mean"]["mean_diff"] < 0


def test_results_json_roundtrip_and_validation(tmp_path):
  results = _fake_results(5)
  results.arms["consistency"]["1"]["denoise"]["rmsd_sym_mean"][0] = float("nan")
  results.save(tmp_path / "results.json")
  loaded = report.Results.load(tmp_path / "results.json")
  assert loaded.arms["consistency"]["1"]["denoise"]["rmsd_sym_mean"][0] is None
  assert loaded.mol_ids == results.mol_ids and loaded.modes() == ["denoise", "refine"]
  results.arms["multitask"]["2"]["refine"]["energy_gap_mean"].pop()
  with pytest.raises(ValueError, match="'multitask' seed '2' mode 'refine' metric 'energy_gap_mean'"):
    results.validate()


def test_connectivity_valid_is_the_perceived_bond_graph():
  """Valid: RDKit's bonds from the coordinates alone are the graph; a stretched C-O is not."""
  mol = Chem.AddHs(Chem.MolFromSmiles("CCO"))
  AllChem.EmbedMolecule(mol, randomSeed=1)
  AllChem.MMFFOptimizeMolecule(mol)
  z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()])
  bonds = np.array([sorted((b.GetBeginAtomIdx(), b.GetEndAtomIdx())) for b in mol.GetBonds()])
  good = mol.GetConformer().GetPositions()
  o = int(np.flatnonzero(z == 8)[0])
  stretched = good.copy()
  stretched[o] += 1.5 * (good[o] - good[1]) / np.linalg.norm(good[o] - good[1])
  valid = structure.connectivity_valid(z, bonds, np.stack([good, stretched]))
  assert valid.tolist() == [True, False]


def test_short_table_has_one_row_per_mode_and_arm_and_each_baseline_once():
  results = _fake_results()
  summary = report.summarise(results)
  lines = report.short_table(summary).splitlines()
  assert "RMSD (Å)" in lines[0] and "GFN2 gap (eV)" in lines[0] and "valid" in lines[0]
  rows = lines[2:]
  assert len(rows) == 2 * len(results.arms) + 2  # modes x arms, then cheap and etkdg once
  cheap = np.nanmean(results.baselines["cheap"]["rmsd_sym_mean"])
  assert rows[-2].split()[0] == "cheap" and f"{cheap:.4g}" in rows[-2]
  assert rows[-1].split()[-1] == "–"  # etkdg has no valid_frac here

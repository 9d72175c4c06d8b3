"""The MACE peer's data exporter (consist.bench.peer_data): layout, units, subsetting. No torch."""

import importlib.util

import numpy as np
import pytest

from consist.bench import peer_data
from consist.data.store import open_dataset

SMOKE = "data/smoke"


def test_export_matches_the_store(tmp_path):
  out = tmp_path / "energy.npz"
  counts = peer_data.export_energy_data(SMOKE, str(out))
  dataset = open_dataset(SMOKE)
  with np.load(out) as d:
    assert sorted(d.files) == sorted(f"{s}_{k}" for s in ("train", "test")
                                     for k in ("numbers", "positions", "n_atoms", "energy",
                                               "forces"))
    for split in ("train", "test"):
      store = dataset[split]
      labelled = [store[i] for i in range(len(store))
                  if store[i].energy is not None and store[i].forces is not None]
      assert counts[split] == len(labelled) > 0
      assert d[f"{split}_numbers"].dtype == np.int32 and d[f"{split}_n_atoms"].dtype == np.int32
      for k in ("positions", "energy", "forces"):
        assert d[f"{split}_{k}"].dtype == np.float64
      n_atoms = d[f"{split}_n_atoms"]
      assert n_atoms.tolist() == [r.n_atoms for r in labelled]
      total = int(n_atoms.sum())
      assert d[f"{split}_numbers"].shape == (total,)
      assert d[f"{split}_positions"].shape == d[f"{split}_forces"].shape == (total, 3)
      starts = np.concatenate([[0], np.cumsum(n_atoms)])
      for j in (0, len(labelled) - 1):
        rec, sl = labelled[j], slice(starts[j], starts[j + 1])
        np.testing.assert_array_equal(d[f"{split}_numbers"][sl], rec.atomic_numbers)
        np.testing.assert_array_equal(d[f"{split}_positions"][sl], rec.positions)  # Å
        np.testing.assert_array_equal(d[f"{split}_forces"][sl], rec.forces)  # eV/Å
        assert d[f"{split}_energy"][j] == rec.energy  # eV


def test_max_train_keeps_a_seeded_subset_and_all_of_test(tmp_path):
  a, b = tmp_path / "a.npz", tmp_path / "b.npz"
  full = peer_data.export_energy_data(SMOKE, str(tmp_path / "full.npz"))
  counts = peer_data.export_energy_data(SMOKE, str(a), max_train=10, seed=3)
  peer_data.export_energy_data(SMOKE, str(b), max_train=10, seed=3)
  assert counts == {"train": 10, "test": full["test"]}
  with np.load(a) as da, np.load(b) as db:
    for k in da.files:
      np.testing.assert_array_equal(da[k], db[k])
    assert da["train_numbers"].shape == (int(da["train_n_atoms"].sum()),)


def test_missing_interpreter_is_one_clear_error(tmp_path):
  with pytest.raises(peer_data.PeerError, match="not found"):
    peer_data.run_peer_mace(str(tmp_path / "x.npz"), 1, 1, python=str(tmp_path / "no_python"))


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None
                    and importlib.util.find_spec("mace") is not None,
                    reason="this interpreter has torch and mace")
def test_interpreter_without_torch_names_the_install(tmp_path):
  with pytest.raises(peer_data.PeerError, match=r"pip install -e '\.\[peer\]'"):
    peer_data.run_peer_mace(str(tmp_path / "x.npz"), 1, 1, log=lambda line: None)

"""notebooks/ablations.ipynb executes top to bottom on the smoke config (QUICK = True)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "ablations.ipynb"


@pytest.mark.slow
def test_ablations_notebook_executes(tmp_path, monkeypatch):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  params = nb.cells[1]
  assert "parameters" in params.metadata.get("tags", []) and "QUICK = True" in params.source
  params.source = params.source.replace("WORKDIR = None", f"WORKDIR = {str(tmp_path / 'runs')!r}")
  monkeypatch.setenv("XLA_FLAGS", "")  # the kernel runs on one CPU device, as a user's would
  monkeypatch.setenv("OMP_NUM_THREADS", "1")
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "\n".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
  for title in ("Consistency weights", "kT (eV) and t_min", "stationarity", "structure head only", "All runs"):
    assert title in text, title
  assert any("image/png" in o.get("data", {}) for o in outputs)
  runs = {p.name for p in (tmp_path / "runs").iterdir() if (p / "checkpoints").is_dir()}
  assert runs == {"stage1", "default", "w_opt=0.0 w_score=0.0", "kT=0.1 t_min=0.01", "descent", "head+encoder"}

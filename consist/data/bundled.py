"""Where the datasets that ship with the repository live (built by `python -m launch.build_dataset`)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# MMFF94 structures, GFN2-xTB energies/forces, GFN2-xTB reference minima for val/test (issue 3).
BUNDLED_DATASET = REPO_ROOT / "data" / "bundled"
# A tiny subset of the bundled dataset for tests and the `smoke` config.
SMOKE_DATASET = REPO_ROOT / "data" / "smoke"
# The pretrained model trained by `launch.train` on the bundled dataset (default of launch.predict).
PRETRAINED_MODEL = REPO_ROOT / "models" / "pretrained"
# The structure model's stage 1 on the pretrained energy model (configs/pretrained.py:structure):
# what the demo's and the reproduction's stage-2 arms start from.
STRUCTURE_STAGE1 = REPO_ROOT / "models" / "structure_stage1"

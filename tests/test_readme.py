"""The README's first commands tell a new user what they do before they run them."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _first_section() -> str:
  text = (REPO / "README.md").read_text()
  return text[:text.index("\n## ")]


def test_make_demo_says_where_it_installs_from_and_how_long_it_takes():
  head = _first_section()
  assert re.search(r"^make demo", head, re.M) and re.search(r"^make test", head, re.M)
  prose = " ".join(head.split())
  assert ".venv" in prose and "package index" in prose and "pip install" in prose
  assert re.search(r"make demo` then takes about \d+(-\d+)? minutes on a 2-core CPU", prose)
  makefile = (REPO / "Makefile").read_text()
  assert "VENV := .venv" in makefile and "pip install" in makefile  # what the README says is what it does


def test_readme_documents_training_on_converted_data():
  text = " ".join((REPO / "README.md").read_text().split())
  assert "--split_fractions 0.9,0.05,0.05" in text
  assert "python -m launch.train --config configs/quickstart.py --workdir runs/mine --config.data.path=data/mine" in text

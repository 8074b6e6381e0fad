# genecorpus — every target creates what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
HASH   := $(shell cat pyproject.toml | cksum | cut -d' ' -f1)
CORE   := $(VENV)/.core-$(HASH)
FULL   := $(VENV)/.installed-$(HASH)

.PHONY: demo example test test-all bench venv clean gene-tables

# the core install (build a corpus) for the demo; the extras (tests, Dask, training, TileDB-SOMA) for everything else
venv: $(FULL)

$(CORE): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e .
	rm -f $(VENV)/.core-*
	touch $(CORE)

$(FULL): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,dask,train,soma]'
	rm -f $(VENV)/.installed-* $(VENV)/.core-*
	touch $(FULL) $(CORE)

demo: $(CORE)
	$(PY) examples/demo.py

# Kang 2018 PBMC + demo data: build, pretrain `small` on the CPU for MINUTES, embed, evaluate vs the baseline
MINUTES ?= 20
example: venv
	$(PY) examples/kang_pretrain.py --minutes $(MINUTES)

# style (ruff), the one-way import graph (import-linter contracts in pyproject.toml), then the suite
# without the tests marked slow (heavy cases whose property cheaper tests also check), TEST_WORKERS
# pytest processes each taking whole test files (module fixtures are built once)
PYTEST_MARKS ?= not slow
TEST_WORKERS ?= 2
test: venv
	$(VENV)/bin/ruff check src tests benchmarks examples scripts
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q -m "$(PYTEST_MARKS)" -n $(TEST_WORKERS) --dist loadfile

# the whole suite, slow tests included
test-all:
	$(MAKE) test PYTEST_MARKS=

bench: venv
	$(PY) benchmarks/run.py $(if $(QUICK),--quick,)

gene-tables: venv
	$(PY) scripts/make_gene_tables.py

clean:
	rm -rf $(VENV) demo-out example-out .pytest_cache

# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || echo python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# the driver of `make django-suite` / `django-suite-stock`: psycopg2 or psycopg
DRIVER ?= psycopg2

.PHONY: help venv test test-fast test-pyuwsgi fuzz demo bench bench-quick bench-micro bench-growth django-suite django-suite-stock clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	PYTHON=$(PYTHON) devtools/system-deps.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(STAMP)  ## create .venv with the package and its test extras

test: $(STAMP)  ## run the whole test suite against a throwaway PostgreSQL (or DATABASE_URL)
	$(PY) -m pytest -q

test-pyuwsgi: $(STAMP)  ## tests/test_pyuwsgi.py with uWSGI from a wheel (pyuwsgi, no compiler), in a venv of its own
	test -x .cache/venv-pyuwsgi/bin/python || $(PYTHON) -m venv .cache/venv-pyuwsgi
	.cache/venv-pyuwsgi/bin/python -m pip install -q -e '.[pyuwsgi,psycopg2]' pytest
	.cache/venv-pyuwsgi/bin/python -m pytest -q tests/test_pyuwsgi.py

fuzz: $(STAMP)  ## fuzz the live ledger longer than CI does (FUZZ_MUTATIONS, default 20000: about 9 min)
	FUZZ_MUTATIONS=$${FUZZ_MUTATIONS:-20000} $(PY) -m pytest -q -s tests/test_fuzz.py

demo: $(STAMP)  ## the demo: gunicorn workers > budget under load, sharedpool vs the stock backend (about 2 min)
	$(PY) examples/demo/run_demo.py

test-fast: $(STAMP)  ## the suite without the slow real-process tests
	$(PY) -m pytest -q -m 'not slow'

bench: $(STAMP)  ## full benchmark (~30 min): 6 strategies x S1-S5, 3 interleaved repetitions; JSON + PNGs in bench/results/
	VENV=$(VENV) PYTHON=$(PYTHON) bash bench/setup.sh
	$(PY) bench/run.py
	$(PY) bench/plot.py

bench-quick: $(STAMP)  ## short benchmark (2 s runs) of the same scenarios
	VENV=$(VENV) PYTHON=$(PYTHON) bash bench/setup.sh
	$(PY) bench/run.py --quick
	$(PY) bench/plot.py

bench-micro: $(STAMP)  ## in-process micro-benchmarks: warm checkout + return, permit acquire + release
	VENV=$(VENV) PYTHON=$(PYTHON) bash bench/setup.sh
	$(PY) bench/bench_checkout.py
	$(PY) bench/bench_permits.py

bench-growth: $(STAMP)  ## how costs grow with workers: hot paths and coordinator CPU at 8-256 workers, mass SIGKILL, 200 workers (~3 min)
	VENV=$(VENV) PYTHON=$(PYTHON) bash bench/setup.sh
	$(PY) bench/bench_growth.py

django-suite: $(STAMP)  ## Django 5.2's own tests (backends transactions transaction_hooks select_for_update basic queries) on the sharedpool ENGINE; DRIVER=psycopg2 (default) or psycopg
	PYTHON=$(PYTHON) scripts/django_suite.sh --engine sharedpool --driver $(DRIVER)

django-suite-stock: $(STAMP)  ## the same Django tests on the stock postgresql backend, for comparison (same DRIVER)
	PYTHON=$(PYTHON) scripts/django_suite.sh --engine stock --driver $(DRIVER)

clean:  ## remove the venvs and caches (.venv, .cache with the Django sdist and its venv)
	rm -rf $(VENV) .cache .pytest_cache *.egg-info

# Every target creates the virtual environment first when it is missing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch pinned to the build this project is tested with; `make install TORCH="torch torchvision"` for another
TORCH  ?= torch==2.14.1 torchvision==0.29.1
# the exact version of every dependency the suite last passed with (written by `make lock`)
LOCK   := constraints.txt
# a throwaway environment with the newest release of every dependency (`make test-latest`, `make lock`)
LATEST ?= .venv-latest
ARGS   ?=
# pytest-xdist workers: auto = one per CPU core (the suite is mostly interpreter start-up and
# single-threaded end-to-end runs, so two workers on two cores take about half the time)
WORKERS ?= auto

.PHONY: install demo test test-fast test-latest lock mutants lint bench clean

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c $(LOCK) $(TORCH)
	$(BIN)/python -m pip install -q -c $(LOCK) -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install  ## CNN on MNIST 0-5 vs held-out digits and noise, CPU, ~3-4 minutes; prints the table
	$(BIN)/python train.py $(ARGS)

test: install  ## the whole CPU suite (CI runs this)
	$(BIN)/python -m pytest -q -n $(WORKERS) $(ARGS)

test-fast: install  ## unit tests only, no end-to-end runs
	$(BIN)/python -m pytest -q -n $(WORKERS) -m "not slow" $(ARGS)

mutants: install  ## curated wrong implementations of the papers' methods, each must fail its named tests (tests/mutations/); ARGS=--fast for the CI subset
	$(BIN)/python tests/mutations/mutants.py $(ARGS)

test-latest:  ## the whole suite against the newest release of every dependency, in a fresh $(LATEST)
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q $(TORCH)
	$(LATEST)/bin/python -m pip install -q -e ".[test]"
	$(LATEST)/bin/python -m pytest -q -n $(WORKERS) $(ARGS)

lock: test-latest  ## once the suite passes on the newest releases, their exact versions become the lock
	{ echo "# Exact versions the suite passed with (make lock; make install uses them as pip constraints)."; \
	  $(LATEST)/bin/python -m pip freeze --exclude-editable; } > $(LOCK)
	rm -rf $(LATEST)

lint: install  ## ruff, and the import contract in pyproject.toml (layers, no cycles; docs/architecture.md)
	$(BIN)/ruff check ood_lightning tests benchmarks sweeps train.py evaluate.py
	$(BIN)/lint-imports

bench: install  ## train images/s: plain PyTorch vs Lightning classifier vs DHM (tiny model on CPU); docs/performance.md
	$(BIN)/python benchmarks/throughput.py $(ARGS)

clean:
	rm -rf outputs .pytest_cache .ruff_cache

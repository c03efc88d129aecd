# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv on first use and install the pinned dependencies (constraints.txt).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup demo test test-all lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install vlmzip with pinned dependencies

demo: $(STAMP)  ## the main job on the embedded default model
	$(BIN)/vlmzip demo

test: $(STAMP)  ## the default test suite (slow checks excluded)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)  ## every test, slow ones included
	$(BIN)/python -m pytest -q -m "slow or not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests recipes
	$(BIN)/ruff format --check src tests recipes

bench: $(STAMP)  ## tower timing: plain sdpa vs compress_vision vs eager attention maps
	$(BIN)/vlmzip bench-tower

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache

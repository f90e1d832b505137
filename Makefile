# Two commands do all set-up on a fresh machine: `make test` and `make demo`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: install test demo bench-engine bench-runtimes clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,compress,bench]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/mirror-deploy demo

# Figures of the engine and the runtimes on random models (A/B interleaved, medians).
bench-engine: $(STAMP)
	$(BIN)/python -m mirror_deploy.bench.engine

bench-runtimes: $(STAMP)
	$(BIN)/python -m mirror_deploy.bench.runtimes

clean:
	rm -rf $(VENV) artifacts .pytest_cache

# The README's two commands: `make demo` (the main job) and `make test` (the test suite).
# torch==2.13.0 is installed first: it is the local CPU wheel; any other spec would pull CUDA builds.
# The executorch extra (the .pte target) is part of the test install: its tests run in `make test` and CI.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgekd-installed

.PHONY: demo test test-fast setup clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,executorch]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/edgekd run

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) exported/*/

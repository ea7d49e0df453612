# Everything a fresh machine needs: `make demo` runs the demo end to end, `make test` the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU wheel of this version is what these machines install; GPU users may override, e.g.
# make TORCH=torch install   (any torch>=2.2 satisfies the package itself).
TORCH ?= torch==2.13.0

.PHONY: install test demo demo-data bench clean

$(BIN)/.fmerge-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.fmerge-installed

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info

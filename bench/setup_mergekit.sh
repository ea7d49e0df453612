#!/usr/bin/env bash
# mergekit (from PyPI) in its own virtualenv for bench/merge.py, on the CPU torch wheel fmerge uses.
set -euo pipefail
cd "$(dirname "$0")"
TORCH="${TORCH:-torch==2.13.0}"
MERGEKIT="${MERGEKIT:-mergekit==0.1.5}"
python3 -m venv .venv-mergekit
.venv-mergekit/bin/python -m pip install -q --upgrade pip
.venv-mergekit/bin/python -m pip install -q "$TORCH" "$MERGEKIT"
.venv-mergekit/bin/mergekit-yaml --help > /dev/null && echo "mergekit ready: $(.venv-mergekit/bin/pip show mergekit | grep ^Version)"

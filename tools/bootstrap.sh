#!/usr/bin/env bash
# Create the project venv and install edge-agent with the extras asked for (default: dev).
set -euo pipefail
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
EXTRAS="${EXTRAS:-dev}"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else return 1; fi; }

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "bootstrap: $PYTHON not found; run: sudo apt-get install python3 python3-venv" >&2
    exit 1
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "bootstrap: Python >= 3.10 is needed, $("$PYTHON" --version) found" >&2
    exit 1
fi
if ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    if as_root true; then
        echo "bootstrap: installing python3-venv with apt"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
    else
        echo "bootstrap: the venv module is missing; run: sudo apt-get install python3-venv" >&2
        exit 1
    fi
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "bootstrap: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
echo "bootstrap: installing edge-inference-agent[$EXTRAS] into $VENV"
"$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"

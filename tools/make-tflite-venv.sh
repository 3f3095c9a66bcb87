#!/usr/bin/env bash
# Build the venv used to test the tflite-runtime fallback (tflite-runtime 2.14 needs NumPy < 2).
# When no tflite-runtime wheel exists for this Python/platform, record why: the test reports it
# (and fails under CI=true instead of skipping silently).
set -uo pipefail
PYTHON="${1:-python3}"
VENV="${2:-.venv-tflite}"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV" || exit 1
if ! "$VENV/bin/python" -m pip install -q "numpy<2" tflite-runtime -e . 2> "$VENV/install.log"; then
    echo "make-tflite-venv: tflite-runtime could not be installed here (see $VENV/install.log)" >&2
    echo "tflite-runtime could not be installed for $("$PYTHON" --version 2>&1) on $(uname -m)" > "$VENV/UNAVAILABLE"
fi
exit 0

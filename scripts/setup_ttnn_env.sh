#!/usr/bin/env bash
# Builds the environment for the tests that run ttnn for real (pytest -m ttnn): ttnn publishes wheels for
# CPython 3.10 and 3.12 only, so this makes a venv from one of those next to the project's own Python.
#
#   scripts/setup_ttnn_env.sh [VENV_DIR]        (default .venv-ttnn)
#   VENV_DIR/bin/python -m pytest -q -m ttnn tests/workers
#
# PYTHON=/path/to/python3.12 picks the interpreter; otherwise the first 3.12 or 3.10 found on PATH or in pyenv.
# Torch for 3.12 comes from PyPI as its CUDA build (about 3 GB with its nvidia packages; it runs on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-ttnn}

find_python() {
    local candidate
    for candidate in "${PYTHON:-}" python3.12 python3.10 "$HOME"/.pyenv/versions/3.12*/bin/python "$HOME"/.pyenv/versions/3.10*/bin/python; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] not in ((3, 10), (3, 12)))' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

python=$(find_python) || { echo "setup_ttnn_env: no Python 3.10 or 3.12 found (ttnn has wheels for no other); set PYTHON=" >&2; exit 1; }
began=$SECONDS
"$python" -m venv "$VENV"
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$VENV/bin/pip" install -q "torch==2.13.0" -e ".[ttnn,test]"
echo "setup_ttnn_env: $("$VENV/bin/python" --version) with ttnn in $VENV, $((SECONDS - began)) s" >&2
echo "run: $VENV/bin/python -m pytest -q -m ttnn tests/workers" >&2

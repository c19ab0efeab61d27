#!/usr/bin/env bash
# Create the ORACLE virtualenv (.venv-oracle) used by herd's parity tests.
#
# llama-models' image preprocessing and chat format import torchvision, which does not
# import beside the project's pinned CPU torch 2.13. The oracle therefore lives in its own
# venv with torch 2.14.1 + torchvision 0.29.1 (both installed from this machine's local
# wheel store through pip's constraint file) and llama-models 0.3.0. Tests in the main venv
# run tests/oracle/*.py with .venv-oracle/bin/python and compare herd's outputs with it.
#
# Idempotent: re-running with a complete venv does nothing (a stamp file records success).
# Usage: scripts/oracle_env.sh [VENV_DIR]     (default: .venv-oracle at the repo root)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${1:-.venv-oracle}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
STAMP="$VENV/.oracle-installed"
# Pixel parity needs the very same Pillow as the main venv (resampling code differs across
# releases): pin it when .venv exists.
PILLOW="pillow"
if [ -x .venv/bin/python ]; then
    PILLOW="pillow==$(.venv/bin/python -c 'import PIL; print(PIL.__version__)' 2>/dev/null || echo 13.0.0)"
fi
REQS=(
    "torch==2.14.1"
    "torchvision==0.29.1"
    "llama-models==0.3.0"
    "$PILLOW"
    "numpy"
    "tiktoken"
    "blobfile"
)
WANT="${REQS[*]}"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x "$VENV/bin/python" ]; then
    echo "oracle env ready: $VENV"
    exit 0
fi

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "${REQS[@]}"
# Smoke test: the modules the oracle scripts need must import.
"$VENV/bin/python" -c "import torch, torchvision, llama_models.llama4.chat_format, llama_models.llama4.preprocess"
echo "$WANT" > "$STAMP"
echo "oracle env ready: $VENV"

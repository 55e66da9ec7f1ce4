#!/usr/bin/env bash
# The first thing to run on a lent GPU machine (a copy of the working tree, no internet): installs
# what is missing, runs the CUDA and kernel tests natively, the decode-attention bandwidth grid,
# batch-1 decode against the roofline (with and without CUDA graphs) and the bf16 offline
# throughput, each under its own timeout and all within about 8 minutes, and writes every figure
# to one JSON file ($OUT/gpu_check.json when OUT is set, else ./gpu_check.json).
# Without a GPU it skips the CUDA parts and runs the rest in a tiny mode.
#
#   benchmarks/gpu_check.sh [--tiny] [--parts a,b] [--budget-s 450] [--output PATH]
#   benchmarks/gpu_check.sh --fetch-wheels   # here, with a registry: wheels for the GPU image
#
# The GPU image has torch and triton but none of the project's messaging and HTTP packages and
# no registry: --fetch-wheels saves them as Python 3.12 manylinux wheels into .whl/ (ignored by
# git); carry .whl to the GPU machine and the check installs them from there.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# The interpreter: $PYTHON, else the project's venv when it has torch, else the system python3
# (on the GPU image, the one that holds the CUDA build of torch).
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ] && .venv/bin/python -c 'import torch' 2>/dev/null; then
        PY=.venv/bin/python
    else
        PY=python3
    fi
fi

# Distributions the GPU image lacks, pinned to the versions this interpreter has.
WHEELS=(msgspec pyzmq fastapi starlette uvicorn pydantic pydantic-core annotated-types typing-inspection xgrammar)

if [ "${1:-}" = "--fetch-wheels" ]; then
    mapfile -t SPECS < <("$PY" -c 'import importlib.metadata as m, sys
for d in sys.argv[1:]: print(f"{d}=={m.version(d)}")' "${WHEELS[@]}")
    PLATFORMS=()
    for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
        PLATFORMS+=(--platform "${p}_x86_64")
    done
    mkdir -p .whl
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d .whl "${SPECS[@]}"
    du -sh .whl
    exit 0
fi

exec "$PY" benchmarks/gpu_check.py "$@"

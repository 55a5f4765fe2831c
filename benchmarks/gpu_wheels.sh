#!/usr/bin/env bash
# Wheels the GPU check needs beside torch and numpy (which the lent GPU machine has), for the Pythons such a
# machine may run, into .gpu-wheels/ (git ignores it; `device` carries it). Run it here, where the package
# index is reachable; on the GPU machine:
#   pip install -q --no-index --find-links .gpu-wheels pydantic pyyaml
#   PYTHONPATH=platform python benchmarks/gpu_check.py --out "$OUT"
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu-wheels
for version in 3.10 3.11 3.12 3.13; do
    python3 -m pip download -q --dest .gpu-wheels --only-binary=:all: --python-version "$version" \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        "pydantic>=2.7" "pyyaml>=6"
done
du -sh .gpu-wheels

#!/usr/bin/env bash
# Download into .whl/ (git-ignored) the wheels that benchmarks/gpu_bench.sh installs on a GPU machine without
# network access. Run here, from any directory, with network access to PyPI:
#
#   bash benchmarks/fetch_wheels.sh
#
# The benchmarks import only the model, loss, encoders, schedulers, pipeline and EMA (the package's exports are lazy,
# so datasets, peft, evaluate, ... are never imported). On a machine with only torch, transformers and accelerate
# they need diffusers and the few dependencies of diffusers those three do not bring: a few MiB, well inside one
# device call's 64 MiB carry.
#
# Versions are pinned to the ones installed in the project's venv (tested here). The wheels are for CPython 3.12 on
# x86-64 Linux (the lent machines' python3). gpu_bench.sh installs only the ones whose distribution is missing there,
# so that packages the image already has (e.g. huggingface_hub pinned by its transformers) stay as they are.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

# diffusers and what it requires beyond torch / transformers / accelerate and their own dependencies.
PACKAGES=(diffusers importlib_metadata zipp pillow requests charset-normalizer idna urllib3 certifi)

pins=()
for name in "${PACKAGES[@]}"; do
  version=$("$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null) ||
    version=""
  if [[ -n "$version" ]]; then pins+=("$name==$version"); else pins+=("$name"); fi
done

mkdir -p .whl
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pins[@]}"
ls -1 .whl
du -sh .whl

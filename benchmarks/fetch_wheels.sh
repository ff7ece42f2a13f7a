#!/usr/bin/env bash
# Download into .whl/ (git-ignored) the wheels that benchmarks/gpu_bench.sh installs on a GPU machine without
# network access. Run here, from any directory, with network access to PyPI:
#
#   bash benchmarks/fetch_wheels.sh          # what the lent 'cuda' image lacks (a few MiB; fits a 64 MiB carry)
#   bash benchmarks/fetch_wheels.sh --all    # everything beyond torch, transformers, accelerate and their own
#                                            # dependencies (adds pyarrow, pandas, scipy, ...: about 115 MiB,
#                                            # more than the 64 MiB one call of the device tool can carry)
#
# Versions are pinned to the ones installed in the project's venv (tested here). The wheels are for CPython 3.12 on
# x86-64 Linux (the lent machines' python3). gpu_bench.sh installs only the ones whose distribution is missing there,
# so that packages the image already has (e.g. huggingface_hub pinned by its transformers) stay as they are.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

# Imported by `diffusers_repa` (through the benchmarks' imports) and missing from the lent image.
PACKAGES=(diffusers datasets dill multiprocess evaluate importlib_metadata)
if [[ "${1:-}" == "--all" ]]; then
  # Also present on the lent image, but not pulled in by torch / transformers / accelerate themselves.
  PACKAGES+=(peft pyarrow pandas python-dateutil tzdata xxhash pillow requests charset-normalizer idna urllib3
    certifi scipy zipp)
elif [[ $# -gt 0 ]]; then
  echo "usage: $0 [--all]" >&2
  exit 2
fi

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

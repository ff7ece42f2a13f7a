#!/usr/bin/env bash
# The GPU benchmark in one command, for a single H100/H200 with torch, transformers and accelerate installed and no
# network. Prepare here (network to PyPI):   bash benchmarks/fetch_wheels.sh   (fills the git-ignored .whl/)
# then run, from the repository root, with .whl/ next to it:    bash benchmarks/gpu_bench.sh
#
# It installs the wheels of .whl/ whose distribution is missing (into /tmp/site, nothing else is touched), then
# measures, most important first, each step under its own time limit so that one failure does not stop the rest:
#   1. a bf16 matmul (8192³) to calibrate the peak actually reachable on this card;
#   2. SiT-XL/2 + DINOv2-B training step, per-GPU batch 32, bf16 autocast, regional compile of the blocks and a
#      compiled encoder (the trainer's --compile), fused AdamW, foreach EMA, encoder in bf16: images/s, memory, MFU;
#   3. 250-step SDE sampling with CFG 1.8 on [0, 0.7] vs on [0, 1], batch 16, bf16, whole forward compiled and
#      replayed as CUDA graphs, with VAE decode; the eager pipeline timed in the same run;
#   4. the optimisation ladder (fp32 eager -> ... -> all of 2.), ratios measured back to back;
#   5. if time is left: sampling as 3. with regional compile, and the training step of 2. without compile (with
#      CUDNN=1, also compiled with cuDNN attention).
# All steps share a budget of BUDGET seconds (default 570, under the device's 10-minute limit per command): a step's
# limit is cut to what is left, and a step with under 30 s left is skipped.
# DINOv2-B and SD-VAE load from the HF cache when present; offline without them, random models of the same
# architecture are used (same cost). Results: $OUT (default outputs/gpu_bench) gets gpu_bench.json (all results),
# gpu_bench.md (all tables) and gpu_bench.log, updated after every step; the tables are printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_bench}
PRESET=${PRESET:-SiT-XL/2}
BATCH=${BATCH:-32}
SAMPLE_BATCH=${SAMPLE_BATCH:-16}
# Extra flags for every training / sampling run (e.g. a tiny model on the CPU to try this script without a GPU).
read -ra TRAIN_ARGS <<<"${TRAIN_ARGS:-}"
read -ra SAMPLE_ARGS <<<"${SAMPLE_ARGS:-}"
PYTHON=${PYTHON:-python3}
BUDGET=${BUDGET:-570}
RUNS=$(mktemp -d)
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_bench.log") 2>&1

missing=()
for wheel in .whl/*.whl; do
  [[ -e "$wheel" ]] || continue
  dist=$(basename "$wheel" | cut -d- -f1)
  "$PYTHON" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" 2>/dev/null || missing+=("$wheel")
done
if ((${#missing[@]})); then
  echo "Installing into /tmp/site: ${missing[*]}"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "${missing[@]}" || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
"$PYTHON" -c "import torch, transformers, diffusers; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'diffusers', diffusers.__version__)" || exit 1

collect() { # merge the results so far into $OUT/gpu_bench.json and .md (a run cut off later still returns them)
  "$PYTHON" - "$RUNS" "$OUT" <<'PY'
import json, sys
from pathlib import Path
runs, out = Path(sys.argv[1]), Path(sys.argv[2])
results = {path.parent.name: json.loads(path.read_text()) for path in sorted(runs.glob("*/*.json"))}
tables = [f"### {path.parent.name}\n\n{path.read_text()}" for path in sorted(runs.glob("*/*.md"))]
(out / "gpu_bench.json").write_text(json.dumps(results, indent=2) + "\n")
(out / "gpu_bench.md").write_text("\n".join(tables))
PY
}

step() { # step NAME SECONDS COMMAND...: run under min(SECONDS, budget left), keep going on failure, then collect
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  if ((BUDGET - SECONDS < 30)); then
    echo "=== $name skipped: $((BUDGET - SECONDS))s of the ${BUDGET}s budget left"
    return
  fi
  ((limit > BUDGET - SECONDS)) && limit=$((BUDGET - SECONDS))
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" || echo "=== $name FAILED or timed out (exit $?)"
  echo "=== $name took $((SECONDS - start))s"
  collect
}

step matmul 30 "$PYTHON" - "$RUNS/matmul" <<'PY'
import json, sys, torch
from pathlib import Path
a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))  # random, not zeros
for _ in range(3):
    a @ b
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
start.record()
for _ in range(20):
    a @ b
end.record()
torch.cuda.synchronize()
tflops = 20 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3) / 1e12
line = f"bf16 matmul 8192^3: {tflops:.0f} TFLOP/s on {torch.cuda.get_device_name()}"
print(line)
folder = Path(sys.argv[1])
folder.mkdir(parents=True)
(folder / "matmul.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "bf16_tflops": tflops}))
(folder / "matmul.md").write_text(line + "\n")
PY

FAST=(--precision bf16 --fused_adamw --foreach_ema --encoder_precision bf16)
TRAIN=("$PYTHON" -m benchmarks.train_throughput --preset "$PRESET" --batch_size "$BATCH" --warmup 3 --iterations 5
  "${TRAIN_ARGS[@]}")
SAMPLE=("$PYTHON" -m benchmarks.sampling_throughput --preset "$PRESET" --sampler sde --steps 250 --guidance_scale 1.8
  --guidance_interval 0 0.7 --batch_size "$SAMPLE_BATCH" --precision bf16 --repeats 2 "${SAMPLE_ARGS[@]}")
step train_compiled 170 "${TRAIN[@]}" "${FAST[@]}" --compile --repeats 3 --output "$RUNS/train_compiled"
step sampling_cuda_graphs 200 "${SAMPLE[@]}" --compile "${SAMPLE_COMPILE:-cuda_graphs}" --output "$RUNS/sampling"
step ablation 240 "${TRAIN[@]}" --ablate --repeats 2 --output "$RUNS/ablation"
step sampling_blocks 150 "${SAMPLE[@]}" --compile blocks --output "$RUNS/sampling_blocks"
step train_eager 90 "${TRAIN[@]}" "${FAST[@]}" --repeats 3 --output "$RUNS/train_eager"
if [[ "${CUDNN:-0}" == 1 ]]; then
  step train_compiled_cudnn 170 "${TRAIN[@]}" "${FAST[@]}" --compile --sdpa cudnn --repeats 3 \
    --output "$RUNS/train_compiled_cudnn"
fi

cat "$OUT/gpu_bench.md"
rm -rf "$RUNS"

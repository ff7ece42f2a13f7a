#!/usr/bin/env bash
# The sharded-engine checks in one command, for one GPU with torch, transformers, accelerate (and, for ZeRO-2/3,
# deepspeed) installed and no network; from the repository root:    bash benchmarks/gpu_engines.sh
#
# accelerate runs FSDP and DeepSpeed only on accelerators, so these are the trainer's checks that CPU tests cannot
# make (tests/test_fsdp2.py covers the step and the EMA on FSDP2 shards on the CPU). For each engine it trains the
# main job (training/configs/quickstart.yaml, bf16) for 20 steps straight, and 10 steps then 10 more resumed from the
# step-10 checkpoint, and compares the exported EMA weights of the two (they must be equal) and the evaluation; on one
# GPU the same for the text-to-image quickstart (quickstart-t2i.yaml: MMDiT, cached caption features, bf16).
# First, the GPU attention backends (cuDNN, efficient, flash, FA3, sage, xFormers, whichever are installed) against
# float32 attention at SiT-XL's head size (tests/test_attention.py; needs pytest, missing packages are skipped).
# Results: $OUT (default outputs/gpu_engines) gets gpu_engines.log and one line per engine at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_engines}
PYTHON=${PYTHON:-python3}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_engines.log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
summary=()

if "$PYTHON" -c "import pytest" 2>/dev/null; then
  timeout 300 "$PYTHON" -m pytest tests/test_attention.py -k gpu_backends -q -rs -p no:cacheprovider &&
    summary+=("attention backends: see the pytest lines above") || summary+=("attention backends: FAILED")
else
  summary+=("attention backends: skipped (pytest is not installed)")
fi

CONFIG=training/configs/quickstart.yaml
check() { # check NAME LAUNCH_FLAGS...: straight vs resumed under one engine (the config: $CONFIG)
  local name=$1 folder=$OUT/$1
  shift
  rm -rf "$folder"
  local TRAIN=(training/train_repa.py --config "$CONFIG" --mixed_precision bf16 --report_to none
    --checkpointing_steps 10 --eval_steps 20 --eval_num_samples 50)
  local launch=("$PYTHON" -m accelerate.commands.launch --num_processes 1 "$@")
  if timeout 300 "${launch[@]}" "${TRAIN[@]}" --output_dir "$folder/straight" --max_train_steps 20 &&
    timeout 300 "${launch[@]}" "${TRAIN[@]}" --output_dir "$folder/resumed" --max_train_steps 10 &&
    timeout 300 "${launch[@]}" "${TRAIN[@]}" --output_dir "$folder/resumed" --max_train_steps 20 \
      --resume_from_checkpoint latest; then
    summary+=("$name: $("$PYTHON" - "$folder" <<'PY'
import sys
from pathlib import Path
import torch
from safetensors.torch import load_file
folder = Path(sys.argv[1])
weights = "pipeline/transformer/diffusion_pytorch_model.safetensors"
straight, resumed = (load_file(folder / run / weights) for run in ("straight", "resumed"))
worst = max((straight[name].float() - resumed[name].float()).abs().max().item() for name in straight)
rows = [(folder / run / "eval.csv").read_text().splitlines()[-1] for run in ("straight", "resumed")]
print(f"resumed EMA export {'EQUALS' if worst == 0 else f'DIFFERS (max {worst:.3g}) from'} the straight run's; "
      f"evaluation at step 20: straight {rows[0]}, resumed {rows[1]}")
PY
)")
  else
    summary+=("$name: FAILED (see $OUT/gpu_engines.log)")
  fi
}

check single_gpu
CONFIG=training/configs/quickstart-t2i.yaml check single_gpu_text_to_image
check fsdp2 --use_fsdp --fsdp_version 2 --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP \
  --fsdp_transformer_layer_cls_to_wrap SiTBlock --fsdp_state_dict_type FULL_STATE_DICT
if "$PYTHON" -c "import deepspeed" 2>/dev/null; then
  check zero2 --use_deepspeed --zero_stage 2
  check zero3 --use_deepspeed --zero_stage 3 --zero3_save_16bit_model true
else
  summary+=("zero2/zero3: skipped (deepspeed is not installed)")
fi
printf '%s\n' "${summary[@]}" | tee "$OUT/gpu_engines.md"

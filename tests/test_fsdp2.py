"""FSDP2 on two CPU processes: the training step and diffusers' EMA on sharded parameters (tests/fsdp2_worker.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("fsdp2_worker.py")


def test_training_step_and_ema_on_fsdp2_shards(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(WORKER), str(tmp_path)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for result in ranks:
        assert result["sharded"] and result["ema_sharded"]  # the bug this guards: EMA on DTensor shards
        assert result["updates"] == result["restored_updates"] == 3
        assert result["ema_error"] < 1e-6  # the average of the gathered weights, step by step
        assert result["round_trip_error"] == 0.0  # saved whole, loaded back into shards
    # Both processes hold the same model: their losses differ (own data) but the weights are one.
    assert ranks[0]["weights_checksum"] == ranks[1]["weights_checksum"]
    assert ranks[0]["losses"] != ranks[1]["losses"]

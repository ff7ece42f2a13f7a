"""FSDP2 on two CPU processes: the training step and diffusers' EMA on sharded parameters, and a resume from a sharded
checkpoint that continues exactly like an uninterrupted run (tests/fsdp2_worker.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("fsdp2_worker.py")


def test_training_step_ema_and_resume_on_fsdp2_shards(tmp_path):
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
    # Resumed after step 3 from the checkpoint (accelerate's FSDP2 DCP model / optimizer state, the EMA, noise
    # generator, RNG states and step) into a fresh model built from other seeds: steps 4-6 are bit-identical to an
    # uninterrupted 6-step run on each process (same operations on the same shards, so no tolerance is needed).
    for result in ranks:
        assert {
            "pytorch_model_fsdp_0",
            "optimizer_0",
            "ema.safetensors",
            "trainer_state.json",
            "random_states_1.pkl",
        } <= set(result["checkpoint_files"])
        assert result["start"] == 3 and result["fresh_differs"] and result["loaded_error"] == 0.0
        assert result["resumed_losses"] == result["uninterrupted_losses"][3:]
        assert result["weights_difference"] == 0.0
        assert result["optimizer_state_sizes"] == [result["num_params"]] * 2  # a state for every parameter
        assert result["optimizer_difference"] == 0.0  # AdamW's step, exp_avg and exp_avg_sq of every shard
        assert result["ema_difference"] == 0.0 and result["ema_updates"] == [6, 6]
        assert result["generator_equal"] and result["rng_equal"]

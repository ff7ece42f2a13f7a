"""training/experiments/repa_vs_vanilla.py: the step-ratio arithmetic, and the whole command on a tiny budget."""

import csv
import subprocess
import sys

import numpy as np

from .conftest import REPO_ROOT, load_script

experiment = load_script("training/experiments/repa_vs_vanilla.py")


def test_first_step_reaching_interpolates_between_evaluations():
    steps, fd = np.array([250, 500, 750]), np.array([9.0, 7.0, 5.0])
    assert experiment.first_step_reaching(steps, fd, 6.0) == 625.0
    assert experiment.first_step_reaching(steps, fd, 9.5) == 250.0  # reached at the first evaluation
    assert experiment.first_step_reaching(steps, fd, 4.0) is None  # not within the run


def test_the_command_trains_both_objectives_and_writes_curves_cknna_and_summary(tmp_path):
    output, runs = tmp_path / "results", tmp_path / "runs"
    command = [
        sys.executable, "training/experiments/repa_vs_vanilla.py", "--seeds", "0", "1", "--max_train_steps", "4",
        "--eval_steps", "2", "--eval_num_samples", "10", "--output_dir", str(output), "--runs_dir", str(runs),
        "--", "--eval_inference_steps", "2", "--validation_inference_steps", "2",
    ]  # fmt: skip
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    with open(output / "evaluations.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {(row["proj_coeff"], row["seed"], row["step"]) for row in rows} == {
        (coeff, seed, step) for coeff in ("0.5", "0.0") for seed in ("0", "1") for step in ("2", "4")
    }
    with open(output / "cknna.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 2 * 2 * 4  # λ × seeds × blocks
    assert (output / "curves.png").stat().st_size > 0 and (output / "cknna.png").stat().st_size > 0
    summary = (output / "summary.md").read_text()
    assert summary.strip() in completed.stdout  # printed as written
    assert "Steps vanilla SiT needs to reach REPA's mean FD" in summary
    assert "--eval_inference_steps 2" in summary  # the extra flags are part of the record

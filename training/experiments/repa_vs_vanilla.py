#!/usr/bin/env python
"""REPA vs. vanilla SiT, measured on a CPU: does the alignment loss speed learning up on real (digit) images?

Trains the README's main job (training/configs/quickstart.yaml: a pixel-space SiT on scikit-learn's digits, aligned
to the digits-vit encoder) with λ = 0.5 and with λ = 0 (vanilla SiT), the same steps and seeds, several runs at a
time. Each run measures its EMA samples every --eval_steps with the independent digit classifier (Fréchet distance in
its features, `fd_digits`, and the share of samples drawn as the digit they were asked for, `class_accuracy`). At the
end, the per-block CKNNA of every final model against the encoder (the paper's Figure 2, at toy scale).

    python training/experiments/repa_vs_vanilla.py      # 2 × 3 runs of 2,000 steps, ≈ 20 minutes on 2 cores

Writes into --output_dir (default docs/experiments/repa_vs_vanilla, the README shows it):
    evaluations.csv   every evaluation of every run (proj_coeff, seed, step, fd_digits, class_accuracy)
    curves.png        mean and min–max over seeds, per λ, against the step
    cknna.csv/.png    per-block CKNNA (mean-pooled, k = 10, t = 0.5) of the final EMA models against digits-vit
    summary.md        the settings, final numbers, and the steps vanilla needs to reach REPA's FD at a few budgets
The runs themselves go to --runs_dir (outputs/, not versioned); rerunning the command resumes or reuses them.
Flags after `--` go to every training run, to try other configurations (e.g. `-- --encoder_depth 1`).
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO / "training" / "train_repa.py"
CONFIG = REPO / "training" / "configs" / "quickstart.yaml"
METRICS = ("fd_digits", "class_accuracy")

logger = logging.getLogger("repa_vs_vanilla")


def run_name(proj_coeff: float, seed: int) -> str:
    return f"lambda{proj_coeff:g}-seed{seed}"


def prepare_shared_assets() -> None:
    """What every run reads and would otherwise build at the same time: the pixel cache of the digits, the digits-vit
    encoder and the evaluation's digit classifier (each built once, then reused by all runs and later commands)."""
    from diffusers_repa.data import CACHE_INFO_FILE, build_latent_cache
    from diffusers_repa.encoders import builtin_encoder_folder
    from diffusers_repa.evaluation import load_or_train_digit_classifier
    from diffusers_repa.training import parse_training_args
    from diffusers_repa.training.preflight import default_cache_dir

    settings = parse_training_args(["--config", str(CONFIG)])
    cache_dir = default_cache_dir(settings)
    if not (cache_dir / CACHE_INFO_FILE).is_file():
        build_latent_cache(settings.dataset, cache_dir, settings.vae, settings.resolution)
    builtin_encoder_folder(settings.encoder)
    load_or_train_digit_classifier()


def train_all(args: argparse.Namespace, extra: list[str]) -> None:
    """Every (λ, seed) run of train_repa.py, `--parallel` at a time with one thread each (a finished run returns at
    once, a killed one resumes from its last checkpoint)."""
    queue = [(coeff, seed) for seed in args.seeds for coeff in args.proj_coeffs]
    running: list[tuple[str, subprocess.Popen, float]] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    while queue or running:
        while queue and len(running) < args.parallel:
            coeff, seed = queue.pop(0)
            name = run_name(coeff, seed)
            folder = args.runs_dir / name
            folder.mkdir(parents=True, exist_ok=True)
            command = [
                sys.executable, str(TRAIN_SCRIPT), "--config", str(CONFIG), "--output_dir", str(folder),
                "--proj_coeff", str(coeff), "--seed", str(seed), "--max_train_steps", str(args.max_train_steps),
                "--eval_steps", str(args.eval_steps), "--eval_num_samples", str(args.eval_num_samples),
                "--checkpointing_steps", str(args.eval_steps), "--report_to", "none", "--resume_from_checkpoint",
                "latest", *extra,
            ]  # fmt: skip
            log = open(folder / "train.log", "w")  # noqa: SIM115 (closed when the run ends)
            running.append(
                (name, subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), time.time())
            )
            logger.info("started %s", name)
        time.sleep(2)
        for entry in list(running):
            name, process, started = entry
            if process.poll() is None:
                continue
            running.remove(entry)
            if process.returncode != 0:
                raise RuntimeError(
                    f"{name} failed (exit {process.returncode}); see {args.runs_dir / name / 'train.log'}"
                )
            logger.info("finished %s in %.0f s", name, time.time() - started)


def read_evaluations(args: argparse.Namespace) -> list[dict]:
    rows = []
    for coeff in args.proj_coeffs:
        for seed in args.seeds:
            with open(args.runs_dir / run_name(coeff, seed) / "eval.csv") as handle:
                for row in csv.DictReader(handle):
                    rows.append(
                        {"proj_coeff": coeff, "seed": seed, "step": int(row["step"])}
                        | {metric: float(row[metric]) for metric in METRICS}
                    )
    return rows


def curves(rows: list[dict], coeff: float, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps (S,) and values (seeds, S) of one metric for one λ."""
    steps = sorted({row["step"] for row in rows if row["proj_coeff"] == coeff})
    by_seed: dict[int, dict[int, float]] = {}
    for row in rows:
        if row["proj_coeff"] == coeff:
            by_seed.setdefault(row["seed"], {})[row["step"]] = row[metric]
    return np.array(steps), np.array([[values[step] for step in steps] for values in by_seed.values()])


def first_step_reaching(steps: np.ndarray, values: np.ndarray, target: float) -> float | None:
    """The step (linearly interpolated between evaluations) at which a decreasing curve first reaches `target`."""
    for index in range(len(steps)):
        if values[index] <= target:
            if index == 0:
                return float(steps[0])
            previous, current = values[index - 1], values[index]
            fraction = (previous - target) / (previous - current)
            return float(steps[index - 1] + fraction * (steps[index] - steps[index - 1]))
    return None


def plot_curves(rows: list[dict], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for coeff, color in zip(args.proj_coeffs, ("tab:red", "tab:blue", "tab:green", "tab:purple")):
        label = f"REPA λ = {coeff:g}" if coeff else "vanilla SiT (λ = 0)"
        for axis, metric in zip(axes, METRICS):
            steps, values = curves(rows, coeff, metric)
            axis.plot(steps, values.mean(0), color=color, label=f"{label}, mean of {len(values)} seeds")
            axis.fill_between(steps, values.min(0), values.max(0), color=color, alpha=0.2)
    axes[0].set(xlabel="training step", ylabel="FD in the digit classifier's features", yscale="log")
    axes[1].set(xlabel="training step", ylabel="class accuracy of the samples", ylim=(0, 1))
    for axis in axes:
        axis.grid(alpha=0.3)
    axes[1].legend(loc="lower right", fontsize=8)
    figure.suptitle(
        f"Digits, pixel-space SiT: {args.eval_num_samples} EMA samples per point (band: min–max over seeds)"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def cknna_by_block(args: argparse.Namespace) -> list[dict]:
    """Per-block CKNNA of each final EMA model against digits-vit on the first 512 training digits."""
    from diffusers_repa import SiTPipeline
    from diffusers_repa.data import digits_dataset
    from diffusers_repa.data.preprocessing import center_crop_imagenet
    from diffusers_repa.encoders import load_encoder
    from diffusers_repa.evaluation import alignment_by_block, collect_features

    dataset = digits_dataset()
    images = np.stack([center_crop_imagenet(image, 16) for image in dataset[:512]["image"]])
    encoder = load_encoder("digits-vit", 16)
    results = []
    for coeff in args.proj_coeffs:
        for seed in args.seeds:
            pipeline = SiTPipeline.from_pretrained(args.runs_dir / run_name(coeff, seed) / "pipeline")
            hidden, targets = collect_features(pipeline.transformer, None, encoder, images, t=0.5, seed=seed)
            for block in alignment_by_block(hidden, targets, k=10):
                results.append({"proj_coeff": coeff, "seed": seed, "block": block.block, "cknna": block.cknna})
    return results


def plot_cknna(results: list[dict], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.5))
    for coeff, color in zip(args.proj_coeffs, ("tab:red", "tab:blue", "tab:green", "tab:purple")):
        blocks = sorted({row["block"] for row in results})
        values = np.array([[row["cknna"] for row in results if row["proj_coeff"] == coeff and row["block"] == block]
                           for block in blocks])  # fmt: skip
        label = f"REPA λ = {coeff:g}" if coeff else "vanilla SiT (λ = 0)"
        axis.errorbar(blocks, values.mean(1), yerr=values.std(1), color=color, marker="o", capsize=3, label=label)
    axis.set(xlabel="SiT block", ylabel="CKNNA with digits-vit", xticks=blocks)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def summarize(rows: list[dict], cknna: list[dict], args: argparse.Namespace, extra: list[str], minutes: float) -> str:
    repa, vanilla = max(args.proj_coeffs), min(args.proj_coeffs)
    lines = [
        "# REPA vs. vanilla SiT on the digits",
        "",
        f"Command: `python training/experiments/repa_vs_vanilla.py {' '.join(sys.argv[1:])}`".rstrip() + f" ({minutes:.0f} min).",
        f"Runs: λ ∈ {{{', '.join(f'{c:g}' for c in args.proj_coeffs)}}} × seeds {args.seeds}, {args.max_train_steps} "
        f"steps each, training/configs/quickstart.yaml{' + ' + ' '.join(extra) if extra else ''}; every "
        f"{args.eval_steps} steps {args.eval_num_samples} EMA samples (guidance 2, 25 ODE steps) measured by the "
        "independent digit classifier.",
        "",
        "| step | " + " | ".join(f"FD λ={c:g}" for c in args.proj_coeffs) + " | "
        + " | ".join(f"accuracy λ={c:g}" for c in args.proj_coeffs) + " |",
        "|---|" + "---|" * (2 * len(args.proj_coeffs)),
    ]  # fmt: skip
    steps = curves(rows, repa, METRICS[0])[0]
    for index, step in enumerate(steps):
        cells = []
        for metric in METRICS:
            for coeff in args.proj_coeffs:
                values = curves(rows, coeff, metric)[1][:, index]
                cells.append(f"{values.mean():.3g} ± {values.std():.2g}")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines += ["", "Mean ± standard deviation over seeds.", ""]
    repa_steps, repa_fd = curves(rows, repa, "fd_digits")
    vanilla_steps, vanilla_fd = curves(rows, vanilla, "fd_digits")
    lines.append("Steps vanilla SiT needs to reach REPA's mean FD (linear interpolation between evaluations):")
    lines.append("")
    for budget in [step for step in repa_steps if step in (args.max_train_steps // 4, args.max_train_steps // 2,
                                                             args.max_train_steps)]:  # fmt: skip
        target = repa_fd.mean(0)[list(repa_steps).index(budget)]
        reached = first_step_reaching(vanilla_steps, vanilla_fd.mean(0), target)
        ratio = (
            f"{reached:.0f} steps, ×{reached / budget:.2f}" if reached else f"not within {args.max_train_steps} steps"
        )
        lines.append(f"- REPA at {budget} steps: FD {target:.3g}; vanilla: {ratio}")
    lines += ["", "Per-block CKNNA with digits-vit of the final EMA models (mean over seeds):", ""]
    blocks = sorted({row["block"] for row in cknna})
    lines.append("| λ | " + " | ".join(f"block {b}" for b in blocks) + " |")
    lines.append("|---|" + "---|" * len(blocks))
    for coeff in args.proj_coeffs:
        means = [np.mean([r["cknna"] for r in cknna if r["proj_coeff"] == coeff and r["block"] == b]) for b in blocks]
        lines.append(f"| {coeff:g} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, default=REPO / "docs" / "experiments" / "repa_vs_vanilla")
    parser.add_argument("--runs_dir", type=Path, default=REPO / "outputs" / "repa_vs_vanilla")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--proj_coeffs", type=float, nargs="+", default=[0.5, 0.0], help="λ values; 0 = vanilla.")
    parser.add_argument("--max_train_steps", type=int, default=2000)
    parser.add_argument("--eval_steps", type=int, default=250)
    parser.add_argument("--eval_num_samples", type=int, default=500)
    parser.add_argument("--parallel", type=int, default=2, help="Runs at a time (one CPU thread each).")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if 0.0 not in args.proj_coeffs or len(args.proj_coeffs) < 2:
        parser.error("--proj_coeffs needs 0 (the vanilla baseline) and at least one λ > 0.")
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)

    started = time.time()
    prepare_shared_assets()
    train_all(args, extra)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    rows = read_evaluations(args)
    write_csv(rows, args.output_dir / "evaluations.csv")
    plot_curves(rows, args, args.output_dir / "curves.png")
    cknna = cknna_by_block(args)
    write_csv(cknna, args.output_dir / "cknna.csv")
    plot_cknna(cknna, args, args.output_dir / "cknna.png")
    summary = summarize(rows, cknna, args, extra, (time.time() - started) / 60)
    (args.output_dir / "summary.md").write_text(summary)
    print(summary)


if __name__ == "__main__":
    main()

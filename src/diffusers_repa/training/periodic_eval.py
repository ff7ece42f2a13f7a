"""Evaluation during training (`--eval_steps`): EMA samples against the training images, logged as a curve.

Every `--eval_steps` optimizer steps (and at the last step) the trainer samples `--eval_num_samples` images from the
EMA weights — the same class labels (every class equally often) and the same initial noise each time, so the points
of a curve differ only by the weights — and measures them with an evaluator of `evaluation.training_eval`: a Fréchet
distance to the training images in some feature space (`--eval_metric`: the independent digit classifier's for the
digits, FID Inception's, or any `load_encoder` model's) and, where a classifier exists, the fraction of samples
labelled as the class they were drawn for. Each evaluation is a row of `<output_dir>/eval.csv` (a resumed run rewrites
the rows after its checkpoint, so none is repeated or skipped) and the curves are redrawn into `eval.png`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline

from ..data import DIGITS_DATASET, LatentCacheBatches, load_latent_cache
from ..evaluation import append_eval_row, build_training_evaluator, plot_eval_curves, read_eval_rows, sample_labels
from .arguments import REPATrainingArguments

EVAL_CSV_NAME = "eval.csv"
EVAL_PLOT_NAME = "eval.png"
_BATCH_SIZE = 250  # images per pipeline call and per feature batch: bounded memory at any --eval_num_samples


def default_eval_metric(args: REPATrainingArguments) -> str:
    """`--eval_metric`, else the digit classifier for the digits and FID (Inception) for everything else."""
    if args.eval_metric is not None:
        return args.eval_metric
    return "digits" if args.dataset == DIGITS_DATASET else "inception"


def _reference_batches(cache_dir: Path, num_images: int) -> Iterator[torch.Tensor]:
    """The first `num_images` training crops of the cache, uint8 (n, 3, R, R) batch by batch (read as the loader
    reads them, so the reference is exactly what the model trains on)."""
    images = LatentCacheBatches(load_latent_cache(cache_dir))
    total = min(num_images, len(images))
    for start in range(0, total, _BATCH_SIZE):
        yield images.__getitems__([(index, False) for index in range(start, min(start + _BATCH_SIZE, total))])["image"]


class PeriodicEvaluation:
    """Samples, measures and records one evaluation per call (main process only).

    Args:
        args: the run's settings (`eval_*`, `seed`, `resolution`, the sampler and guidance of the evaluation).
        cache_dir: the latent cache the run trains on; its first `--eval_num_reference` crops are the reference.
        num_classes: classes of the dataset (labels 0..num_classes-1).
        output_dir: where `eval.csv` and `eval.png` go.
        device: where the feature networks run.
    """

    def __init__(
        self,
        args: REPATrainingArguments,
        cache_dir: Path,
        num_classes: int,
        output_dir: Path,
        device: torch.device,
    ):
        self.args = args
        self.metric = default_eval_metric(args)
        self.evaluator = build_training_evaluator(
            self.metric, _reference_batches(cache_dir, args.eval_num_reference), resolution=args.resolution,
            device=device,
        )  # fmt: skip
        self.labels = sample_labels(args.eval_num_samples, num_classes, seed=args.seed, label_sampling="equal")
        self.csv_path = output_dir / EVAL_CSV_NAME
        self.plot_path = output_dir / EVAL_PLOT_NAME

    @torch.no_grad()
    def sample(
        self,
        pipeline: DiffusionPipeline,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> np.ndarray:
        """`--eval_num_samples` images (N, R, R, 3) in [0, 1] for the fixed labels; batch b starts from the noise of
        seed (`--seed`, b), so every evaluation of a run sees the same noise."""
        args, batches = self.args, []
        pipeline.set_progress_bar_config(disable=True)
        for index, start in enumerate(range(0, len(self.labels), _BATCH_SIZE)):
            generator = torch.Generator(pipeline.device).manual_seed(args.seed * 1_000_003 + index)
            with autocast():
                output = pipeline(
                    class_labels=self.labels[start : start + _BATCH_SIZE].tolist(),
                    num_inference_steps=args.eval_inference_steps,
                    guidance_scale=args.eval_guidance_scale,
                    generator=generator,
                    output_type="np",
                )
            batches.append(output.images)
        return np.concatenate(batches)

    def __call__(
        self,
        pipeline: DiffusionPipeline,
        step: int,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> dict[str, float]:
        """Evaluate `pipeline` (the EMA weights) at `step`: append the row to eval.csv, redraw eval.png, return it."""
        metrics = self.evaluator.evaluate(self.sample(pipeline, autocast), self.labels)
        append_eval_row(self.csv_path, step, metrics)
        title = f"EMA samples ({len(self.labels)}, guidance {self.args.eval_guidance_scale:g}) vs. training images"
        plot_eval_curves(read_eval_rows(self.csv_path), self.plot_path, title=title)
        return metrics

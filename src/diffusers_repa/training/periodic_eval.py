"""Evaluation during training (`--eval_steps`): EMA samples against the training images, logged as a curve.

Every `--eval_steps` optimizer steps (and at the last step) the trainer samples `--eval_num_samples` images from the
EMA weights — the same class labels (every class equally often) or, for a text-to-image model, the same training
captions (of those classes when the data has labels), and the same initial noise each time, so the points of a curve
differ only by the weights — and measures them with an evaluator of `evaluation.training_eval`: a Fréchet
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

from ..data import DIGITS_CAPTIONS_DATASET, DIGITS_DATASET, LatentCacheBatches, load_latent_cache
from ..evaluation import append_eval_row, build_training_evaluator, plot_eval_curves, read_eval_rows, sample_labels
from .arguments import REPATrainingArguments

EVAL_CSV_NAME = "eval.csv"
EVAL_PLOT_NAME = "eval.png"
_BATCH_SIZE = 250  # images per pipeline call and per feature batch: bounded memory at any --eval_num_samples


def default_eval_metric(args: REPATrainingArguments) -> str:
    """`--eval_metric`, else the digit classifier for the digits (with or without captions) and FID (Inception) for
    everything else."""
    if args.eval_metric is not None:
        return args.eval_metric
    return "digits" if args.dataset in (DIGITS_DATASET, DIGITS_CAPTIONS_DATASET) else "inception"


def evaluation_captions(cache_dir: Path, labels: np.ndarray | None, count: int) -> list[str]:
    """Prompts from the cache's captions: for each of `labels` the first caption of the next training image of that
    class (so a sample's class is the caption's), or without labels the first captions of the first `count` images."""
    dataset = load_latent_cache(cache_dir)
    if labels is None:
        rows = [index % len(dataset) for index in range(count)]
    else:
        rows_of_class: dict[int, list[int]] = {}
        for row, label in enumerate(dataset["label"]):
            rows_of_class.setdefault(int(label), []).append(row)
        seen: dict[int, int] = {}
        rows = []
        for label in labels.tolist():
            rows.append(rows_of_class[label][seen.get(label, 0) % len(rows_of_class[label])])
            seen[label] = seen.get(label, 0) + 1
    # Only the captions of those rows are read (a COCO cache holds ~400,000).
    return [captions[0] for captions in dataset.select(rows)["caption"]]


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
        num_classes: classes of the dataset (labels 0..num_classes-1; 0: captions without labels).
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
        self.labels = (
            sample_labels(args.eval_num_samples, num_classes, seed=args.seed, label_sampling="equal")
            if num_classes
            else None
        )
        # Text-to-image: the prompts sampled (class accuracy then says how often the image is its caption's class).
        self.prompts = (
            evaluation_captions(cache_dir, self.labels, args.eval_num_samples) if args.is_text_to_image else None
        )
        self.conditions = self.prompts if self.prompts is not None else self.labels.tolist()
        self.csv_path = output_dir / EVAL_CSV_NAME
        self.plot_path = output_dir / EVAL_PLOT_NAME

    @torch.no_grad()
    def sample(
        self,
        pipeline: DiffusionPipeline,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> np.ndarray:
        """`--eval_num_samples` images (N, R, R, 3) in [0, 1] for the fixed labels or prompts; batch b starts from
        the noise of seed (`--seed`, b), so every evaluation of a run sees the same noise."""
        args, batches = self.args, []
        pipeline.set_progress_bar_config(disable=True)
        condition_name = "class_labels" if self.prompts is None else "prompt"
        for index, start in enumerate(range(0, len(self.conditions), _BATCH_SIZE)):
            generator = torch.Generator(pipeline.device).manual_seed(args.seed * 1_000_003 + index)
            with autocast():
                output = pipeline(
                    **{condition_name: self.conditions[start : start + _BATCH_SIZE]},
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
        title = f"EMA samples ({len(self.conditions)}, guidance {self.args.eval_guidance_scale:g}) vs. training images"
        plot_eval_curves(read_eval_rows(self.csv_path), self.plot_path, title=title)
        return metrics

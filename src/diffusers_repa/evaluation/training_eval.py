"""Sample quality during training: a Fréchet distance against the training images, a class accuracy, a CSV and a plot.

The trainer builds one evaluator with [`build_training_evaluator`] (the reference statistics are computed once), then
every ``--eval_steps`` samples images from the EMA pipeline and calls ``evaluator.evaluate(images, labels)``; it
appends the result to a CSV with [`append_eval_row`] and draws the curves with [`plot_eval_curves`]. Metric keys name
their feature space (``fd_digits``, ``fid``, ``fd_dinov2-vit-b``) so that a CSV or tracker is self-describing.

Images everywhere here are uint8 in [0, 255] or float in [0, 1] (the pipeline's ``"np"`` / ``"pt"`` outputs), laid
out (N, 3, R, R) or (N, R, R, 3); [`to_uint8_images`] brings them to the uint8 (N, 3, R, R) tensors that the feature
networks take, so real and generated images go through identical steps.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..atomic_files import write_file_atomically
from .metrics import RunningStatistics, frechet_distance

Images = np.ndarray | torch.Tensor
"""uint8 [0, 255] or float [0, 1] images (N, 3, R, R) or (N, R, R, 3), NumPy or torch."""

FeatureFn = Callable[[torch.Tensor], np.ndarray | torch.Tensor]
"""uint8 images (n, 3, R, R) on the CPU → features (n, D)."""

CLASS_ACCURACY_KEY = "class_accuracy"
EVAL_KINDS_TEXT = "'digits', 'inception' or 'encoder:<name or path>' (e.g. 'encoder:dinov2-vit-b')"


class ImageClassifier(Protocol):
    """Anything that labels images: ``predict(uint8 images (n, 3, R, R)) -> labels (n,)``."""

    def predict(self, images: Images) -> np.ndarray: ...


def to_uint8_images(images: Images) -> torch.Tensor:
    """Images in any layout this module accepts → a uint8 CPU tensor (N, 3, R, R).

    The layout is (N, C, R, R) when dim 1 has 1 or 3 channels and the last two dims are equal, else (N, R, R, C); one
    grey channel is repeated to three. Floats must lie in [0, 1] and are quantised as saving a PNG would
    (``round(255·x)``, as [`~diffusers_repa.evaluation.generate_samples`] does); other dtypes than uint8 and float
    are refused, as are floats outside [0, 1] (e.g. [-1, 1] images, NaN) that would silently give wrong features.
    """
    tensor = torch.as_tensor(images).detach().cpu()
    if tensor.ndim != 4:
        raise ValueError(f"Images must be 4-D (N, 3, R, R) or (N, R, R, 3), got shape {tuple(tensor.shape)}.")
    if tensor.shape[1] in (1, 3) and tensor.shape[2] == tensor.shape[3]:
        pass
    elif tensor.shape[3] in (1, 3) and tensor.shape[1] == tensor.shape[2]:
        tensor = tensor.permute(0, 3, 1, 2)
    else:
        raise ValueError(f"Images must be square (N, 3, R, R) or (N, R, R, 3), got shape {tuple(tensor.shape)}.")
    if tensor.is_floating_point():
        # Written so that NaN fails too.
        if not ((tensor >= -1e-3) & (tensor <= 1 + 1e-3)).all():
            raise ValueError(
                f"Float images must lie in [0, 1], got values in [{tensor.min():.3f}, {tensor.max():.3f}] "
                f"(non-finite: {int((~tensor.isfinite()).sum())}); map [-1, 1] images with (x + 1) / 2 first."
            )
        tensor = (tensor.double() * 255).round().clamp(0, 255).to(torch.uint8)
    elif tensor.dtype != torch.uint8:
        raise ValueError(f"Images must be uint8 in [0, 255] or float in [0, 1], got dtype {tensor.dtype}.")
    return tensor.expand(-1, 3, -1, -1).contiguous()


def _uint8_batches(images: Images | Iterable[Images], batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 (n ≤ batch_size, 3, R, R) chunks, in order, of one image array or of an iterable of arrays."""
    parts = [images] if isinstance(images, np.ndarray | torch.Tensor) else images
    for part in parts:
        part = to_uint8_images(part)
        for start in range(0, len(part), batch_size):
            yield part[start : start + batch_size]


class FrechetEvaluator:
    """Fréchet distance of sample images to fixed reference images in one feature space, plus a class accuracy.

    The reference statistics (mean (D,), unbiased covariance (D, D), float64) are computed once, here. Features are
    computed in fixed batches of ``batch_size`` in the order given, so the same images always give the same numbers.

    Args:
        feature_fn: uint8 images (n, 3, R, R) on the CPU → features (n, D) (moving them to its device is its job).
        reference_images: the real images, e.g. all training images (N, 3, R, R) uint8, or an iterable of such
            batches (a loader); at least 2 images.
        metric_name: key of the distance in [`evaluate`]'s result, naming the feature space (``"fd_digits"``).
        classifier: labels images (see [`ImageClassifier`]); with it, [`evaluate`] also reports ``class_accuracy``
            when given labels.
        batch_size: images per ``feature_fn`` call.
    """

    def __init__(
        self,
        feature_fn: FeatureFn,
        reference_images: Images | Iterable[Images],
        *,
        metric_name: str = "fd",
        classifier: ImageClassifier | None = None,
        batch_size: int = 256,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        self.feature_fn = feature_fn
        self.metric_name = metric_name
        self.classifier = classifier
        self.batch_size = batch_size
        self.resolution: int | None = None
        statistics = self._statistics(reference_images)
        self.num_reference_images = statistics.count
        self.reference_statistics = statistics.finalize()

    def _batches(self, images: Images | Iterable[Images]) -> Iterator[torch.Tensor]:
        for batch in _uint8_batches(images, self.batch_size):
            side = batch.shape[-1]
            if self.resolution is None:
                self.resolution = side
            elif side != self.resolution:
                raise ValueError(f"Images are {side} px but the reference images are {self.resolution} px.")
            yield batch

    def _features(self, batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            features = self.feature_fn(batch)
        if isinstance(features, torch.Tensor):
            features = features.detach().cpu().double().numpy()
        return np.asarray(features, dtype=np.float64)

    def _statistics(self, images: Images | Iterable[Images]) -> RunningStatistics:
        statistics = RunningStatistics()
        for batch in self._batches(images):
            statistics.update(self._features(batch))
        return statistics

    def features(self, images: Images | Iterable[Images]) -> np.ndarray:
        """Features (N, D) float64 of images (same forms as the reference images)."""
        return np.concatenate([self._features(batch) for batch in self._batches(images)])

    def evaluate(
        self, images: Images | Iterable[Images], labels: np.ndarray | torch.Tensor | Sequence[int] | None = None
    ) -> dict[str, float]:
        """Metrics of sample images, e.g. ``{"fd_digits": 3.1, "class_accuracy": 0.93}``.

        Args:
            images: the samples (N ≥ 2), same resolution as the reference images.
            labels: the class each sample was generated for (N,); ``class_accuracy`` (the fraction the classifier
                labels as that class) is reported when they and a classifier are given.

        Returns:
            ``{metric_name: Fréchet distance (float64, via metrics.frechet_distance)[, "class_accuracy": fraction]}``.
        """
        with_accuracy = labels is not None and self.classifier is not None
        statistics, predictions = RunningStatistics(), []
        for batch in self._batches(images):
            statistics.update(self._features(batch))
            if with_accuracy:
                predictions.append(np.asarray(self.classifier.predict(batch)).reshape(-1))
        metrics = {self.metric_name: frechet_distance(*statistics.finalize(), *self.reference_statistics)}
        if with_accuracy:
            predicted = np.concatenate(predictions)
            labels = np.asarray(torch.as_tensor(labels).cpu()).reshape(-1)
            if len(labels) != len(predicted):
                raise ValueError(f"Got {len(labels)} labels for {len(predicted)} images.")
            metrics[CLASS_ACCURACY_KEY] = float(np.mean(predicted == labels))
        return metrics


def _encoder_metric_name(name: str) -> str:
    # "dinov2-vit-b" → "fd_dinov2-vit-b"; a Hub id or folder keeps its last component ("facebook/dinov2-base").
    return "fd_" + Path(name.rstrip("/\\")).name


def build_training_evaluator(
    kind: str,
    reference_images: Images | Iterable[Images],
    *,
    resolution: int,
    device: str | torch.device | None = None,
    batch_size: int = 256,
    classifier: ImageClassifier | None = None,
    cache_dir: str | os.PathLike | None = None,
    inception_weights: str | os.PathLike | None = None,
) -> FrechetEvaluator:
    """A [`FrechetEvaluator`] of one kind, for evaluation during training.

    Kinds:
        - ``"digits"``: features of the independent digit classifier
          ([`~diffusers_repa.evaluation.digits.load_or_train_digit_classifier`], cached in ``cache_dir``); metric
          ``fd_digits``, and ``class_accuracy`` from the same classifier.
        - ``"inception"``: FID (``fid``) on the FID Inception's pool features; the weights must be available locally
          or downloadable (see [`~diffusers_repa.evaluation.inception.resolve_inception_weights`]).
        - ``"encoder:<name or path>"``: FD in the mean-pooled patch tokens of any
          [`~diffusers_repa.encoders.load_encoder`] model at ``resolution`` (a multiple of 16), e.g.
          ``"encoder:dinov2-vit-b"`` → ``fd_dinov2-vit-b``.

    Args:
        reference_images: the training images (N, 3, R, R) uint8 or batches of them, R = ``resolution``.
        resolution: side R of the reference and sample images.
        device: where the Inception / encoder networks run (the digit classifier runs on the CPU).
        batch_size: images per feature batch.
        classifier: for ``class_accuracy`` with the ``inception`` and ``encoder`` kinds (e.g. the digit classifier).
        cache_dir: the digit classifier's cache folder (default under ``HF_HOME``).
        inception_weights: FID Inception weights file for ``"inception"``.

    Raises:
        ValueError: unknown kind, or reference images of another resolution.
        FileNotFoundError: ``"inception"`` without the weights, naming the file and where to put it.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if kind == "digits":
        from .digits import load_or_train_digit_classifier

        digits = load_or_train_digit_classifier(cache_dir)
        feature_fn, metric_name, classifier = digits.features, "fd_digits", classifier or digits
    elif kind == "inception":
        from .inception import load_fid_inception

        try:
            inception = load_fid_inception(inception_weights, device)
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"Evaluation kind 'inception' needs the FID Inception weights: {error} Without them, evaluate with "
                "'digits' or 'encoder:<name>'."
            ) from error

        def feature_fn(images: torch.Tensor) -> torch.Tensor:
            return inception(images.to(device)).pool

        metric_name = "fid"
    elif kind.startswith("encoder:") and kind.removeprefix("encoder:").strip():
        from ..encoders import load_encoder

        encoder = load_encoder(kind.removeprefix("encoder:").strip(), resolution=resolution, device=device)

        def feature_fn(images: torch.Tensor) -> torch.Tensor:
            # Mean over the patch tokens (N, T, D) → (N, D): one vector per image, like a pooled CLS.
            return encoder(images.to(device)).mean(dim=1)

        metric_name = _encoder_metric_name(encoder.name)
    else:
        raise ValueError(f"Unknown evaluation kind {kind!r}; use {EVAL_KINDS_TEXT}.")
    evaluator = FrechetEvaluator(
        feature_fn, reference_images, metric_name=metric_name, classifier=classifier, batch_size=batch_size
    )
    if evaluator.resolution != resolution:
        raise ValueError(f"The reference images are {evaluator.resolution} px, but resolution={resolution}.")
    return evaluator


def _read_csv(csv_path: str | os.PathLike) -> tuple[list[str], list[dict[str, float]]]:
    with open(csv_path, newline="") as file:
        reader = csv.DictReader(file)
        rows = [
            {
                key: int(value) if key == "step" else float(value)
                for key, value in row.items()
                if value not in ("", None)
            }
            for row in reader
        ]
        return list(reader.fieldnames or ["step"]), rows


def append_eval_row(csv_path: str | os.PathLike, step: int, metrics: Mapping[str, float]) -> Path:
    """Add one row ``step, metric…`` to a CSV of evaluations (created if missing), rewriting the file atomically.

    Rows already there with a step ≥ ``step`` are dropped first: a run resumed from a checkpoint evaluates again the
    steps its killed predecessor had logged after that checkpoint. The header keeps its columns in order and gains any
    new metric as a column at the end (earlier rows leave it empty).
    """
    fieldnames, rows = _read_csv(csv_path) if Path(csv_path).is_file() else (["step"], [])
    rows = [row for row in rows if row["step"] < step]
    rows.append({"step": int(step), **{key: float(value) for key, value in metrics.items()}})
    fieldnames += [key for key in metrics if key not in fieldnames]

    def write(temporary: Path) -> None:
        with open(temporary, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)

    return write_file_atomically(csv_path, write)


def read_eval_rows(csv_path: str | os.PathLike) -> list[dict[str, float]]:
    """Rows of a CSV written by [`append_eval_row`]: ``{"step": int, metric: float, …}`` (empty cells left out)."""
    return _read_csv(csv_path)[1]


def plot_eval_curves(
    rows: Sequence[Mapping[str, float]], png_path: str | os.PathLike, title: str | None = None
) -> Path:
    """A PNG with one panel per metric against the training step, written atomically.

    Fréchet distances (keys ``fd*`` / ``fid``) use a logarithmic y axis when all their values are positive, since
    they fall by orders of magnitude early in training; ``class_accuracy`` is drawn on [0, 1]. Drawn with
    matplotlib's object API on an Agg canvas, which leaves pyplot's global backend alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(dict.fromkeys(key for row in rows for key in row if key != "step"))
    if not names:
        raise ValueError("No metric to plot: the rows hold only steps (or there are no rows).")
    figure = Figure(figsize=(4.0 * len(names), 3.2), layout="constrained")
    FigureCanvasAgg(figure)
    for axes, name in zip(figure.subplots(1, len(names), squeeze=False)[0], names):
        points = sorted((row["step"], row[name]) for row in rows if name in row and math.isfinite(row[name]))
        steps, values = [step for step, _ in points], [value for _, value in points]
        axes.plot(steps, values, marker="o", markersize=3)
        axes.set_title(name)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        if name == CLASS_ACCURACY_KEY:
            axes.set_ylim(0, 1)
        elif (name.startswith("fd") or name == "fid") and values and min(values) > 0:
            axes.set_yscale("log")
    if title:
        figure.suptitle(title)
    return write_file_atomically(png_path, lambda temporary: figure.savefig(temporary, format="png", dpi=100))

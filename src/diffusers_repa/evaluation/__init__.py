"""Evaluation: ADM-compatible FID / sFID / IS / precision / recall, FD-DINOv2, and representation alignment."""

from pathlib import Path

from .alignment import cka, cknna, linear_probe_accuracy
from .alignment_analysis import BlockAlignment, alignment_by_block, analyze_alignment, collect_features
from .dinov2 import DINOv2Features
from .evaluator import compute_reference_batch, evaluate_samples, format_metrics_table, iter_model_outputs
from .generate import generate_samples, sample_labels
from .image_io import ImageSet, NpzWriter, iter_npz_batches, open_image_set
from .inception import (
    FID_INCEPTION_WEIGHTS_FILENAME,
    INCEPTION_WEIGHTS_ENV,
    FIDInceptionV3,
    InceptionFeatures,
    load_fid_inception,
    preprocess_for_inception,
    resize_bilinear_tf1,
    resolve_inception_weights,
)
from .metrics import RunningStatistics, compute_statistics, frechet_distance, inception_score, precision_recall

# Folder of the `evaluate` metric script: `evaluate.load(str(FID_METRIC_PATH))`.
FID_METRIC_PATH = Path(__file__).parent / "fid_metric"

__all__ = [
    "BlockAlignment",
    "DINOv2Features",
    "FIDInceptionV3",
    "FID_INCEPTION_WEIGHTS_FILENAME",
    "FID_METRIC_PATH",
    "INCEPTION_WEIGHTS_ENV",
    "ImageSet",
    "InceptionFeatures",
    "NpzWriter",
    "RunningStatistics",
    "alignment_by_block",
    "analyze_alignment",
    "cka",
    "cknna",
    "collect_features",
    "compute_reference_batch",
    "compute_statistics",
    "evaluate_samples",
    "format_metrics_table",
    "frechet_distance",
    "generate_samples",
    "inception_score",
    "iter_model_outputs",
    "iter_npz_batches",
    "linear_probe_accuracy",
    "load_fid_inception",
    "open_image_set",
    "precision_recall",
    "preprocess_for_inception",
    "resize_bilinear_tf1",
    "resolve_inception_weights",
    "sample_labels",
]

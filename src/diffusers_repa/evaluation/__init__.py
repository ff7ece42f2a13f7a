"""Evaluation: ADM-compatible FID / sFID / IS / precision / recall, FD-DINOv2, the CLIP score of text-to-image
samples, representation alignment, and sample quality during training (Fréchet distances, an independent digit
classifier, CSV and curves)."""

from pathlib import Path

from .alignment import cka, cknna, linear_probe_accuracy
from .alignment_analysis import BlockAlignment, alignment_by_block, analyze_alignment, collect_features
from .clip_score import DEFAULT_CLIP_MODEL, CLIPScorer, clip_pair_scores, clip_score_of, compute_clip_score
from .digits import DigitClassifier, load_or_train_digit_classifier, train_digit_classifier
from .dinov2 import DINOv2Features
from .evaluator import compute_reference_batch, evaluate_samples, format_metrics_table, iter_model_outputs
from .generate import generate_samples, load_generation_pipeline, sample_labels
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
from .prompts import load_dataset_captions, read_prompts_file, read_sample_prompts
from .training_eval import (
    FrechetEvaluator,
    append_eval_row,
    build_training_evaluator,
    plot_eval_curves,
    read_eval_rows,
    to_uint8_images,
)

# Folder of the `evaluate` metric script: `evaluate.load(str(FID_METRIC_PATH))`.
FID_METRIC_PATH = Path(__file__).parent / "fid_metric"

__all__ = [
    "BlockAlignment",
    "CLIPScorer",
    "DEFAULT_CLIP_MODEL",
    "DINOv2Features",
    "DigitClassifier",
    "FIDInceptionV3",
    "FID_INCEPTION_WEIGHTS_FILENAME",
    "FID_METRIC_PATH",
    "FrechetEvaluator",
    "INCEPTION_WEIGHTS_ENV",
    "ImageSet",
    "InceptionFeatures",
    "NpzWriter",
    "RunningStatistics",
    "alignment_by_block",
    "analyze_alignment",
    "append_eval_row",
    "build_training_evaluator",
    "cka",
    "cknna",
    "clip_pair_scores",
    "clip_score_of",
    "collect_features",
    "compute_clip_score",
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
    "load_dataset_captions",
    "load_fid_inception",
    "load_generation_pipeline",
    "load_or_train_digit_classifier",
    "open_image_set",
    "plot_eval_curves",
    "precision_recall",
    "preprocess_for_inception",
    "read_eval_rows",
    "read_prompts_file",
    "read_sample_prompts",
    "resize_bilinear_tf1",
    "resolve_inception_weights",
    "sample_labels",
    "to_uint8_images",
    "train_digit_classifier",
]

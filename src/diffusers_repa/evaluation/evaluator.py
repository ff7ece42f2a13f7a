"""Images → FID, sFID, Inception Score, precision, recall (and FD-DINOv2), comparable to ADM's evaluator.

The paper's numbers (e.g. FID 1.42 for SiT-XL/2 + REPA) come from ADM's TensorFlow ``evaluations/evaluator.py`` run
on 50,000 samples against ``VIRTUAL_imagenet256_labeled.npz``. [`evaluate_samples`] repeats that computation:

- sample statistics from all samples, reference statistics from the reference batch's ``mu``/``sigma``/``mu_s``/
  ``sigma_s`` (or from its images when absent); a reference of pool statistics only (``mu``/``sigma``, e.g. U-ViT's
  ``fid_stats_mscoco256_val.npz`` of the text-to-image COCO protocol) gives FID without sFID;
- Inception Score from the samples' 1008-way softmax, 10 splits;
- precision/recall (k = 3) between the reference batch's images (``arr_0``, 10,000 in ADM's batch) and all samples.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .dinov2 import DINOv2Features
from .image_io import ImageSet, NpzWriter, npz_keys, open_image_set
from .inception import FIDInceptionV3, InceptionFeatures, ResizeConvention, load_fid_inception
from .metrics import RunningStatistics, frechet_distance, inception_score, precision_recall

ImageSource = str | os.PathLike | np.ndarray | ImageSet


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def iter_model_outputs(
    images: ImageSource,
    model: nn.Module,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    desc: str | None = None,
    show_progress: bool = True,
) -> Iterator:
    """Run ``model`` on uint8 (n, 3, H, W) batches of an image set under ``torch.inference_mode``; yields its outputs."""
    images = open_image_set(images)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    batches = images.iter_batches(batch_size)
    total = math.ceil(len(images) / batch_size)
    for batch in tqdm(batches, total=total, desc=desc, disable=not show_progress):
        pixels = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).to(device)
        with torch.inference_mode():
            yield model(pixels)


class _InceptionRun:
    """Everything ADM's evaluator keeps from one pass of Inception over an image set."""

    def __init__(self, keep_pool: bool, keep_logits: bool) -> None:
        self.pool_statistics = RunningStatistics()
        self.spatial_statistics = RunningStatistics()
        self.pool: list[np.ndarray] | None = [] if keep_pool else None
        self.logits: list[np.ndarray] | None = [] if keep_logits else None

    def add(self, features: InceptionFeatures) -> None:
        pool = features.pool.float().cpu().numpy()
        self.pool_statistics.update(pool)
        self.spatial_statistics.update(features.spatial.float().cpu().numpy())
        if self.pool is not None:
            self.pool.append(pool)
        if self.logits is not None:
            self.logits.append(features.logits.float().cpu().numpy())


def _run_inception(
    images: ImageSet, inception: nn.Module, keep_pool: bool, keep_logits: bool, **kwargs
) -> _InceptionRun:
    run = _InceptionRun(keep_pool=keep_pool, keep_logits=keep_logits)
    for features in iter_model_outputs(images, inception, **kwargs):
        run.add(features)
    return run


def _dinov2_statistics(images: ImageSet, dinov2: nn.Module, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    statistics = RunningStatistics()
    for features in iter_model_outputs(images, dinov2, **kwargs):
        statistics.update(features.float().cpu().numpy())
    return statistics.finalize()


def _resolve_models(
    inception: FIDInceptionV3 | None,
    inception_weights: str | os.PathLike | None,
    dinov2: DINOv2Features | str | os.PathLike | None,
    device: torch.device,
    inception_resize: ResizeConvention = "tensorflow",
) -> tuple[nn.Module, nn.Module | None]:
    if inception is None:
        inception = load_fid_inception(inception_weights, device)
        inception.resize_convention = inception_resize
    inception = inception.eval().to(device)
    if dinov2 is not None and not isinstance(dinov2, nn.Module):
        dinov2 = DINOv2Features.from_pretrained(dinov2)
    return inception, (dinov2.eval().to(device) if dinov2 is not None else None)


def evaluate_samples(
    samples_npz: ImageSource,
    reference_npz: ImageSource,
    inception_weights: str | os.PathLike | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    inception: FIDInceptionV3 | None = None,
    dinov2: DINOv2Features | str | os.PathLike | None = None,
    inception_score_splits: int = 10,
    precision_recall_k: int = 3,
    inception_resize: ResizeConvention = "tensorflow",
    show_progress: bool = True,
) -> dict[str, float | int]:
    """FID, sFID, Inception Score, precision and recall of a sample batch against a reference batch (ADM protocol).

    Args:
        samples_npz: generated images: ADM ``.npz`` (``arr_0`` uint8 N×H×W×3), folder of images, or array.
        reference_npz: reference batch, e.g. ADM's ``VIRTUAL_imagenet256_labeled.npz``. Its ``mu``, ``sigma``,
            ``mu_s``, ``sigma_s`` (and ``mu_dinov2``, ``sigma_dinov2``) are used when present, otherwise computed from
            its images; its images (``arr_0``) are the real set of precision/recall. Pool statistics alone
            (``mu``, ``sigma``: U-ViT's ``fid_stats_mscoco256_val.npz``) give FID and no sFID.
        inception_weights: FID Inception weights file (default: see
            [`~diffusers_repa.evaluation.inception.resolve_inception_weights`]).
        batch_size: images per Inception forward.
        device: where the networks run (default: CUDA if available).
        inception: an already built [`FIDInceptionV3`] (overrides ``inception_weights``).
        dinov2: a [`DINOv2Features`] or a DINOv2 checkpoint id/path to also report FD-DINOv2 (e.g.
            ``"facebook/dinov2-large"``).
        inception_score_splits: chunks of the Inception Score (ADM: 10).
        precision_recall_k: neighbourhood size of the manifold balls (ADM: 3).
        inception_resize: how the loaded Inception resizes to 299 px: ``"tensorflow"`` (ADM's evaluator) or
            ``"pytorch_fid"`` (pytorch-fid, with which U-ViT computed its COCO statistics).

    Returns:
        ``{"inception_score", "fid", "sfid", "precision", "recall", ["fd_dinov2"], "num_samples",
        "num_reference_images"}``; precision and recall are omitted when the reference has statistics but no images,
        sFID when it has neither images nor ``mu_s``/``sigma_s``.
    """
    samples = open_image_set(samples_npz)
    reference_keys = set(npz_keys(reference_npz)) if _is_npz(reference_npz) else {"arr_0"}
    reference = open_image_set(reference_npz) if "arr_0" in reference_keys else None
    if reference is None and not {"mu", "sigma"} <= reference_keys:
        raise ValueError(
            f"{reference_npz} has neither images (arr_0) nor the statistics mu, sigma (and mu_s, sigma_s)."
        )
    if dinov2 is not None and reference is None and not {"mu_dinov2", "sigma_dinov2"} <= reference_keys:
        raise ValueError(f"FD-DINOv2 needs images (arr_0) or mu_dinov2/sigma_dinov2 in {reference_npz}.")
    if reference is not None and _image_size(samples) != _image_size(reference):
        (height, width), (reference_height, reference_width) = _image_size(samples), _image_size(reference)
        raise ValueError(
            f"The samples are {height}x{width} px but the reference images are {reference_height}x{reference_width} "
            "px: FID and the other metrics compare sets of one resolution. Sample at the reference's resolution, or "
            f"build a reference batch from real images at {height}x{width} px (--make_reference)."
        )

    device = torch.device(device) if device is not None else _default_device()
    inception, dinov2 = _resolve_models(inception, inception_weights, dinov2, device, inception_resize)
    run_kwargs = {"batch_size": batch_size, "device": device, "show_progress": show_progress}

    sample_run = _run_inception(
        samples, inception, keep_pool=True, keep_logits=True, desc="samples: Inception", **run_kwargs
    )
    sample_pool = np.concatenate(sample_run.pool)
    results: dict[str, float | int] = {
        "inception_score": inception_score(np.concatenate(sample_run.logits), splits=inception_score_splits)
    }

    reference_run = None
    if reference is not None:
        reference_run = _run_inception(
            reference, inception, keep_pool=True, keep_logits=False, desc="reference: Inception", **run_kwargs
        )
    reference_statistics = _reference_statistics(reference_npz, reference_keys, reference_run)

    results["fid"] = frechet_distance(*sample_run.pool_statistics.finalize(), *reference_statistics["pool"])
    if "spatial" in reference_statistics:
        results["sfid"] = frechet_distance(*sample_run.spatial_statistics.finalize(), *reference_statistics["spatial"])
    if reference_run is not None:
        reference_pool = np.concatenate(reference_run.pool)
        results["precision"], results["recall"] = precision_recall(
            reference_pool, sample_pool, k=precision_recall_k, device=device
        )
    if dinov2 is not None:
        sample_dinov2 = _dinov2_statistics(samples, dinov2, desc="samples: DINOv2", **run_kwargs)
        if {"mu_dinov2", "sigma_dinov2"} <= reference_keys:
            with np.load(reference_npz) as stored:
                reference_dinov2 = (stored["mu_dinov2"], stored["sigma_dinov2"])
        else:
            reference_dinov2 = _dinov2_statistics(reference, dinov2, desc="reference: DINOv2", **run_kwargs)
        results["fd_dinov2"] = frechet_distance(*sample_dinov2, *reference_dinov2)
    results["num_samples"] = len(samples)
    results["num_reference_images"] = len(reference) if reference is not None else 0
    return results


def _image_size(images: ImageSet) -> tuple[int, int]:
    """(height, width) of the first image of a set (all share it)."""
    batches = images.iter_batches(1)
    first = next(batches)
    batches.close()
    return tuple(first.shape[1:3])


def _is_npz(source: ImageSource) -> bool:
    return isinstance(source, str | os.PathLike) and Path(source).suffix == ".npz"


def _reference_statistics(
    reference_npz: ImageSource, keys: set[str], run: _InceptionRun | None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"pool": (mu, sigma)[, "spatial": (mu_s, sigma_s)]}``: all stored ones when the reference has all four,
    else those of its images; the stored pool statistics alone when it has no images (no spatial ones then)."""
    if {"mu", "sigma", "mu_s", "sigma_s"} <= keys:
        with np.load(reference_npz) as stored:
            return {
                "pool": (stored["mu"], stored["sigma"]),
                "spatial": (stored["mu_s"], stored["sigma_s"]),
            }
    if run is None:
        with np.load(reference_npz) as stored:
            return {"pool": (stored["mu"], stored["sigma"])}
    return {"pool": run.pool_statistics.finalize(), "spatial": run.spatial_statistics.finalize()}


def compute_reference_batch(
    images: ImageSource,
    output_path: str | os.PathLike,
    inception_weights: str | os.PathLike | None = None,
    num_images_to_keep: int = 10000,
    seed: int = 0,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    inception: FIDInceptionV3 | None = None,
    dinov2: DINOv2Features | str | os.PathLike | None = None,
    inception_resize: ResizeConvention = "tensorflow",
    show_progress: bool = True,
    center_crop: int | None = None,
) -> Path:
    """Write a reference batch in ADM's layout from a set of real images, center-cropped to the resolution already
    or, for a folder, by `center_crop` (ADM's crop, as the training data: e.g. 256 for COCO val2014's images).

    The ``.npz`` holds ``mu``, ``sigma`` (pool, 2048) and ``mu_s``, ``sigma_s`` (spatial, 2023) over *all* images,
    ``mu_dinov2``/``sigma_dinov2`` when ``dinov2`` is given, and ``arr_0``: ``num_images_to_keep`` images drawn
    without replacement with ``seed`` (in their original order), the real set of precision/recall, like the 10,000
    images of ADM's ``VIRTUAL_imagenet256_labeled.npz``. Statistics are accumulated in float64 in one streaming pass.
    ``inception_resize`` as in [`evaluate_samples`].
    """
    device = torch.device(device) if device is not None else _default_device()
    inception, dinov2 = _resolve_models(inception, inception_weights, dinov2, device, inception_resize)
    images = open_image_set(images, center_crop=center_crop)
    total = len(images)
    keep = np.zeros(total, dtype=bool)
    keep[np.random.default_rng(seed).choice(total, size=min(num_images_to_keep, total), replace=False)] = True

    run = _InceptionRun(keep_pool=False, keep_logits=False)
    dinov2_statistics = RunningStatistics()
    kept: list[np.ndarray] = []
    start = 0
    batches = tqdm(images.iter_batches(batch_size), total=math.ceil(total / batch_size), disable=not show_progress)
    for batch in batches:
        kept.append(batch[keep[start : start + len(batch)]])
        start += len(batch)
        pixels = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).to(device)
        with torch.inference_mode():
            run.add(inception(pixels))
            if dinov2 is not None:
                dinov2_statistics.update(dinov2(pixels).float().cpu().numpy())

    with NpzWriter(output_path) as writer:
        for name, (mu, sigma) in (
            ("", run.pool_statistics.finalize()),
            ("_s", run.spatial_statistics.finalize()),
            *((("_dinov2", dinov2_statistics.finalize()),) if dinov2 is not None else ()),
        ):
            writer.write(f"mu{name}", mu)
            writer.write(f"sigma{name}", sigma)
        writer.write("arr_0", np.concatenate(kept))
    return Path(output_path)


def format_metrics_table(metrics: dict[str, float | int]) -> str:
    """A two-column text table of metric names and values, in ADM's order (the CLIP score after ADM's metrics)."""
    names = {
        "inception_score": "Inception Score",
        "fid": "FID",
        "sfid": "sFID",
        "precision": "Precision",
        "recall": "Recall",
        "fd_dinov2": "FD-DINOv2",
        "clip_score": "CLIP score",
        "num_samples": "samples",
        "num_reference_images": "reference images",
    }
    order = list(names)
    keys = sorted(metrics, key=lambda key: order.index(key) if key in names else len(order))
    rows = [
        (names.get(key, key), f"{metrics[key]:.4f}" if isinstance(metrics[key], float) else str(metrics[key]))
        for key in keys
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)

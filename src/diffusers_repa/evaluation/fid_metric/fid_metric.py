"""`evaluate` metric: ADM-compatible FID, sFID, Inception Score, precision and recall of generated images.

Load with ``evaluate.load(str(diffusers_repa.evaluation.FID_METRIC_PATH))`` (or the path of this folder). The work is
done by :func:`diffusers_repa.evaluation.evaluate_samples`; for 50,000-sample evaluations against ADM's reference
batch, call that (or ``pipelines/evaluate.py``) on ``.npz`` files directly, which streams instead of holding images.
"""

import datasets
import numpy as np

import evaluate
from diffusers_repa.evaluation import evaluate_samples

_DESCRIPTION = """
Fréchet Inception Distance (FID), spatial FID (sFID), Inception Score (IS) and improved precision/recall (k=3),
computed as OpenAI's ADM evaluator does (TensorFlow 2015-12-05 Inception v3, pool_3 / mixed_6/conv / softmax
features, TF1 bilinear resize to 299), with the PyTorch port of the Inception weights (pytorch-fid's
pt_inception-2015-12-05-6726825d.pth). Optionally FD-DINOv2 (Fréchet distance of DINOv2 CLS features).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: generated images (PIL images or uint8 H×W×3 arrays, all one size).
    references: real images (same format); their features give the reference statistics and the real manifold.
    inception_weights: path of the FID Inception weights (default: $DIFFUSERS_REPA_INCEPTION_WEIGHTS or the torch
        hub cache, downloaded once when online).
    batch_size: images per forward pass (default 64).
    device: "cuda", "cpu", ... (default: CUDA if available).
    inception_score_splits: Inception Score chunks (default 10, as ADM; needs at least that many predictions).
    dinov2: DINOv2 checkpoint id or path to also report "fd_dinov2".
    inception: an already built FIDInceptionV3 module (overrides inception_weights).
Predictions and references are stored as pairs by `evaluate`, so pass equally many of each.
Returns:
    inception_score, fid, sfid, precision, recall (and fd_dinov2), num_samples, num_reference_images.
Examples:
    >>> fid = evaluate.load("path/to/fid_metric")
    >>> fid.compute(predictions=fake_images, references=real_images, inception_weights="pt_inception.pth")
"""

_CITATION = """
@inproceedings{dhariwal2021diffusion,
  title={Diffusion Models Beat GANs on Image Synthesis},
  author={Dhariwal, Prafulla and Nichol, Alex},
  booktitle={NeurIPS},
  year={2021}
}
"""


def _stack_images(images) -> np.ndarray:
    arrays = [
        np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.uint8) for image in images
    ]
    return np.stack(arrays)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class FIDMetric(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Image(), "references": datasets.Image()}),
            reference_urls=["https://github.com/openai/guided-diffusion/tree/main/evaluations"],
        )

    def _compute(
        self,
        predictions,
        references,
        inception_weights=None,
        batch_size=64,
        device=None,
        inception_score_splits=10,
        dinov2=None,
        inception=None,
    ):
        return evaluate_samples(
            _stack_images(predictions),
            _stack_images(references),
            inception_weights=inception_weights,
            batch_size=batch_size,
            device=device,
            dinov2=dinov2,
            inception=inception,
            inception_score_splits=inception_score_splits,
            show_progress=False,
        )

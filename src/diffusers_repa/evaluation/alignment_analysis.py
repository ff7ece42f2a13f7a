"""Per-block alignment of a SiT with a vision encoder: CKNNA, CKA and linear-probe accuracy, as a CSV and a plot.

Protocol (the per-block analysis of the kind the REPA paper plots):

1. clean images (uint8, N×3×R×R) → VAE posterior mean → latents ``z = (mean − shift)·scaling_factor`` (or the
   ``latents_mean``/``latents_std`` normalisation when the VAE config has it, the inverse of the pipeline's decode);
   a pixel-space model (no VAE) takes the images themselves, ``z = image / 127.5 − 1``;
2. ``x_t = α_t z + σ_t ε`` at one time ``t`` (t = 0 data, t = 1 noise) with seeded ε, on the model's interpolant path;
3. the transformer runs on ``x_t`` with the **null class** (no label information leaks into the features) and returns
   every block's output (N, T, D);
4. the encoder maps the same uint8 images to (N, T', D');
5. per block: CKNNA (k = 10) and linear CKA against the encoder features, and (with labels) linear-probe top-1
   accuracy on a seeded train/test split.

Pooling: ``"mean"`` (default) averages the tokens of each image on both sides, so the metrics compare N image-level
vectors. ``"tokens"`` keeps every token as a row (N·T rows; needs the same token grid on both sides, T = T') and
measures patch-level alignment — the level REPA's loss acts on — at O((N·T)²) memory. The linear probe always uses
the mean-pooled block output (global pooling), whatever ``pooling`` is.
"""

from __future__ import annotations

import csv
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..atomic_files import write_file_atomically
from ..interpolants import interpolate
from ..latents import vae_latent_shift_and_scale
from .alignment import cka, cknna, linear_probe_accuracy
from .image_io import open_image_set

Pooling = Literal["mean", "tokens"]


@dataclass
class BlockAlignment:
    """Alignment scores of one transformer block (1-based ``block``) with the encoder."""

    block: int
    cknna: float
    cka: float
    probe_accuracy: float | None = None


def _encode_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    posterior_mean = vae.encode(pixels.to(vae.dtype)).latent_dist.mean.float()
    shift, scale = (value.to(posterior_mean) for value in vae_latent_shift_and_scale(vae.config))
    return (posterior_mean - shift) * scale


@torch.no_grad()
def collect_features(
    transformer,
    vae,
    encoder,
    images,
    t: float = 0.5,
    path_type: str = "linear",
    batch_size: int = 32,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Block outputs and encoder features of the same images.

    Args:
        transformer: a [`SiTTransformer2DModel`] (``output_hidden_states=True`` support).
        vae: the autoencoder of the transformer's latent space (None for a pixel-space model).
        encoder: uint8 (N, 3, R, R) → (N, T', D') (e.g. [`~diffusers_repa.encoders.load_encoder`]).
        images: uint8 images: ``.npz`` (``arr_0``), folder, or (N, R, R, 3) array.
        t: noise level of the transformer input, in [0, 1] (t = 0 clean).
        path_type: ``"linear"`` or ``"cosine"``, the interpolant the model was trained with.

    Returns:
        ``(hidden_states, encoder_features)``: one (N, T, D) float32 CPU tensor per block, and (N, T', D').
    """
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1] (t = 0 data, t = 1 noise), got {t}.")
    device = torch.device(device) if device is not None else transformer.device
    transformer.eval().to(device)
    if vae is not None:
        vae.eval().to(device)
    encoder.eval().to(device)
    generator = torch.Generator().manual_seed(seed)
    null_class = transformer.config.num_classes
    blocks: list[list[torch.Tensor]] = []
    targets: list[torch.Tensor] = []
    for batch in open_image_set(images).iter_batches(batch_size):
        pixels_uint8 = torch.from_numpy(batch).permute(0, 3, 1, 2).to(device)
        pixels = pixels_uint8.float() / 127.5 - 1.0
        latents = pixels if vae is None else _encode_latents(vae, pixels)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        time = torch.full((len(latents),), float(t), device=device)
        noisy, _ = interpolate(latents, noise, time, path_type)
        output = transformer(
            noisy.to(transformer.dtype),
            timestep=time,
            class_labels=torch.full((len(latents),), null_class, device=device, dtype=torch.long),
            return_projections=False,
            output_hidden_states=True,
        )
        if not blocks:
            blocks = [[] for _ in output.hidden_states]
        for collected, hidden in zip(blocks, output.hidden_states):
            collected.append(hidden.float().cpu())
        targets.append(encoder(pixels_uint8).float().cpu())
    return [torch.cat(collected) for collected in blocks], torch.cat(targets)


def _pool(features: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    if pooling == "mean":
        return features.mean(dim=1)
    if pooling == "tokens":
        return features.reshape(-1, features.shape[-1])
    raise ValueError(f"pooling must be 'mean' or 'tokens', got {pooling!r}.")


def alignment_by_block(
    hidden_states: list[torch.Tensor],
    encoder_features: torch.Tensor,
    labels: np.ndarray | torch.Tensor | None = None,
    k: int = 10,
    pooling: Pooling = "mean",
    probe_train_fraction: float = 0.8,
    probe_epochs: int = 100,
    probe_lr: float = 1e-3,
    seed: int = 0,
) -> list[BlockAlignment]:
    """CKNNA, CKA and (if ``labels``) linear-probe accuracy of every block against the encoder features.

    ``hidden_states``: one (N, T, D) tensor per block; ``encoder_features``: (N, T', D'). See the module docstring for
    ``pooling``. The probe trains on a seeded ``probe_train_fraction`` of the images and reports test accuracy.
    """
    if pooling == "tokens" and hidden_states[0].shape[1] != encoder_features.shape[1]:
        raise ValueError(
            f"pooling='tokens' needs the same number of tokens on both sides, got {hidden_states[0].shape[1]} (SiT) "
            f"and {encoder_features.shape[1]} (encoder); use pooling='mean' or an encoder resolution with that grid."
        )
    target = _pool(encoder_features, pooling)
    split = None
    if labels is not None:
        labels = torch.as_tensor(labels).long()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        cut = int(round(probe_train_fraction * len(labels)))
        if not 0 < cut < len(labels):
            raise ValueError(f"probe_train_fraction {probe_train_fraction} leaves an empty train or test split.")
        split = (order[:cut], order[cut:])
    results = []
    for block, hidden in enumerate(hidden_states, start=1):
        features = _pool(hidden, pooling)
        accuracy = None
        if split is not None:
            pooled = hidden.mean(dim=1)
            train, test = split
            accuracy = linear_probe_accuracy(
                pooled[train], labels[train], pooled[test], labels[test], epochs=probe_epochs, lr=probe_lr, seed=seed
            )
        results.append(
            BlockAlignment(
                block=block, cknna=cknna(features, target, k=k), cka=cka(features, target), probe_accuracy=accuracy
            )
        )
    return results


def write_alignment_csv(results: list[BlockAlignment], path: str | os.PathLike) -> Path:
    """One row per block: ``block,cknna,cka,probe_accuracy`` (empty accuracy without labels)."""

    def write(temporary: Path) -> None:
        with open(temporary, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=["block", "cknna", "cka", "probe_accuracy"])
            writer.writeheader()
            for row in results:
                writer.writerow({key: ("" if value is None else value) for key, value in asdict(row).items()})

    return write_file_atomically(path, write)


_SERIES_COLOURS = {"cknna": (31, 119, 180), "cka": (255, 127, 14), "probe_accuracy": (44, 160, 44)}


def plot_alignment(results: list[BlockAlignment], path: str | os.PathLike, title: str = "alignment by block") -> Path:
    """A line plot (PNG, drawn with PIL) of every score against the block index, y from 0 to 1."""
    width, height, margin = 640, 400, 56
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = margin, margin // 2 + 10, width - margin // 2 - 110, height - margin
    draw.rectangle([left, top, right, bottom], outline="black")
    blocks = [row.block for row in results]
    first, last = min(blocks), max(blocks)

    def to_pixel(block: float, value: float) -> tuple[float, float]:
        x = left + (right - left) * ((block - first) / (last - first) if last > first else 0.5)
        return x, bottom - (bottom - top) * min(max(value, 0.0), 1.0)

    for tick in np.linspace(0, 1, 6):
        _, y = to_pixel(first, tick)
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((left - 34, y - 6), f"{tick:.1f}", fill="black")
    for block in blocks:
        x, _ = to_pixel(block, 0)
        draw.line([x, bottom, x, bottom + 4], fill="black")
        draw.text((x - 4, bottom + 6), str(block), fill="black")
    draw.text(((left + right) // 2 - 16, bottom + 22), "block", fill="black")
    draw.text((left, 8), title, fill="black")
    for rank, (name, colour) in enumerate(_SERIES_COLOURS.items()):
        values = [getattr(row, name) for row in results]
        if any(value is None for value in values):
            continue
        points = [to_pixel(block, value) for block, value in zip(blocks, values)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        legend_y = top + 16 * rank
        draw.line([right + 12, legend_y + 6, right + 32, legend_y + 6], fill=colour, width=2)
        draw.text((right + 38, legend_y), name, fill="black")
    return write_file_atomically(path, lambda temporary: image.save(temporary, format="PNG"))


def analyze_alignment(
    transformer,
    vae,
    encoder,
    images,
    output_dir: str | os.PathLike,
    labels: np.ndarray | torch.Tensor | None = None,
    t: float = 0.5,
    path_type: str = "linear",
    k: int = 10,
    pooling: Pooling = "mean",
    probe_epochs: int = 100,
    probe_lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> list[BlockAlignment]:
    """[`collect_features`] + [`alignment_by_block`]; writes ``alignment.csv`` and ``alignment.png`` to ``output_dir``."""
    hidden_states, encoder_features = collect_features(
        transformer, vae, encoder, images, t=t, path_type=path_type, batch_size=batch_size, seed=seed, device=device
    )
    results = alignment_by_block(
        hidden_states,
        encoder_features,
        labels,
        k=k,
        pooling=pooling,
        probe_epochs=probe_epochs,
        probe_lr=probe_lr,
        seed=seed,
    )
    output_dir = Path(output_dir)
    write_alignment_csv(results, output_dir / "alignment.csv")
    plot_alignment(results, output_dir / "alignment.png", title=f"SiT vs encoder, t = {t}, {pooling} pooling, k = {k}")
    return results

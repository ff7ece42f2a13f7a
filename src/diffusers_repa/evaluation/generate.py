"""Sample generation for FID-50K: PNGs ``{i:06d}.png`` plus one ADM-layout ``.npz``, distributed with accelerate.

Class-conditional with a [`SiTPipeline`] (class labels drawn per sample), or text-to-image with an
[`MMDiTPipeline`] and a list of prompts (sample ``i`` gets ``prompts[i % len(prompts)]``; the prompt of every sample
is written to ``prompts.json`` and into the ``.npz``, so that the CLIP score can pair them).

Reproducibility: sample ``i``'s class label, initial noise and SDE noise come from generators seeded with
``numpy.random.SeedSequence(seed, spawn_key=(i, stream))``, so every sample depends only on ``(seed, i)`` (and, for
``label_sampling="equal"``, on ``num_samples``) — not on the number of processes, the batch size, or which samples a
previous run already wrote. Noise is drawn on the CPU and moved to the device, so it is the same on every device.

Resumption: a PNG is written under a temporary name and renamed into place, so an existing ``{i:06d}.png`` is always
complete; a new run skips those and generates the rest. ``generation_config.json`` in the folder records the
settings, and resuming with different settings is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image
from tqdm.auto import tqdm

from ..atomic_files import write_file_atomically, write_text_atomically
from .image_io import NpzWriter, read_image_file
from .prompts import NPZ_PROMPTS_KEY, PROMPTS_NAME, check_prompts

LabelSampling = Literal["random", "equal"]
Sampler = Literal["sde", "ode"]

_LABEL_STREAM, _NOISE_STREAM, _STEP_NOISE_STREAM = 0, 1, 2
GENERATION_CONFIG_NAME = "generation_config.json"
CLASS_CONDITIONAL_NUM_SAMPLES = 50000  # FID-50K


def sample_seed(seed: int, index: int, stream: int) -> int:
    """A 63-bit seed for random stream ``stream`` of sample ``index`` (independent across indices and streams)."""
    state = np.random.SeedSequence(seed, spawn_key=(index, stream)).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def sample_labels(
    num_samples: int, num_classes: int, seed: int, label_sampling: LabelSampling = "random"
) -> np.ndarray:
    """Class labels (num_samples,) of the samples.

    ``"random"``: uniform over the classes, label ``i`` drawn from its own seeded generator (as the original REPA
    sampling script draws uniform random classes). ``"equal"``: every class ``num_samples // num_classes`` times (the
    first ``num_samples % num_classes`` classes once more), in an order shuffled with ``seed``.
    """
    if num_samples < 1 or num_classes < 1:
        raise ValueError(f"num_samples and num_classes must be positive, got {num_samples} and {num_classes}.")
    if label_sampling == "random":
        return np.array(
            [
                np.random.default_rng(sample_seed(seed, i, _LABEL_STREAM)).integers(num_classes)
                for i in range(num_samples)
            ],
            dtype=np.int64,
        )
    if label_sampling == "equal":
        labels = np.arange(num_samples, dtype=np.int64) % num_classes
        return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_LABEL_STREAM,))).permutation(labels)
    raise ValueError(f"label_sampling must be 'random' or 'equal', got {label_sampling!r}.")


def _scheduler_for(pipeline, sampler: Sampler, heun: bool, path_type: str | None):
    from ..schedulers.scheduling_sit_ode import SiTODEScheduler
    from ..schedulers.scheduling_sit_sde import SiTSDEScheduler

    if sampler == "ode":
        return SiTODEScheduler(solver="heun" if heun else "euler")
    if sampler == "sde":
        if heun:
            raise ValueError("heun=True is an ODE solver option; the SDE sampler is Euler–Maruyama only.")
        path_type = path_type or pipeline.scheduler.config.get("path_type", "linear")
        return SiTSDEScheduler(path_type=path_type)
    raise ValueError(f"sampler must be 'sde' or 'ode', got {sampler!r}.")


def load_generation_pipeline(name_or_path: str | os.PathLike, **kwargs):
    """The [`MMDiTPipeline`] or [`SiTPipeline`] saved in a folder or Hub repo, by the class its ``model_index.json``
    names; ``kwargs`` go to ``from_pretrained`` (e.g. ``dtype``)."""
    from ..pipelines.pipeline_mmdit import MMDiTPipeline
    from ..pipelines.pipeline_sit import SiTPipeline

    class_name = SiTPipeline.load_config(name_or_path).get("_class_name")
    pipeline_class = MMDiTPipeline if class_name == MMDiTPipeline.__name__ else SiTPipeline
    return pipeline_class.from_pretrained(name_or_path, **kwargs)


def _check_task(pipeline, prompts: Sequence[str] | None) -> list[str] | None:
    """The prompts (a list) for a text-to-image pipeline, None for a class-conditional one; a ValueError when
    prompts are missing or were given to a class-conditional pipeline."""
    from ..pipelines.pipeline_mmdit import MMDiTPipeline

    if not isinstance(pipeline, MMDiTPipeline):
        if prompts is not None:
            raise ValueError(
                f"Prompts were given, but the {type(pipeline).__name__} is class-conditional (it samples class "
                "labels); prompts are for a text-to-image MMDiTPipeline."
            )
        return None
    if prompts is None:
        raise ValueError(
            "The MMDiTPipeline is text-to-image: give the prompts to sample (--prompts_file, or --captions_dataset "
            "with --caption_column)."
        )
    if pipeline.tokenizer is None or pipeline.text_encoder is None:
        raise ValueError(
            "The MMDiTPipeline has no tokenizer and text_encoder to encode the prompts; save it with its CLIP text "
            "encoder (e.g. convert_repa_to_diffusers.py --text_to_image --vae ... --text_encoder ...)."
        )
    return check_prompts(prompts)


def _check_resume_config(output_dir: Path, config: dict, is_main_process: bool) -> None:
    path = output_dir / GENERATION_CONFIG_NAME
    if path.is_file():
        existing = json.loads(path.read_text())
        if existing != config:
            changed = sorted(key for key in config.keys() | existing.keys() if existing.get(key) != config.get(key))
            raise ValueError(
                f"{output_dir} holds samples made with other settings ({', '.join(changed)} differ); use a new "
                "output folder or the same settings to resume."
            )
    elif is_main_process:
        write_text_atomically(path, json.dumps(config, indent=2))


def _save_png(image: np.ndarray, path: Path) -> None:
    write_file_atomically(path, lambda temporary: Image.fromarray(image).save(temporary, format="PNG"))


def generate_samples(
    pipeline,
    output_dir: str | os.PathLike,
    num_samples: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
    sampler: Sampler = "sde",
    num_inference_steps: int = 250,
    heun: bool = False,
    guidance_scale: float = 1.0,
    guidance_interval: Sequence[float] = (0.0, 1.0),
    label_sampling: LabelSampling = "random",
    path_type: str | None = None,
    npz_path: str | os.PathLike | None = None,
    accelerator: Accelerator | None = None,
    mixed_precision: Literal["no", "bf16", "fp16"] = "no",
    compile_mode: Literal["blocks", "graph", "cuda_graphs"] | None = None,
    prompts: Sequence[str] | None = None,
    show_progress: bool = True,
) -> Path | None:
    """Generate ``num_samples`` images with a [`SiTPipeline`] (class-conditional) or an [`MMDiTPipeline`]
    (text-to-image, from ``prompts``) into ``output_dir`` and pack them into an ``.npz``.

    Each process of ``accelerator`` (``accelerate launch``) takes every ``num_processes``-th missing index; existing
    PNGs are kept. When all are there, the main process writes ``npz_path`` (default ``<output_dir>.npz``) with
    ``arr_0`` (uint8 N×H×W×3, ADM layout, streamed) and ``arr_1`` (int64 labels) or, text-to-image, ``prompts``
    (N strings).

    Args:
        pipeline: a [`SiTPipeline`] or [`MMDiTPipeline`], or a folder / Hub id to load one from.
        num_samples: how many images; default 50,000 class-conditional, one per prompt text-to-image (more than
            ``len(prompts)`` cycles through them).
        sampler: ``"sde"`` (Euler–Maruyama, the paper's 1.42 setting) or ``"ode"`` (Euler, or Heun with ``heun``).
        num_inference_steps, guidance_scale, guidance_interval: as [`SiTPipeline.__call__`]; the paper uses SDE, 250
            steps, CFG 1.8 on ``(0.0, 0.7)``.
        label_sampling: ``"random"`` (uniform classes, as the original) or ``"equal"`` (balanced), see
            [`sample_labels`].
        path_type: interpolant of the SDE scheduler (default: the pipeline scheduler's, else ``"linear"``).
        accelerator: default ``Accelerator(mixed_precision=mixed_precision)``; the model runs under its autocast.
        compile_mode: compile the transformer first (`SiTPipeline.compile_transformer`: ``"blocks"``, ``"graph"``
            or ``"cuda_graphs"``); None runs it eagerly. Compiled kernels may round differently, nothing else changes.
        prompts: the captions of a text-to-image pipeline (required for it, refused for a class-conditional one);
            sample ``i`` gets ``prompts[i % len(prompts)]``, written to ``prompts.json`` in ``output_dir``. The
            original's ``generate_t2i.py`` samples 40,192 COCO val captions with ODE (Euler), 50 steps, CFG 1.5.

    Returns:
        The ``.npz`` path on the main process, None on the others.
    """
    for name, value in (("num_samples", num_samples), ("batch_size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    accelerator = accelerator or Accelerator(mixed_precision=mixed_precision)
    if isinstance(pipeline, str | os.PathLike):
        pipeline = load_generation_pipeline(pipeline)
    prompts = _check_task(pipeline, prompts)
    if num_samples is None:
        num_samples = CLASS_CONDITIONAL_NUM_SAMPLES if prompts is None else len(prompts)
    pipeline.scheduler = _scheduler_for(pipeline, sampler, heun, path_type)
    # The sampling settings are checked before they are recorded for resumption and before the first sample.
    if prompts is None:
        pipeline.check_inputs(batch_size, num_inference_steps, guidance_scale, guidance_interval, None, None, "pt", [])
    else:
        pipeline.check_inputs(
            prompts[:1], None, None, num_inference_steps, guidance_scale, guidance_interval, None, None, "pt", []
        )
    pipeline = pipeline.to(accelerator.device)
    pipeline.set_progress_bar_config(disable=True)
    if compile_mode is not None:
        pipeline.compile_transformer(compile_mode)

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    transformer_config = pipeline.transformer.config
    settings = {
        "num_samples": num_samples,
        "seed": seed,
        "sampler": sampler,
        "num_inference_steps": num_inference_steps,
        "heun": heun,
        "guidance_scale": guidance_scale,
        "guidance_interval": [float(value) for value in guidance_interval],
        "path_type": pipeline.scheduler.config.get("path_type"),
    }
    if prompts is None:
        labels, sample_prompts = sample_labels(num_samples, transformer_config.num_classes, seed, label_sampling), None
        settings["label_sampling"] = label_sampling
    else:
        labels, sample_prompts = None, [prompts[i % len(prompts)] for i in range(num_samples)]
        # A digest of the prompts, so that resuming with other prompts is refused like other settings.
        serialized = json.dumps(sample_prompts, ensure_ascii=False).encode()
        settings["prompts_sha256"] = hashlib.sha256(serialized).hexdigest()
    _check_resume_config(output_dir, settings, accelerator.is_main_process)
    if sample_prompts is not None and accelerator.is_main_process:
        write_text_atomically(output_dir / PROMPTS_NAME, json.dumps(sample_prompts, ensure_ascii=False, indent=0))

    missing = [i for i in range(num_samples) if not (output_dir / f"{i:06d}.png").is_file()]
    # Every process must list the folder before any of them writes into it, or the shares would disagree.
    accelerator.wait_for_everyone()
    mine = missing[accelerator.process_index :: accelerator.num_processes]
    latent_shape = (transformer_config.in_channels, transformer_config.sample_size, transformer_config.sample_size)
    progress = tqdm(
        total=len(mine),
        desc=f"samples (process {accelerator.process_index}, {num_samples - len(missing)} done before)",
        disable=not (show_progress and accelerator.is_main_process),
    )
    for start in range(0, len(mine), batch_size):
        indices = mine[start : start + batch_size]
        latents = torch.stack(
            [
                torch.randn(latent_shape, generator=torch.Generator().manual_seed(sample_seed(seed, i, _NOISE_STREAM)))
                for i in indices
            ]
        )
        step_generators = [torch.Generator().manual_seed(sample_seed(seed, i, _STEP_NOISE_STREAM)) for i in indices]
        condition = (
            {"class_labels": labels[indices].tolist()}
            if sample_prompts is None
            else {"prompt": [sample_prompts[i] for i in indices]}
        )
        with accelerator.autocast():
            images = pipeline(
                **condition,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                guidance_interval=tuple(guidance_interval),
                generator=step_generators,
                latents=latents.to(accelerator.device),
                output_type="pt",
            ).images
        images = (images.float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for index, image in zip(indices, images):
            _save_png(image, output_dir / f"{index:06d}.png")
        progress.update(len(indices))
    progress.close()

    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    npz_path = npz_path or output_dir.with_suffix(".npz")
    return write_samples_npz(output_dir, num_samples, labels, npz_path, prompts=sample_prompts)


def write_samples_npz(
    output_dir: str | os.PathLike,
    num_samples: int,
    labels: np.ndarray | None,
    npz_path: str | os.PathLike,
    chunk: int = 256,
    prompts: Sequence[str] | None = None,
) -> Path:
    """Pack ``{i:06d}.png`` for i < num_samples into ``npz_path``: ``arr_0`` uint8 N×H×W×3, ``arr_1`` the labels
    (when given) and ``prompts`` the N prompts (when given, a unicode string array that ``np.load`` reads without
    pickle)."""
    output_dir = Path(output_dir)
    paths = [output_dir / f"{i:06d}.png" for i in range(num_samples)]
    absent = [path.name for path in paths if not path.is_file()]
    if absent:
        raise FileNotFoundError(
            f"{len(absent)} samples are missing in {output_dir} (first: {absent[0]}); rerun to resume."
        )
    first = read_image_file(paths[0])

    def batches():
        for begin in range(0, num_samples, chunk):
            yield np.stack([read_image_file(path) for path in paths[begin : begin + chunk]])

    with NpzWriter(npz_path) as writer:
        writer.write_batches("arr_0", batches(), shape=(num_samples, *first.shape), dtype=np.uint8)
        if labels is not None:
            writer.write("arr_1", np.asarray(labels, dtype=np.int64))
        if prompts is not None:
            writer.write(NPZ_PROMPTS_KEY, np.asarray(list(prompts), dtype=str))
    return Path(npz_path)

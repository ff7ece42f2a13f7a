"""Class-conditional image generation with a SiT velocity model (REPA), as a diffusers pipeline."""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.models import AutoencoderKL
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils import replace_example_docstring

from ..models.transformer_sit import SiTTransformer2DModel
from ..schedulers.scheduling_sit_ode import SiTODEScheduler
from ..schedulers.scheduling_sit_sde import SiTSDEScheduler
from .flow_sampling import FlowSamplingMixin
from .lora_loader_sit import SiTLoraLoaderMixin

CompileMode = Literal["blocks", "graph", "cuda_graphs"]
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)
_IMAGENET_ID2LABEL_FILE = Path(__file__).with_name("imagenet_id2label.json")

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers_repa import SiTPipeline, SiTSDEScheduler

        >>> pipe = SiTPipeline.from_pretrained("org/sit-xl-repa", dtype=torch.bfloat16).to("cuda")
        >>> pipe.scheduler = SiTSDEScheduler(path_type="linear")
        >>> # The paper's setting (FID 1.42): SDE, 250 steps, CFG 1.8 only for t in [0, 0.7] (t = 1 is noise).
        >>> images = pipe(
        ...     ["golden retriever", 88, 979],
        ...     num_inference_steps=250,
        ...     guidance_scale=1.8,
        ...     guidance_interval=(0.0, 0.7),
        ...     generator=torch.Generator("cuda").manual_seed(0),
        ... ).images
        >>> images[0].save("golden_retriever.png")
        ```
"""


@cache
def _read_imagenet_id2label() -> dict[str, str]:
    return json.loads(_IMAGENET_ID2LABEL_FILE.read_text(encoding="utf-8"))


def imagenet_id2label() -> dict[int, str]:
    """The 1000 ImageNet-1k class names by class id, comma-separated synonyms per class (DiT's ``id2label``)."""
    return {int(key): value for key, value in _read_imagenet_id2label().items()}


class SiTPipeline(FlowSamplingMixin, DiffusionPipeline, SiTLoraLoaderMixin):
    r"""Class-conditional generation with a [`SiTTransformer2DModel`] (velocity model, t = 1 noise, t = 0 data).

    Sampling starts from Gaussian latents at t = 1 and follows the scheduler to t = 0; the latents are then decoded
    with the VAE (``z / scaling_factor``). The sampler state is kept in float64 (float32 on MPS) as in the original
    REPA samplers; the transformer runs in its own dtype.

    Pixel space: without a VAE and with a 3-channel transformer, the transformer's sample *is* the RGB image x in
    [-1, 1] (trained on ``x = uint8 / 127.5 − 1``); it is mapped to [0, 1] and clamped like a decoded image.

    Classifier-free guidance: when ``guidance_scale > 1`` and ``low ≤ t ≤ high`` for the time t at which a solver step
    starts, the conditional and null-class (id ``num_classes``) inputs run as one doubled batch and the velocity
    becomes ``uncond + w·(cond − uncond)``; outside the interval only the conditional batch runs. A Heun corrector
    keeps the decision of its predictor step, as REPA's sampler does.

    Callbacks follow diffusers' conventions: during a call `guidance_scale`, `do_classifier_free_guidance`,
    `num_timesteps` and `interrupt` describe the run; a ``callback_on_step_end`` (a function, or diffusers'
    [`PipelineCallback`] / [`MultiPipelineCallbacks`] with ``tensor_inputs = ["latents"]``) may replace the latents,
    set ``pipe._guidance_scale`` for the following steps (e.g. 1 to stop guiding after ``num_timesteps // 2``) or
    ``pipe._interrupt = True`` to stop early.

    Schedulers: [`SiTODEScheduler`] (Euler/Heun), [`SiTSDEScheduler`] (Euler–Maruyama) and diffusers'
    [`FlowMatchEulerDiscreteScheduler`] (linear path only; its timesteps are ``t · num_train_timesteps`` and are
    converted to the model's t, and its default grid is ``linspace(1, 1/num_train_timesteps, N)`` then 0).

    Args:
        transformer ([`SiTTransformer2DModel`]): the velocity model.
        vae ([`AutoencoderKL`], *optional*): decodes latents to images. None for a pixel-space transformer
            (``in_channels=3``), or to get only ``output_type="latent"`` from a latent-space one.
        scheduler: one of the schedulers above.
        id2label (`dict`, *optional*): class names by id (ImageNet: [`imagenet_id2label`]); comma-separated synonyms
            each name the class. Stored in ``model_index.json``.
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        transformer: SiTTransformer2DModel,
        vae: AutoencoderKL | None,
        scheduler: SiTODEScheduler | SiTSDEScheduler | FlowMatchEulerDiscreteScheduler,
        id2label: dict[str, str] | dict[int, str] | None = None,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)
        if id2label is not None:
            # JSON object keys are strings: store them that way so that saved and loaded configs agree.
            id2label = {str(self._check_class_id(key, "id2label key")): name for key, name in id2label.items()}
        self.register_to_config(id2label=id2label)
        self.labels, self._ambiguous_labels = self._index_label_names(id2label or {})
        # Pixel space (no VAE): the transformer's sample side is the image side.
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    def compile_transformer(self, mode: CompileMode = "blocks") -> None:
        """Compile the transformer in place for sampling, with static shapes.

        Graphs are built on the first call with each batch shape: under guidance the doubled batch (2N) and, outside
        the guidance interval, the plain batch (N) get one each, so compilation happens during the first image batch
        and every later batch of the same size reuses it.

        Args:
            mode: ``"blocks"``: regional compilation of the repeated SiT blocks (`compile_repeated_blocks`), fast to
                compile and most of the gain; ``"graph"``: the whole forward as one graph (also fuses the
                embeddings and the final layer; slower to compile); ``"cuda_graphs"``: ``"graph"`` replayed as CUDA
                graphs (``torch.compile(mode="reduce-overhead")``), which removes the per-kernel launch cost that
                dominates small batches. CUDA only. A replay overwrites the previous output, which the sampling loop
                has consumed by then.
        """
        if mode not in COMPILE_MODES:
            raise ValueError(f"mode must be one of {COMPILE_MODES}, got {mode!r}.")
        if mode == "blocks":
            self.transformer.compile_repeated_blocks(fullgraph=True, dynamic=False)
            return
        if mode == "cuda_graphs" and self.transformer.device.type != "cuda":
            raise ValueError(
                f"CUDA graphs need the transformer on a CUDA device, it is on {self.transformer.device}; move the "
                "pipeline with .to('cuda') first, or use mode='graph' or 'blocks'."
            )
        torch_mode = "reduce-overhead" if mode == "cuda_graphs" else None
        self.transformer.compile(fullgraph=True, dynamic=False, mode=torch_mode)

    @staticmethod
    def _index_label_names(id2label: dict[str, str]) -> tuple[dict[str, int], dict[str, list[int]]]:
        """Name → class id for every synonym; synonyms shared by several classes (ImageNet's "crane") kept apart."""
        ids_by_name: dict[str, set[int]] = {}
        for key, names in id2label.items():
            for name in names.split(","):
                ids_by_name.setdefault(name.strip(), set()).add(int(key))
        unique = {name: next(iter(ids)) for name, ids in sorted(ids_by_name.items()) if len(ids) == 1}
        ambiguous = {name: sorted(ids) for name, ids in ids_by_name.items() if len(ids) > 1}
        return unique, ambiguous

    def _check_class_id(self, class_id: int | str, what: str = "class label") -> int:
        num_classes = self.transformer.config.num_classes
        if isinstance(class_id, str) and class_id.strip().isdigit():
            class_id = int(class_id)
        if isinstance(class_id, bool) or not isinstance(class_id, (int, np.integer)):
            raise ValueError(f"{what} {class_id!r} is not an integer class id.")
        value = int(class_id)
        if not 0 <= value < num_classes:
            raise ValueError(
                f"{what} {class_id!r} is out of range: class ids go from 0 to {num_classes - 1} "
                f"({num_classes} is the null class used for guidance)."
            )
        return value

    def get_label_ids(self, label: str | Sequence[str]) -> list[int]:
        """Class ids of class names (any of a class's comma-separated synonyms, exact spelling).

        Raises:
            ValueError: for an unknown name (with close matches) or a name shared by several classes.
        """
        names = [label] if isinstance(label, str) else list(label)
        ids = []
        for name in names:
            key = name.strip()
            if key in self.labels:
                ids.append(self.labels[key])
            elif key in self._ambiguous_labels:
                raise ValueError(
                    f"Class name {name!r} names several classes {self._ambiguous_labels[key]}; pass the class id."
                )
            elif not self.labels:
                raise ValueError(
                    f"Class name {name!r} given, but this pipeline has no id2label; pass integer class ids or build "
                    "the pipeline with id2label (e.g. diffusers_repa.pipelines.imagenet_id2label())."
                )
            else:
                close = difflib.get_close_matches(key, self.labels, n=3)
                hint = (
                    f" Did you mean {', '.join(map(repr, close))}?" if close else " See `pipe.labels` for the names."
                )
                raise ValueError(f"Unknown class name {name!r}.{hint}")
        return ids

    def _resolve_class_labels(
        self, class_labels: int | str | Sequence[int | str] | np.ndarray | torch.Tensor
    ) -> list[int]:
        if class_labels is None:
            raise ValueError("class_labels is required: one class id or name per image, e.g. [207, 'tench'].")
        if isinstance(class_labels, (torch.Tensor, np.ndarray)):
            class_labels = class_labels.reshape(-1).tolist()
        elif isinstance(class_labels, (int, str, np.integer)):
            class_labels = [class_labels]
        elif isinstance(class_labels, Mapping) or not isinstance(class_labels, Sequence):
            raise ValueError(
                "class_labels must be a class id, a class name, or a list or tensor of them (one per image), got a "
                f"{type(class_labels).__name__}: {class_labels!r}."
            )
        ids = [
            self.get_label_ids(label)[0]
            if isinstance(label, str) and not label.strip().isdigit()
            else self._check_class_id(label)
            for label in class_labels
        ]
        if not ids:
            raise ValueError("class_labels is empty; pass at least one class id or name.")
        return ids

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        class_labels: int | str | Sequence[int | str] | np.ndarray | torch.Tensor,
        num_inference_steps: int = 250,
        guidance_scale: float = 1.0,
        guidance_interval: tuple[float, float] = (0.0, 1.0),
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        step_noises: Sequence[torch.Tensor] | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate one image per class label.

        Args:
            class_labels: class ids (ints or digit strings) and/or class names (see `get_label_ids`), one per image:
                a single id or name, a list, or an integer array or tensor.
            num_inference_steps: scheduler steps N (SDE and Euler: N model calls; Heun: 2N − 1).
            guidance_scale: classifier-free guidance weight w ≥ 1, finite; 1 disables guidance (REPA's paper
                setting: 1.8). Exposed as `guidance_scale` during the call; a callback may change it.
            guidance_interval: ``(low, high)``; guidance is applied only while ``low ≤ t ≤ high`` (t = 1 noise),
                e.g. ``(0.0, 0.7)`` in the paper.
            generator: random generator for the initial latents and the SDE noise, or a list of one per image.
            latents: initial noise (N, C, H, W) at t = 1, one per label, floating point and finite; drawn from
                `generator` if not given.
            output_type: ``"pil"``, ``"np"`` (N, H, W, 3) in [0, 1], ``"pt"`` (N, 3, H, W) in [0, 1] (the VAE's dtype;
                float32 in pixel space), or ``"latent"`` (the final latents z, or in pixel space the unclamped image
                x in [-1, 1], in the sampler's float64 state precision).
            return_dict: return an [`ImagePipelineOutput`] instead of a tuple.
            callback_on_step_end: a function, [`PipelineCallback`] or [`MultiPipelineCallbacks`] called after every
                step as ``callback(pipe, i, t, callback_kwargs)`` with the tensors named in
                `callback_on_step_end_tensor_inputs`; it returns a dict, whose ``latents`` (if present) replace the
                state. It may read `num_timesteps`, `guidance_scale`, `do_classifier_free_guidance` and
                `interrupt`, change the guidance for the following steps by setting ``pipe._guidance_scale`` (a Heun
                corrector still follows its predictor's decision to guide), and stop early with
                ``pipe._interrupt = True``.
            callback_on_step_end_tensor_inputs: tensors passed to the callback (only ``"latents"``).
            step_noises: Gaussian noise for each stochastic scheduler step instead of fresh draws (one (N, C, H, W)
                tensor per step, `scheduler.num_stochastic_steps` of them); for reproducing a recorded run with
                [`SiTSDEScheduler`].

        Examples:

        Returns:
            [`ImagePipelineOutput`] with ``images``, or the tuple ``(images,)``.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        label_ids = self._resolve_class_labels(class_labels)
        batch_size = len(label_ids)
        self.check_inputs(
            batch_size,
            num_inference_steps,
            guidance_scale,
            guidance_interval,
            generator,
            latents,
            output_type,
            callback_on_step_end_tensor_inputs,
        )
        self._guidance_scale = guidance_scale
        self._interrupt = False
        config = self.transformer.config

        device = self._execution_device
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = self.prepare_latents(batch_size, config.in_channels, config.sample_size, device, generator, latents)
        labels = torch.tensor(label_ids, device=device)
        guided_labels = torch.cat([labels, torch.full_like(labels, config.num_classes)])  # + the null class
        latents = self._sample(
            latents,
            {"class_labels": labels},
            {"class_labels": guided_labels},
            guidance_interval,
            generator,
            step_noises,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
        )
        return self._output(latents, output_type, return_dict)

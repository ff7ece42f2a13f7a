"""Text-to-image generation with REPA's MMDiT velocity model, as a diffusers pipeline.

The sampling loop is the class-conditional [`SiTPipeline`]'s with CLIP token features in place of class labels, and
numerically the original ``samplers_t2i.py``: inside the guidance interval the batch is doubled as
``[conditional; unconditional]`` with the empty caption's features as the unconditional context.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.models import AutoencoderKL
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils import replace_example_docstring
from transformers import CLIPTextModel, CLIPTokenizer

from ..models.transformer_mmdit import MMDiTTransformer2DModel
from ..schedulers.scheduling_sit_ode import SiTODEScheduler
from ..schedulers.scheduling_sit_sde import SiTSDEScheduler
from ..text_encoding import CLIP_MAX_LENGTH, encode_text
from .flow_sampling import FlowSamplingMixin

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers_repa import MMDiTPipeline

        >>> pipe = MMDiTPipeline.from_pretrained("org/mmdit-repa-coco").to("cuda")
        >>> images = pipe(
        ...     ["a red double-decker bus on a city street", "a bowl of fruit on a wooden table"],
        ...     num_inference_steps=50,
        ...     guidance_scale=4.0,
        ...     generator=torch.Generator("cuda").manual_seed(0),
        ... ).images
        >>> images[0].save("bus.png")
        ```
"""


class MMDiTPipeline(FlowSamplingMixin, DiffusionPipeline):
    r"""Text-to-image generation with an [`MMDiTTransformer2DModel`] (velocity model, t = 1 noise, t = 0 data).

    The text condition is the sequence of CLIP ViT-L/14 token features of the caption: the text encoder's last hidden
    state over ``tokenizer.model_max_length`` (77) tokens, the caption truncated and padded to that length and no
    attention mask, as the original's data preparation computes them; there is no pooled vector. The unconditional
    context of classifier-free guidance is the same encoding of the empty caption ``""``.

    Sampling starts from Gaussian latents at t = 1 and follows the scheduler to t = 0 with the state in float64
    (float32 on MPS), as the original samplers; the latents are then decoded with the VAE (``z / scaling_factor``,
    0.18215 for SD-VAE). Without a VAE and with a 3-channel transformer the sample is the RGB image in [-1, 1].

    Classifier-free guidance: when ``guidance_scale > 1`` and ``low ≤ t ≤ high`` for the time t at which a solver
    step starts, the conditional and unconditional contexts run as one doubled batch and the velocity becomes
    ``uncond + w·(cond − uncond)``; outside the interval only the conditional batch runs. A Heun corrector keeps its
    predictor's decision. `guidance_scale`, `do_classifier_free_guidance`, `num_timesteps` and `interrupt` describe
    a running call, and a ``callback_on_step_end`` may change ``pipe._guidance_scale`` or set ``pipe._interrupt``,
    as in [`SiTPipeline`].

    Args:
        transformer ([`MMDiTTransformer2DModel`]): the velocity model.
        vae ([`AutoencoderKL`], *optional*): decodes latents to images; None for a pixel-space transformer
            (``in_channels=3``) or to get only ``output_type="latent"``.
        scheduler ([`SiTODEScheduler`] or [`SiTSDEScheduler`]): the sampler.
        tokenizer ([`CLIPTokenizer`], *optional*), text_encoder ([`CLIPTextModel`], *optional*): encode prompts (and
            the empty caption for guidance). Without them, pass `prompt_embeds` (and `negative_prompt_embeds` for
            guidance).
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["vae", "tokenizer", "text_encoder"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        transformer: MMDiTTransformer2DModel,
        vae: AutoencoderKL | None,
        scheduler: SiTODEScheduler | SiTSDEScheduler,
        tokenizer: CLIPTokenizer | None = None,
        text_encoder: CLIPTextModel | None = None,
    ):
        super().__init__()
        self.register_modules(
            transformer=transformer, vae=vae, scheduler=scheduler, tokenizer=tokenizer, text_encoder=text_encoder
        )
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.tokenizer_max_length = tokenizer.model_max_length if tokenizer is not None else CLIP_MAX_LENGTH

    def _encode_text(self, texts: list[str], device: torch.device) -> torch.Tensor:
        """CLIP token features (len(texts), tokenizer_max_length, hidden) of ``texts``, in the transformer's dtype."""
        if self.tokenizer is None or self.text_encoder is None:
            raise ValueError(
                "Encoding text needs the pipeline's tokenizer and text_encoder, but it has none; pass prompt_embeds "
                "(and negative_prompt_embeds for guidance) instead, or load the pipeline with a CLIP text encoder."
            )
        features = encode_text(self.tokenizer, self.text_encoder, texts, self.tokenizer_max_length, device=device)
        return features.to(dtype=self.transformer.dtype)

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device,
        do_classifier_free_guidance: bool,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The conditional and unconditional contexts, each (N, L, joint_attention_dim) on ``device``.

        Args:
            prompt: one caption or a list; ignored when `prompt_embeds` is given.
            device: where the contexts go.
            do_classifier_free_guidance: whether the unconditional context is needed.
            prompt_embeds: precomputed token features (N, L, joint_attention_dim).
            negative_prompt_embeds: the unconditional token features, (N, L, D) or (1, L, D) (repeated over the
                batch); the empty caption's features when not given.

        Returns:
            ``(prompt_embeds, negative_prompt_embeds)``; the second is None when it is neither needed nor given.
        """
        if prompt_embeds is None:
            prompt_embeds = self._encode_text([prompt] if isinstance(prompt, str) else list(prompt), device)
        prompt_embeds = prompt_embeds.to(device=device, dtype=self.transformer.dtype)
        batch_size = prompt_embeds.shape[0]
        if negative_prompt_embeds is None and do_classifier_free_guidance:
            negative_prompt_embeds = self._encode_text([""], device)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=self.transformer.dtype)
            negative_prompt_embeds = negative_prompt_embeds.expand(batch_size, -1, -1)
        return prompt_embeds, negative_prompt_embeds

    def check_inputs(
        self,
        prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        num_inference_steps: int,
        guidance_scale: float,
        guidance_interval: tuple[float, float],
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        output_type: str,
        callback_on_step_end_tensor_inputs: list[str],
    ) -> int:
        """Raise a ValueError naming the first invalid argument; return the batch size N.

        The steps, guidance, generator, output type and callback arguments are checked as by
        [`FlowSamplingMixin.check_inputs`]; latents may have any height and width the transformer's position table
        covers (see `_latent_size_fits`).
        """
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError(
                "Pass exactly one of prompt and prompt_embeds, got " + ("both." if prompt is not None else "neither.")
            )
        embed_dim = self.transformer.config.joint_attention_dim
        if prompt is not None:
            if not isinstance(prompt, str) and (
                not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) for p in prompt)
            ):
                raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}.")
            batch_size = 1 if isinstance(prompt, str) else len(prompt)
        else:
            if (
                not isinstance(prompt_embeds, torch.Tensor)
                or prompt_embeds.ndim != 3
                or prompt_embeds.shape[-1] != embed_dim
            ):
                raise ValueError(
                    f"prompt_embeds must be a tensor of shape (N, L, {embed_dim}) (token features of the transformer's "
                    f"joint_attention_dim), got {getattr(prompt_embeds, 'shape', type(prompt_embeds).__name__)}."
                )
            batch_size = prompt_embeds.shape[0]
        super().check_inputs(
            batch_size,
            num_inference_steps,
            guidance_scale,
            guidance_interval,
            generator,
            latents,
            output_type,
            callback_on_step_end_tensor_inputs,
        )
        if negative_prompt_embeds is not None:
            length = self.tokenizer_max_length if prompt_embeds is None else prompt_embeds.shape[1]
            shape = tuple(getattr(negative_prompt_embeds, "shape", ()))
            if (
                not isinstance(negative_prompt_embeds, torch.Tensor)
                or len(shape) != 3
                or shape[0] not in (1, batch_size)
                or shape[1:] != (length, embed_dim)
            ):
                raise ValueError(
                    f"negative_prompt_embeds must have shape ({batch_size} or 1, {length}, {embed_dim}) like the "
                    f"conditional context, got {shape}."
                )
        elif guidance_scale > 1 and self.text_encoder is None:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs an unconditional context, but this pipeline has no text "
                "encoder to encode the empty caption; pass negative_prompt_embeds (the empty caption's CLIP token "
                "features) or guidance_scale=1."
            )
        elif guidance_scale > 1 and prompt_embeds is not None and prompt_embeds.shape[1] != self.tokenizer_max_length:
            raise ValueError(
                f"prompt_embeds have {prompt_embeds.shape[1]} tokens, the empty caption's features (the unconditional "
                f"context) {self.tokenizer_max_length}; pass negative_prompt_embeds with {prompt_embeds.shape[1]} "
                "tokens."
            )
        return batch_size

    def _latent_shape(self, batch_size: int) -> tuple[int, int, str, str]:
        config = self.transformer.config
        note = f" with H and W multiples of {config.patch_size} up to {config.sample_size}"
        return batch_size, config.in_channels, "H, W", note

    def _latent_size_fits(self, height: int, width: int) -> bool:
        """The position table is cropped to the input, so any multiples of patch_size up to sample_size fit."""
        config = self.transformer.config
        return (
            not (height % config.patch_size or width % config.patch_size) and max(height, width) <= config.sample_size
        )

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 4.0,
        guidance_interval: tuple[float, float] = (0.0, 1.0),
        latents: torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
    ) -> ImagePipelineOutput | tuple:
        r"""Generate one image per caption.

        Args:
            prompt: a caption or a list of captions (encoded with the pipeline's CLIP tokenizer and text encoder).
            prompt_embeds: instead of `prompt`, the captions' token features (N, L, joint_attention_dim), e.g. the
                original's precomputed CLIP features (N, 77, 768).
            negative_prompt_embeds: the unconditional context (N or 1, L, joint_attention_dim); by default the empty
                caption encoded by the text encoder. Required for guidance without a text encoder.
            num_inference_steps: scheduler steps N (SDE and Euler: N model calls; Heun: 2N − 1).
            guidance_scale: classifier-free guidance weight w ≥ 1, finite; 1 disables guidance.
            guidance_interval: ``(low, high)``; guidance applies only while ``low ≤ t ≤ high`` (t = 1 noise).
            latents: initial noise (N, C, H, W) at t = 1, H and W up to the transformer's sample_size; drawn from
                `generator` at (N, C, sample_size, sample_size) if not given.
            generator: random generator for the initial latents and the SDE noise, or a list of one per image.
            output_type: ``"pil"``, ``"np"`` (N, H, W, 3) in [0, 1], ``"pt"`` (N, 3, H, W) in [0, 1], or
                ``"latent"`` (the final latents z in the sampler's float64 state precision).
            return_dict: return an [`ImagePipelineOutput`] instead of a tuple.
            callback_on_step_end: a function, [`PipelineCallback`] or [`MultiPipelineCallbacks`] called after every
                step as ``callback(pipe, i, t, callback_kwargs)``; a returned ``latents`` replaces the state.
            callback_on_step_end_tensor_inputs: tensors passed to the callback (only ``"latents"``).

        Examples:

        Returns:
            [`ImagePipelineOutput`] with ``images``, or the tuple ``(images,)``.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        batch_size = self.check_inputs(
            prompt,
            prompt_embeds,
            negative_prompt_embeds,
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

        context, null_context = self.encode_prompt(
            prompt, device, self.do_classifier_free_guidance, prompt_embeds, negative_prompt_embeds
        )
        guided_context = torch.cat([context, null_context]) if null_context is not None else None

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = self.prepare_latents(batch_size, config.in_channels, config.sample_size, device, generator, latents)
        latents = self._sample(
            latents,
            {"encoder_hidden_states": context},
            {"encoder_hidden_states": guided_context} if guided_context is not None else None,
            guidance_interval,
            generator,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        return self._output(latents, output_type, return_dict)

"""Fine-tuning a pretrained text-to-image pipeline (the SD3 family) with REPA, with LoRA adapters or full weights.

What the trainer plugs in around the one training step (`step.py`):

```
pipeline  = load_finetune_pipeline("stabilityai/stable-diffusion-3.5-medium")   frozen text encoders and VAE
model     = prepare_transformer(pipeline, projection_dims=(768,), encoder_depth=8, lora_rank=16)
objective = SD3FlowObjective(pipeline, encoders, proj_coeff=0.5)          latents: the pipeline VAE's shift, scale
step      = TrainingStep(accelerator, model, objective, optimizer, ema, generator)
```

The trainer (`--model SD3 --pretrained_model ...`) exports the pipeline with the trained transformer, or with LoRA
only the adapter through the pipeline class's `save_lora_weights` (`export.write_export`), which
`StableDiffusion3Pipeline.load_lora_weights` reads; the REPA head is a training-only part (it stays in the
checkpoints).

The objective is diffusers' SD3 flow matching as its training examples compute it
(`examples/dreambooth/train_dreambooth_lora_sd3.py`): u ~ `compute_density_for_timestep_sampling` (logit-normal by
default), the scheduler's discrete σ and timestep at index ⌊u · 1000⌋ (its shift included), x_σ = (1 − σ)·x_0 + σ·ε,
target ε − x_0, per-sample mean of ``compute_loss_weighting_for_sd3(σ) · (prediction − target)²`` — plus λ · REPA's
`projection_loss` on the image tokens after block k (a `REPAHead` on the transformer). Text features come from the
pipeline's own `encode_prompt` on the batch's captions (frozen, no grad). Every random draw uses the generator the
step hands in, so a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from peft import LoraConfig
from torch import nn

from ..encoders import FrozenVisionEncoder
from ..latents import vae_latent_shift_and_scale
from ..losses import REPALossOutput, projection_loss
from ..pretrained_paths import check_pretrained_source
from ..repa_head import REPAHead, TransformerWithREPAHead, unwrap_model
from .objectives import REPAFlowObjective

# Pipelines this module fine-tunes (model_index.json `_class_name`): SD3, SD3.5 medium and large share the class.
SUPPORTED_PIPELINES = ("StableDiffusion3Pipeline",)

# diffusers' SD3 LoRA example's default targets: the attention projections of both streams of every joint block
# (the image stream's to_q/k/v/out and the text stream's add_*_proj/to_add_out). SD3.5's second image attention
# (`attn2`) is not matched, as in the example.
SD3_LORA_TARGET_MODULES = [
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
]


def pipeline_class_name(name_or_path: str | os.PathLike, revision: str | None = None) -> str:
    """The `_class_name` in the `model_index.json` of a pipeline folder or Hub repo, if this module supports it.

    Raises:
        FileNotFoundError: a local path that is not a saved pipeline.
        ValueError: another pipeline class, naming the supported ones.
    """
    check_pretrained_source(name_or_path)
    class_name = DiffusionPipeline.load_config(name_or_path, revision=revision).get("_class_name")
    if class_name not in SUPPORTED_PIPELINES:
        raise ValueError(
            f"{name_or_path} holds a {class_name}; fine-tuning with REPA supports {', '.join(SUPPORTED_PIPELINES)} "
            "(SD3 and SD3.5, e.g. stabilityai/stable-diffusion-3.5-medium)."
        )
    return class_name


def load_finetune_pipeline(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    device: torch.device | str = "cpu",
    frozen_dtype: torch.dtype = torch.float32,
    without_t5: bool = False,
) -> DiffusionPipeline:
    """A pretrained SD3-family pipeline to fine-tune: its text encoders and VAE frozen, in eval mode, on `device`.

    The transformer stays float32 on the CPU in train mode, for the trainer to adapt ([`prepare_transformer`]) and
    hand to the accelerator; weights are read from safetensors only and no remote code runs.

    Args:
        name_or_path: a pipeline folder or Hub repo id whose `model_index.json` names a class of
            `SUPPORTED_PIPELINES`.
        revision: the Hub revision.
        device / frozen_dtype: where and in which dtype the frozen text encoders and VAE run (e.g. bfloat16 under
            bf16 mixed precision: they are only ever evaluated).
        without_t5: load SD3 without its T5 encoder (``text_encoder_3=None``): the pipeline then feeds zeros for
            T5's tokens, as SD3 allows, and saves its memory.
    """
    class_name = pipeline_class_name(name_or_path, revision)
    components = {"text_encoder_3": None, "tokenizer_3": None} if without_t5 else {}
    # Loading in the final dtypes (not casting afterwards) keeps what a VAE marks as float32-only in float32.
    dtype = {"default": frozen_dtype, "transformer": torch.float32}
    pipeline = DiffusionPipeline.from_pretrained(
        name_or_path, revision=revision, use_safetensors=True, dtype=dtype, **components
    )
    if type(pipeline).__name__ != class_name:
        raise ValueError(f"{name_or_path} loaded as {type(pipeline).__name__}, not its declared {class_name}.")
    for name, component in pipeline.components.items():
        if isinstance(component, nn.Module) and name != "transformer":
            component.requires_grad_(False).eval().to(device)
    pipeline.transformer.train()
    return pipeline


def prepare_transformer(
    pipeline: DiffusionPipeline,
    *,
    projection_dims: Sequence[int] = (),
    encoder_depth: int = 8,
    projector_dim: int = 2048,
    lora_rank: int | None = None,
    lora_alpha: int | None = None,
    lora_target_modules: Sequence[str] = SD3_LORA_TARGET_MODULES,
) -> nn.Module:
    """The pipeline's transformer made trainable: LoRA adapters (`lora_rank`) or full weights, with a `REPAHead`.

    With `lora_rank`, the base weights are frozen and peft adapters (``LoraConfig(r=lora_rank,
    lora_alpha=lora_alpha or lora_rank, init_lora_weights="gaussian")`` as diffusers' example) are added on
    `lora_target_modules`; otherwise every weight trains. With `projection_dims` (one width per alignment target), the
    result is a [`TransformerWithREPAHead`] whose head (new, trained in both cases) projects the image tokens after
    block `encoder_depth` (1-based); without, the bare transformer (λ = 0).
    """
    transformer = pipeline.transformer
    if lora_rank is not None:
        transformer.requires_grad_(False)
        transformer.add_adapter(
            LoraConfig(
                r=lora_rank,
                lora_alpha=lora_alpha or lora_rank,
                init_lora_weights="gaussian",
                target_modules=list(lora_target_modules),
            )
        )
    else:
        transformer.requires_grad_(True)
    if not projection_dims:
        return transformer
    head = REPAHead.for_transformer(transformer, tuple(projection_dims), encoder_depth, projector_dim)
    return TransformerWithREPAHead(transformer, head)


class SD3FlowObjective(REPAFlowObjective):
    """SD3's flow-matching loss as diffusers' training examples compute it, plus λ · REPA alignment.

    The clean latents and alignment targets are `REPAFlowObjective`'s: x_0 = (mean + std·ε − shift)·scale from the
    cached VAE posterior (`latent_mean`, `latent_std`; SD3's VAE: shift 0.0609, scale 1.5305) and the encoders'
    features of the uint8 crops `image` (resampled to `target_num_tokens` when their grid differs from the model's).
    The text conditioning is the pipeline's `encode_prompt` of the batch's `caption` (a list of N strings), each
    replaced by the empty caption with probability `caption_dropout_prob` (the pipeline's unconditional input for
    classifier-free guidance). The model is called as ``model(hidden_states=x_σ, timestep=1000·σ,
    encoder_hidden_states=..., pooled_projections=..., return_projections=...)`` (a [`TransformerWithREPAHead`]) or
    as a bare SD3 transformer when there are no alignment targets.

    Random draws per micro-batch, all from the step's generator, in order: the posterior noise of x_0, the caption
    dropout, u (σ), the noise ε.

    Args:
        pipeline: the frozen pipeline whose `encode_prompt` gives the text features (its text encoders' device).
        encoders: frozen alignment targets, one per projector of the model.
        weighting_scheme: diffusers' `--weighting_scheme` (``"logit_normal"``, ``"mode"``, ``"sigma_sqrt"``,
            ``"cosmap"``, ``"none"``): the law of u and the loss weights.
        logit_mean / logit_std / mode_scale: the parameters of the logit-normal and mode laws.
        caption_dropout_prob: probability of training a sample on the empty caption.
        max_sequence_length: T5 tokens per caption (the example's 77; SD3's sampling default is 256).
        scheduler: whose σ table (with its shift) the training draws from (default: a new one from the pipeline's
            scheduler config, which sampling's `set_timesteps` never touches).
        other arguments: as `REPAFlowObjective` (`path_type` and `time_sampling` do not apply).
    """

    def __init__(
        self,
        pipeline: DiffusionPipeline,
        encoders: Sequence[FrozenVisionEncoder] = (),
        *,
        weighting_scheme: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        caption_dropout_prob: float = 0.0,
        max_sequence_length: int = 77,
        scheduler: FlowMatchEulerDiscreteScheduler | None = None,
        proj_coeff: float = 0.5,
        latent_shift: torch.Tensor | float | None = None,
        latent_scale: torch.Tensor | float | None = None,
        target_num_tokens: int | None = None,
        alignment_stop_step: int | None = None,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ):
        if latent_shift is None or latent_scale is None:
            shift, scale = vae_latent_shift_and_scale(pipeline.vae.config)
            latent_shift = shift if latent_shift is None else latent_shift
            latent_scale = scale if latent_scale is None else latent_scale
        super().__init__(
            encoders,
            proj_coeff=proj_coeff,
            latent_shift=latent_shift,
            latent_scale=latent_scale,
            target_num_tokens=target_num_tokens,
            alignment_stop_step=alignment_stop_step,
            autocast=autocast,
        )
        self.pipeline = pipeline
        self.weighting_scheme = weighting_scheme
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.mode_scale = mode_scale
        self.caption_dropout_prob = caption_dropout_prob
        self.max_sequence_length = max_sequence_length
        if scheduler is None:
            # A fresh copy: sampling calls set_timesteps on the pipeline's, which would change the training table.
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config)
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.sigmas = scheduler.sigmas.float()  # (num_train_timesteps,), descending from 1
        self.timesteps = scheduler.timesteps.float()  # 1000 · sigmas

    @torch.no_grad()
    def encode_captions(self, captions: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
        """The transformer's text inputs for `captions`, from the frozen pipeline: ``encoder_hidden_states``
        (N, L, joint_attention_dim), L = 77 CLIP tokens + `max_sequence_length` T5 tokens, and
        ``pooled_projections`` (N, pooled_projection_dim)."""
        prompt_embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=list(captions),
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled}

    def condition(
        self, batch: dict[str, torch.Tensor | list[str]], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """The text conditioning of a batch: [`encode_captions`] of its `caption`s, each replaced by the empty caption
        with probability `caption_dropout_prob` (one uniform per sample from `generator`, drawn only when p > 0)."""
        captions = list(batch["caption"])
        if self.caption_dropout_prob > 0:
            keep = torch.rand(len(captions), generator=generator, device=generator.device) >= self.caption_dropout_prob
            captions = [caption if kept else "" for caption, kept in zip(captions, keep.tolist())]
        return self.encode_captions(captions, batch["image"].device)

    def sample_sigma_indices(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Indices (N,) into the scheduler's σ table: ⌊u · num_train_timesteps⌋, u from diffusers' density."""
        u = compute_density_for_timestep_sampling(
            weighting_scheme=self.weighting_scheme,
            batch_size=batch_size,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            mode_scale=self.mode_scale,
            device=generator.device,
            generator=generator,
        )
        # u < 1 in exact arithmetic; the clamp keeps a float32 sigmoid that rounds to 1 inside the table.
        return (u * self.num_train_timesteps).long().clamp(max=self.num_train_timesteps - 1)

    def loss(
        self,
        model: nn.Module,
        x_0: torch.Tensor,
        condition: dict[str, torch.Tensor],
        targets: list[torch.Tensor],
        generator: torch.Generator | None = None,
        *,
        indices: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> REPALossOutput:
        """The loss on clean latents x_0 (N, C, h, w) given the text `condition` (the transformer's text keyword
        inputs, as [`encode_captions`] gives them) and encoder features `targets` (N, T, D_k) (empty: no alignment).

        σ-table `indices` (N,) and noise ε (N, C, h, w) are drawn from `generator` in that order unless given. The
        denoising term of the output is the weighted flow-matching loss per sample (N,).
        """
        if indices is None:
            indices = self.sample_sigma_indices(x_0.shape[0], generator)
        if noise is None:
            noise = torch.randn(x_0.shape, generator=generator, device=x_0.device, dtype=x_0.dtype)
        # The tables go to the inputs' device rather than the indices to the host: no device→host sync.
        indices = indices.to(x_0.device)
        sigmas = self.sigmas.to(x_0.device)[indices].to(x_0.dtype).view(-1, *([1] * (x_0.ndim - 1)))
        timesteps = self.timesteps.to(x_0.device)[indices]
        x_sigma = (1.0 - sigmas) * x_0 + sigmas * noise
        align = bool(targets) and self.proj_coeff != 0
        inputs = {"hidden_states": x_sigma, "timestep": timesteps, **condition, "return_dict": False}
        if isinstance(unwrap_model(model), TransformerWithREPAHead):
            prediction, projections = model(**inputs, return_projections=align)
        else:
            prediction, projections = model(**inputs)[0], ()
        weighting = compute_loss_weighting_for_sd3(weighting_scheme=self.weighting_scheme, sigmas=sigmas)
        target = noise - x_0
        per_sample = (weighting.float() * (prediction.float() - target.float()) ** 2).flatten(1).mean(dim=1)
        alignment = projection_loss(targets, projections) if align else per_sample.new_zeros(())
        return REPALossOutput(
            loss=per_sample.mean() + self.proj_coeff * alignment, denoising_loss=per_sample, projection_loss=alignment
        )

"""MMDiT (the Stable Diffusion 3 joint-attention transformer) with REPA projection heads, in diffusers' model style.

Mathematically identical to ``models/mmdit.py`` of the original REPA text-to-image code, built from diffusers' own
SD3 building blocks (`PatchEmbed` with a cropped position table, `JointTransformerBlock`, `AdaLayerNormContinuous`)
under SD3's parameter names; see ``conversion_mmdit.py`` for the mapping of the original names.

Why not `SD3Transformer2DModel` itself: its conditioning is ``timestep embedding + PixArtAlphaTextProjection(pooled
text vector)``, and the original has no pooled vector: with a zero vector the projection still adds its biases
(measured: 5 % relative error on the reference velocity unless they are zeroed, and training would move them, a
learned constant the original lacks); its forward exposes no block output for the projectors, and its config carries
SD3-only fields. The blocks are the same modules, so SD3's LoRA target names and attention processors apply unchanged.
Initialisation is PyTorch's default for every layer, as in the original (no adaLN-Zero, unlike SiT).

Conventions: the timestep is continuous ``t`` in [0, 1] with **t = 0 data and t = 1 noise**, fed to the sinusoidal
embedding unscaled (as the original; diffusers' SD3 pipeline feeds ``1000·t``). The text condition is a sequence of CLIP ViT-L/14 token features
(N, L, joint_attention_dim); the unconditional branch of classifier-free guidance uses the features of the empty
caption, there is no null class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin, JointTransformerBlock
from diffusers.models.attention_processor import Attention, FusedJointAttnProcessor2_0, JointAttnProcessor2_0
from diffusers.models.embeddings import PatchEmbed, TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormContinuous
from diffusers.utils import BaseOutput, apply_lora_scale
from torch import nn

# The original fixes the head width: hidden size = 32·depth with depth heads.
MMDIT_HEAD_DIM = 32


@dataclass
class MMDiTTransformer2DModelOutput(BaseOutput):
    """Output of [`MMDiTTransformer2DModel`].

    Args:
        sample (`torch.Tensor` of shape `(N, C, H, W)`): predicted velocity ``dx_t/dt`` of the interpolant.
        projections (`tuple[torch.Tensor]`): one `(N, tokens, projection_dim)` tensor per alignment target, from the
            image-token output of block `encoder_depth`; empty when the model has no projectors or they were not
            requested.
        hidden_states (`tuple[torch.Tensor]`, *optional*): the `(N, tokens, hidden_size)` image-token output of every
            block, when `output_hidden_states=True`.
    """

    sample: torch.Tensor
    projections: tuple[torch.Tensor, ...] = ()
    hidden_states: tuple[torch.Tensor, ...] | None = None


def _build_projector(hidden_size: int, projector_dim: int, projection_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projection_dim),
    )


class MMDiTTransformer2DModel(ModelMixin, ConfigMixin, PeftAdapterMixin, AttentionMixin):
    r"""Text-conditional MMDiT velocity model with REPA projectors (REPA's text-to-image model).

    Image tokens and text tokens have separate weights and meet in a joint attention over the concatenated
    sequence; the last block's text stream is `pre_only` (it feeds the attention, its output is dropped). The
    conditioning vector is the timestep embedding alone.

    Args:
        sample_size (`int`): side of the latent the position table is built for (the original's ``input_size``; 32
            for 256 px with SD-VAE). The table has (sample_size / patch_size)² entries and smaller inputs use its
            center crop, as the original's ``cropped_pos_embed``.
        patch_size (`int`): side of a patch in latent pixels.
        in_channels (`int`): latent channels; the output has the same number.
        depth (`int`): number of joint blocks.
        num_attention_heads (`int`), attention_head_dim (`int`): hidden size = heads · head dim; the original uses
            `depth` heads of 32 channels ([`from_depth`]).
        joint_attention_dim (`int`): width of the text token features (768 for CLIP ViT-L/14).
        encoder_depth (`int`): 1-based index of the block whose image-token output feeds the projectors.
        projector_dim (`int`): width of the projector MLPs.
        projection_dims (`tuple[int]`): output width of each projector, one per alignment target; empty means none.
    """

    _supports_gradient_checkpointing = True
    _repeated_blocks = ["JointTransformerBlock"]
    _no_split_modules = ["JointTransformerBlock"]
    _skip_layerwise_casting_patterns = ["pos_embed", "norm"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        depth: int = 24,
        num_attention_heads: int = 24,
        attention_head_dim: int = MMDIT_HEAD_DIM,
        joint_attention_dim: int = 768,
        encoder_depth: int = 8,
        projector_dim: int = 2048,
        projection_dims: tuple[int, ...] = (768,),
    ):
        super().__init__()
        if sample_size % patch_size != 0:
            raise ValueError(f"sample_size ({sample_size}) must be divisible by patch_size ({patch_size}).")
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}.")
        if projection_dims and not 1 <= encoder_depth <= depth:
            raise ValueError(
                f"encoder_depth must be between 1 and depth ({depth}) so that a block output can be projected, "
                f"got {encoder_depth}."
            )
        # JSON has no tuples: store a list so that a saved and reloaded config compares equal.
        self.register_to_config(projection_dims=list(projection_dims))
        self.gradient_checkpointing = False
        hidden_size = num_attention_heads * attention_head_dim
        self.grid_size = sample_size // patch_size

        # pos_embed_max_size = the table's own side: the base size equals the grid, so positions are the integer
        # patch indices (the original's table) and any input up to sample_size gets the centered crop.
        self.pos_embed = PatchEmbed(
            height=sample_size,
            width=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            embed_dim=hidden_size,
            pos_embed_max_size=self.grid_size,
        )
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)  # cos first, as the original
        self.time_embed = TimestepEmbedding(256, hidden_size)
        self.context_embedder = nn.Linear(joint_attention_dim, hidden_size)
        self.transformer_blocks = nn.ModuleList(
            [
                JointTransformerBlock(
                    dim=hidden_size,
                    num_attention_heads=num_attention_heads,
                    attention_head_dim=attention_head_dim,
                    context_pre_only=index == depth - 1,
                )
                for index in range(depth)
            ]
        )
        self.projectors = nn.ModuleList([_build_projector(hidden_size, projector_dim, dim) for dim in projection_dims])
        self.norm_out = AdaLayerNormContinuous(hidden_size, hidden_size, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(hidden_size, patch_size * patch_size * in_channels)

    @classmethod
    def from_depth(cls, depth: int = 24, **config) -> MMDiTTransformer2DModel:
        """The original's sizing: `depth` blocks of width 32·depth with `depth` heads (24 → the paper's model)."""
        return cls(depth=depth, num_attention_heads=depth, attention_head_dim=MMDIT_HEAD_DIM, **config)

    def fuse_qkv_projections(self) -> None:
        """One matmul for each stream's query, key and value (diffusers' `FusedJointAttnProcessor2_0`, as in SD3).

        The fused layers (`to_qkv`, `to_added_qkv`) are copies made from the separate ones at this moment: fuse after
        loading or training, and unfuse before changing the weights again.
        """
        for module in self.modules():
            if isinstance(module, Attention):
                module.fuse_projections(fuse=True)
        self.set_attn_processor(FusedJointAttnProcessor2_0())

    def unfuse_qkv_projections(self) -> None:
        """Back to the separate projections and the default `JointAttnProcessor2_0`; the fused copies are removed
        (they would go stale in training)."""
        for module in self.modules():
            if isinstance(module, Attention) and module.fused_projections:
                del module.to_qkv, module.to_added_qkv
                module.fused_projections = False
        self.set_attn_processor(JointAttnProcessor2_0())

    @property
    def hidden_size(self) -> int:
        return self.config.num_attention_heads * self.config.attention_head_dim

    def num_tokens(self, height: int | None = None, width: int | None = None) -> int:
        """Image tokens for a latent of ``height × width`` (default: sample_size²)."""
        patch = self.config.patch_size
        height = height or self.config.sample_size
        width = width or self.config.sample_size
        return (height // patch) * (width // patch)

    def unpatchify(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(N, T, p·p·C) → (N, C, height, width)."""
        batch, patch, channels = tokens.shape[0], self.config.patch_size, self.config.in_channels
        rows, cols = height // patch, width // patch
        tokens = tokens.reshape(batch, rows, cols, patch, patch, channels)
        return tokens.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, rows * patch, cols * patch)

    def _check_inputs(
        self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> None:
        config = self.config
        if hidden_states.ndim != 4 or hidden_states.shape[1] != config.in_channels:
            raise ValueError(
                f"hidden_states must have shape (N, {config.in_channels}, H, W), got {tuple(hidden_states.shape)}."
            )
        height, width = hidden_states.shape[-2:]
        if height % config.patch_size or width % config.patch_size:
            raise ValueError(f"H and W must be multiples of patch_size ({config.patch_size}), got {height}×{width}.")
        if height > config.sample_size or width > config.sample_size:
            raise ValueError(
                f"The position table covers {config.sample_size}×{config.sample_size} latents, got {height}×{width}."
            )
        batch = hidden_states.shape[0]
        if timestep.shape != (batch,):
            raise ValueError(f"timestep must be a scalar or have shape ({batch},), got {tuple(timestep.shape)}.")
        context_shape = tuple(encoder_hidden_states.shape)
        if len(context_shape) != 3 or (context_shape[0], context_shape[2]) != (batch, config.joint_attention_dim):
            raise ValueError(
                f"encoder_hidden_states must have shape ({batch}, L, {config.joint_attention_dim}), "
                f"got {context_shape}."
            )

    @apply_lora_scale("joint_attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        return_projections: bool = True,
        output_hidden_states: bool = False,
        joint_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> MMDiTTransformer2DModelOutput | tuple:
        """Predict the velocity of the interpolant at time ``t`` given text token features.

        Args:
            hidden_states: noisy latents x_t (N, in_channels, H, W), H and W ≤ sample_size, multiples of patch_size.
            timestep: t in [0, 1] (t = 0 data, t = 1 noise), shape (N,) or a scalar.
            encoder_hidden_states: text token features (N, L, joint_attention_dim), e.g. CLIP's 77 tokens; for the
                unconditional branch of guidance, the features of the empty caption.
            return_projections: compute the projector outputs (needed for the REPA loss, not for sampling).
            output_hidden_states: also return every block's image-token output.
            joint_attention_kwargs: passed to the attention processors; ``scale`` scales LoRA layers (as in SD3).
            return_dict: return a [`MMDiTTransformer2DModelOutput`] instead of a tuple.

        Returns:
            ``MMDiTTransformer2DModelOutput(sample, projections, hidden_states)`` or the tuple
            ``(sample, projections[, hidden_states])``.
        """
        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(hidden_states.shape[0])
        self._check_inputs(hidden_states, timestep, encoder_hidden_states)
        height, width = hidden_states.shape[-2:]

        # PatchEmbed adds the centered crop of the position table; its flatten + transpose is not contiguous.
        tokens = self.pos_embed(hidden_states).contiguous()
        conditioning = self.time_embed(self.time_proj(timestep).to(tokens.dtype))
        context = self.context_embedder(encoder_hidden_states)

        projections: tuple[torch.Tensor, ...] = ()
        all_hidden_states = []
        for index, block in enumerate(self.transformer_blocks, start=1):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                context, tokens = self._gradient_checkpointing_func(
                    block, tokens, context, conditioning, joint_attention_kwargs
                )
            else:
                context, tokens = block(
                    hidden_states=tokens,
                    encoder_hidden_states=context,
                    temb=conditioning,
                    joint_attention_kwargs=joint_attention_kwargs,
                )
            if output_hidden_states:
                all_hidden_states.append(tokens)
            if index == self.config.encoder_depth and return_projections:
                projections = tuple(projector(tokens) for projector in self.projectors)

        tokens = self.proj_out(self.norm_out(tokens, conditioning))
        sample = self.unpatchify(tokens, height, width)

        hidden = tuple(all_hidden_states) if output_hidden_states else None
        if not return_dict:
            return (sample, projections) if hidden is None else (sample, projections, hidden)
        return MMDiTTransformer2DModelOutput(sample=sample, projections=projections, hidden_states=hidden)

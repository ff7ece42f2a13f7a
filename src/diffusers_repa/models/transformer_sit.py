"""SiT (Scalable Interpolant Transformer) with REPA projection heads, in diffusers' model style.

Mathematically identical to ``models/sit.py`` of the original REPA code; see ``conversion.py`` for the mapping of
the original parameter names onto the ones used here.

Conventions: the timestep is continuous ``t`` in [0, 1] with **t = 0 data and t = 1 noise**, fed to the sinusoidal
embedding unscaled; the class id ``num_classes`` is the null (unconditional) class used for classifier-free guidance.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin, AttentionModuleMixin, FeedForward
from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn
from diffusers.models.embeddings import LabelEmbedding, TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput, logging
from torch import nn

from ..pretrained_paths import JSONObjectConfigMixin

logger = logging.get_logger(__name__)

# Sizes of the original SiT family (DiT's are the same): (depth, hidden size, attention heads, default REPA encoder
# depth). The encoder depths are the paper's choices (block 4 for S/B, block 8 for L/XL).
SIT_SIZES: dict[str, tuple[int, int, int, int]] = {
    "S": (12, 384, 6, 4),
    "B": (12, 768, 12, 4),
    "L": (24, 1024, 16, 8),
    "XL": (28, 1152, 16, 8),
}
SIT_PATCH_SIZES = (2, 4, 8)
SIT_PRESETS = tuple(f"SiT-{size}/{patch}" for size in SIT_SIZES for patch in SIT_PATCH_SIZES)
# DiT (improved-DDPM objective, the paper's other model): diffusers' DiTTransformer2DModel at the same sizes.
DIT_PRESETS = tuple(f"DiT-{size}/{patch}" for size in SIT_SIZES for patch in SIT_PATCH_SIZES)

_PRESET_PATTERN = re.compile(r"^(sit|dit)-(s|b|l|xl)/(\d+)$", re.IGNORECASE)


def parse_sit_preset(name: str) -> dict[str, int]:
    """Config values of a preset name such as ``"SiT-XL/2"`` or ``"DiT-XL/2"`` (case-insensitive).

    Returns ``depth``, ``hidden_size``, ``num_attention_heads``, ``patch_size`` and ``encoder_depth``.
    """
    match = _PRESET_PATTERN.match(name.strip())
    if match is None or int(match.group(3)) not in SIT_PATCH_SIZES:
        raise ValueError(f"Unknown SiT preset {name!r}. Choose one of: {', '.join(SIT_PRESETS + DIT_PRESETS)}.")
    depth, hidden_size, heads, encoder_depth = SIT_SIZES[match.group(2).upper()]
    return {
        "depth": depth,
        "hidden_size": hidden_size,
        "num_attention_heads": heads,
        "patch_size": int(match.group(3)),
        "encoder_depth": encoder_depth,
    }


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position table of shape (grid_size², embed_dim), as in MAE/DiT/SiT.

    Computed in float64 and returned as float32; the first half of the channels encodes the column index, the
    second half the row index (the original's ``meshgrid(w, h)`` order).
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"hidden_size must be divisible by 4 for the 2-D sin-cos position table, got {embed_dim}.")
    coords = np.arange(grid_size, dtype=np.float64)
    cols, rows = np.meshgrid(coords, coords)  # cols varies along the last axis

    def embed_1d(positions: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4.0))
        angles = np.outer(positions.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([embed_1d(cols), embed_1d(rows)], axis=1)
    return torch.from_numpy(table).float()


@dataclass
class SiTTransformer2DModelOutput(BaseOutput):
    """Output of [`SiTTransformer2DModel`].

    Args:
        sample (`torch.Tensor` of shape `(N, C, H, W)`): predicted velocity ``dx_t/dt`` of the interpolant.
        projections (`tuple[torch.Tensor]`): one `(N, tokens, projection_dim)` tensor per alignment target, from the
            output of block `encoder_depth`; empty when the model has no projectors or they were not requested.
        hidden_states (`tuple[torch.Tensor]`, *optional*): the `(N, tokens, hidden_size)` output of every block,
            when `output_hidden_states=True`.
    """

    sample: torch.Tensor
    projections: tuple[torch.Tensor, ...] = ()
    hidden_states: tuple[torch.Tensor, ...] | None = None


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# Attention weights saved before SiT used diffusers' projection names: a fused `to_qkv` (rows [q; k; v]) and an
# un-indexed `to_out` (peft adapters of those layers included).
_LEGACY_ATTENTION_KEY = re.compile(r"^(?P<path>(?:.+\.)?attn\.)to_(?P<layer>qkv|out)\.(?P<rest>(?!\d).+)$")


def convert_legacy_attention_keys(state_dict: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Rename, in place, the attention weights of checkpoints written before SiT used diffusers' names.

    ``attn.to_qkv.*`` is split row-wise into ``attn.to_q.*``, ``attn.to_k.*`` and ``attn.to_v.*`` (exactly: the fused
    rows are [q; k; v]) and ``attn.to_out.*`` becomes ``attn.to_out.0.*``. LoRA weights follow the same rule, except
    that a fused layer's ``lora_A`` (its input side) is shared by the three projections and so copied to each. Only
    keys starting with ``prefix`` are touched; a key whose new name is already present is left as it is.

    Returns:
        The same dict, for chaining.
    """
    for key in [key for key in state_dict if key.startswith(prefix)]:
        match = _LEGACY_ATTENTION_KEY.match(key)
        if match is None:
            continue
        path, rest = match["path"], match["rest"]
        if match["layer"] == "out":
            if f"{path}to_out.0.{rest}" not in state_dict:
                state_dict[f"{path}to_out.0.{rest}"] = state_dict.pop(key)
            continue
        new_keys = [f"{path}to_{name}.{rest}" for name in "qkv"]
        if any(new_key in state_dict for new_key in new_keys):
            continue
        tensor = state_dict.pop(key)
        # Clones, so that the three projections never share storage (safetensors refuses to save shared tensors).
        parts = [tensor] * 3 if rest.startswith("lora_A.") else tensor.chunk(3, dim=0)
        for new_key, part in zip(new_keys, parts):
            state_dict[new_key] = part.clone()
    return state_dict


class SiTAttnProcessor:
    """SiT's self-attention through diffusers' attention dispatcher.

    The backend is whatever ``set_attention_backend`` chose (default: PyTorch's ``scaled_dot_product_attention``,
    which picks flash / memory-efficient kernels on GPU).
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn: SiTAttention, hidden_states: torch.Tensor) -> torch.Tensor:
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        # (N, tokens, heads, head_dim): the dispatcher's layout.
        query = attn.norm_q(query.unflatten(-1, (attn.heads, -1)))
        key = attn.norm_k(key.unflatten(-1, (attn.heads, -1)))
        value = value.unflatten(-1, (attn.heads, -1))
        hidden_states = dispatch_attention_fn(
            query, key, value, backend=self._attention_backend, parallel_config=self._parallel_config
        )
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](hidden_states))


class SiTAttention(nn.Module, AttentionModuleMixin):
    """Multi-head self-attention with optional qk-norm, in the layout of diffusers' attention modules.

    The projections are ``to_q``, ``to_k``, ``to_v`` and ``to_out.0`` (the original's fused ``qkv`` split row-wise,
    and ``proj``), so that diffusers' LoRA target names, attention processors and backends, and
    ``fuse_projections`` apply. Weights saved under the former names (``to_qkv``, ``to_out``) still load.
    """

    _default_processor_cls = SiTAttnProcessor
    _available_processors = [SiTAttnProcessor]

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, processor: SiTAttnProcessor | None = None):
        super().__init__()
        self.heads = num_heads
        self.head_dim = dim // num_heads
        self.inner_dim = dim
        self.use_bias = True  # read by AttentionModuleMixin.fuse_projections
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.norm_q = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.norm_k = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        # diffusers' layout: the output projection, then dropout (none in SiT).
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.set_processor(processor or self._default_processor_cls())

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.processor(self, hidden_states)

    def set_use_memory_efficient_attention_xformers(
        self, use_memory_efficient_attention_xformers: bool, attention_op: Callable | None = None
    ) -> None:
        """Enable xFormers (see diffusers' `AttentionModuleMixin`); disabling goes back to the default backend.

        diffusers' own method leaves the xFormers backend in place when asked to disable it.
        """
        if use_memory_efficient_attention_xformers:
            super().set_use_memory_efficient_attention_xformers(True, attention_op)
        elif self.processor._attention_backend == AttentionBackendName.XFORMERS:
            self.processor._attention_backend = None

    def set_attention_slice(self, slice_size: int | None) -> None:
        """Sliced attention does not exist for SiT: only ``None`` (no slicing) is accepted.

        Raises:
            NotImplementedError: for any slice size; pick a memory-efficient kernel with ``set_attention_backend``.
        """
        if slice_size is not None:
            raise NotImplementedError(
                "SiT has no sliced attention: its attention runs through diffusers' attention dispatcher, whose "
                "default (PyTorch SDPA) already uses memory-efficient kernels. Choose a kernel with "
                "`set_attention_backend(...)` instead."
            )

    def _load_from_state_dict(self, state_dict: dict[str, torch.Tensor], prefix: str, *args, **kwargs) -> None:
        # `load_state_dict` of a checkpoint with the former names (`from_pretrained` renames them earlier, see
        # `SiTTransformer2DModel._fix_state_dict_keys_on_load`). A fused module owns `to_qkv` itself.
        if not self.fused_projections:
            convert_legacy_attention_keys(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (chunks: shift/scale/gate for attention, then for the MLP)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SiTAttention(dim, num_heads, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim, mult=mlp_ratio, activation_fn="gelu-approximate", bias=True)
        self.adaln_modulation = nn.Linear(dim, 6 * dim)

    def forward(self, hidden_states: torch.Tensor, silu_conditioning: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaln_modulation(
            silu_conditioning
        ).chunk(6, dim=-1)
        attn_input = _modulate(self.norm1(hidden_states), shift_msa, scale_msa)
        hidden_states = hidden_states + gate_msa.unsqueeze(1) * self.attn(attn_input)
        mlp_input = _modulate(self.norm2(hidden_states), shift_mlp, scale_mlp)
        return hidden_states + gate_mlp.unsqueeze(1) * self.ff(mlp_input)


def _build_projector(hidden_size: int, projector_dim: int, projection_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projection_dim),
    )


class SiTTransformer2DModel(JSONObjectConfigMixin, ModelMixin, ConfigMixin, PeftAdapterMixin, AttentionMixin):
    r"""Class-conditional SiT velocity model with REPA projectors.

    Args:
        sample_size (`int`): side of the (square) latent, e.g. 32 for 256 px images with SD-VAE.
        patch_size (`int`): side of a patch in latent pixels; tokens = (sample_size / patch_size)².
        in_channels (`int`): latent channels; the output has the same number.
        hidden_size (`int`), depth (`int`), num_attention_heads (`int`), mlp_ratio (`float`): transformer sizes.
        num_classes (`int`): number of real classes; id `num_classes` is the null class.
        class_dropout_prob (`float`): probability of replacing a label by the null class, in training mode only.
        encoder_depth (`int`): 1-based index of the block whose output feeds the projectors.
        projector_dim (`int`): width of the projector MLPs.
        projection_dims (`tuple[int]`): output width of each projector, one per alignment target (the encoder's
            feature width); empty means no projectors.
        qk_norm (`bool`): LayerNorm on queries and keys.
        trained_sample_size (`int`, *optional*): the `sample_size` the weights were made for, recorded at creation.
            The weights cannot tell (the position table is rebuilt from the config), so a config edited to another
            `sample_size` is only noticed by this record: loading then warns that the model samples at a size it did
            not learn.
    """

    _supports_gradient_checkpointing = True
    _repeated_blocks = ["SiTBlock"]
    _no_split_modules = ["SiTBlock"]
    _skip_layerwise_casting_patterns = ["patch_embed", "norm"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_attention_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        encoder_depth: int = 8,
        projector_dim: int = 2048,
        projection_dims: tuple[int, ...] = (768,),
        qk_norm: bool = False,
        trained_sample_size: int | None = None,
    ):
        super().__init__()
        # An edited config.json fails here, naming the field, rather than deep inside torch.
        sizes = {
            "sample_size": sample_size, "patch_size": patch_size, "in_channels": in_channels,
            "hidden_size": hidden_size, "depth": depth, "num_attention_heads": num_attention_heads,
            "num_classes": num_classes, "encoder_depth": encoder_depth, "projector_dim": projector_dim,
        }  # fmt: skip
        for name, value in {**sizes, **{f"projection_dims[{i}]": d for i, d in enumerate(projection_dims)}}.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"SiTTransformer2DModel config: {name} must be a positive int, got {value!r}.")
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or mlp_ratio <= 0:
            raise ValueError(f"SiTTransformer2DModel config: mlp_ratio must be a positive number, got {mlp_ratio!r}.")
        if isinstance(class_dropout_prob, bool) or not 0 <= class_dropout_prob <= 1:
            raise ValueError(
                f"SiTTransformer2DModel config: class_dropout_prob must be in [0, 1], got {class_dropout_prob!r}."
            )
        if sample_size % patch_size != 0:
            raise ValueError(f"sample_size ({sample_size}) must be divisible by patch_size ({patch_size}).")
        if hidden_size % num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_attention_heads})."
            )
        if projection_dims and not 1 <= encoder_depth <= depth:
            raise ValueError(
                f"encoder_depth must be between 1 and depth ({depth}) so that a block output can be projected, "
                f"got {encoder_depth}."
            )
        # JSON has no tuples: store a list so that a saved and reloaded config compares equal.
        self.register_to_config(projection_dims=list(projection_dims))
        if trained_sample_size is None:
            self.register_to_config(trained_sample_size=sample_size)
        elif trained_sample_size != sample_size:
            logger.warning(
                f"SiTTransformer2DModel: sample_size {sample_size} differs from the {trained_sample_size} its weights "
                f"were trained at; it will sample {sample_size}×{sample_size} latents it did not learn."
            )
        self.gradient_checkpointing = False
        self.grid_size = sample_size // patch_size

        self.patch_embed = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        # Fixed positions: a buffer rather than a frozen parameter, so optimizers and EMA never see it.
        self.register_buffer("pos_embed", get_2d_sincos_pos_embed(hidden_size, self.grid_size), persistent=False)
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)  # cos first, as the original
        self.time_embed = TimestepEmbedding(256, hidden_size)
        self.class_embed = LabelEmbedding(num_classes, hidden_size, class_dropout_prob)
        self.transformer_blocks = nn.ModuleList(
            [SiTBlock(hidden_size, num_attention_heads, mlp_ratio, qk_norm) for _ in range(depth)]
        )
        self.projectors = nn.ModuleList([_build_projector(hidden_size, projector_dim, dim) for dim in projection_dims])
        self.norm_out = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaln_out = nn.Linear(hidden_size, 2 * hidden_size)
        self.proj_out = nn.Linear(hidden_size, patch_size * patch_size * in_channels)
        self._init_weights()

    @classmethod
    def from_preset(cls, name: str, **config) -> SiTTransformer2DModel:
        """Build a randomly initialised model of a preset size, e.g. ``from_preset("SiT-XL/2", sample_size=32)``.

        Keyword arguments override the preset (e.g. ``encoder_depth``, ``projection_dims``).
        """
        if not name.strip().lower().startswith("sit-"):
            raise ValueError(f"{name} is not a SiT preset (SiT-{{S,B,L,XL}}/{{2,4,8}}).")
        return cls(**{**parse_sit_preset(name), **config})

    def _init_weights(self) -> None:
        """The original SiT initialisation: xavier linears, adaLN-Zero, zero output layer."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            if isinstance(module, SiTAttention):
                # The original initialises one fused (3·dim, dim) qkv matrix: its bound for all three projections.
                fused = torch.empty(3 * module.inner_dim, module.inner_dim)
                nn.init.xavier_uniform_(fused)
                for layer, part in zip((module.to_q, module.to_k, module.to_v), fused.chunk(3)):
                    layer.weight.data.copy_(part)
        weight = self.patch_embed.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.class_embed.embedding_table.weight, std=0.02)
        nn.init.normal_(self.time_embed.linear_1.weight, std=0.02)
        nn.init.normal_(self.time_embed.linear_2.weight, std=0.02)
        for layer in [block.adaln_modulation for block in self.transformer_blocks] + [self.adaln_out, self.proj_out]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _fix_state_dict_keys_on_load(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`from_pretrained` hook: also renames the attention weights of folders saved with the former names."""
        super()._fix_state_dict_keys_on_load(state_dict)
        return convert_legacy_attention_keys(state_dict)

    def set_attention_slice(self, slice_size: int | None) -> None:
        """Called by a pipeline's `enable_attention_slicing`: SiT has none, so any slice size raises (see
        [`SiTAttention.set_attention_slice`]); ``None`` (`disable_attention_slicing`) is accepted."""
        for module in self.modules():
            if isinstance(module, SiTAttention):
                module.set_attention_slice(slice_size)

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, T, p·p·C) → (N, C, H, W)."""
        batch, patch, channels, grid = tokens.shape[0], self.config.patch_size, self.config.in_channels, self.grid_size
        tokens = tokens.reshape(batch, grid, grid, patch, patch, channels)
        return tokens.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, grid * patch, grid * patch)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float,
        class_labels: torch.LongTensor,
        return_projections: bool = True,
        output_hidden_states: bool = False,
        return_dict: bool = True,
    ) -> SiTTransformer2DModelOutput | tuple:
        """Predict the velocity of the interpolant at time ``t``.

        Args:
            hidden_states: noisy latents x_t of shape (N, in_channels, sample_size, sample_size).
            timestep: t in [0, 1] (t = 0 data, t = 1 noise), shape (N,) or a scalar.
            class_labels: (N,) class ids in [0, num_classes]; ``num_classes`` is the null class.
            return_projections: compute the projector outputs (needed for the REPA loss, not for sampling).
            output_hidden_states: also return every block's output.
            return_dict: return a [`SiTTransformer2DModelOutput`] instead of a tuple.

        Returns:
            ``SiTTransformer2DModelOutput(sample, projections, hidden_states)`` or the tuple
            ``(sample, projections[, hidden_states])``.
        """
        expected = (self.config.in_channels, self.config.sample_size, self.config.sample_size)
        if hidden_states.ndim != 4 or tuple(hidden_states.shape[1:]) != expected:
            raise ValueError(
                f"hidden_states must have shape (N, {', '.join(map(str, expected))}), got {tuple(hidden_states.shape)}."
            )
        batch = hidden_states.shape[0]
        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        if timestep.shape != (batch,) or class_labels.shape != (batch,):
            raise ValueError(
                f"timestep and class_labels must have shape ({batch},) to match the batch, "
                f"got {tuple(timestep.shape)} and {tuple(class_labels.shape)}."
            )

        tokens = self.patch_embed(hidden_states).flatten(2).transpose(1, 2)
        # from_pretrained(dtype=...) casts parameters only: the non-persistent table may still be float32.
        tokens = tokens + self.pos_embed.to(tokens.dtype)
        time_features = self.time_proj(timestep).to(tokens.dtype)
        conditioning = self.time_embed(time_features) + self.class_embed(class_labels)
        silu_conditioning = F.silu(conditioning)

        projections: tuple[torch.Tensor, ...] = ()
        all_hidden_states = []
        for index, block in enumerate(self.transformer_blocks, start=1):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                tokens = self._gradient_checkpointing_func(block, tokens, silu_conditioning)
            else:
                tokens = block(tokens, silu_conditioning)
            if output_hidden_states:
                all_hidden_states.append(tokens)
            if index == self.config.encoder_depth and return_projections:
                projections = tuple(projector(tokens) for projector in self.projectors)

        shift, scale = self.adaln_out(silu_conditioning).chunk(2, dim=-1)
        tokens = self.proj_out(_modulate(self.norm_out(tokens), shift, scale))
        sample = self.unpatchify(tokens)

        hidden = tuple(all_hidden_states) if output_hidden_states else None
        if not return_dict:
            return (sample, projections) if hidden is None else (sample, projections, hidden)
        return SiTTransformer2DModelOutput(sample=sample, projections=projections, hidden_states=hidden)

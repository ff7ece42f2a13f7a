"""Conversion between the original REPA text-to-image checkpoints (``models/mmdit.py``) and
[`MMDiTTransformer2DModel`].

Reads the same three forms as ``conversion.py`` (a bare state dict, a ``train_t2i.py`` checkpoint
``{"model", "ema", "opt", "args", "steps"}`` with EMA weights by default, or a safetensors file). The conversion is
a renaming plus two exact rearrangements, so converting and exporting back is bit-identical:

- the fused ``attn.qkv`` (rows [q; k; v]) of each stream is split into diffusers' ``to_q/to_k/to_v`` (image stream)
  and ``add_q_proj/add_k_proj/add_v_proj`` (text stream);
- the two-chunk adaLN layers (the last block's `pre_only` text stream and the final layer) are ordered
  [shift; scale] in the original and [scale; shift] in diffusers' `AdaLayerNormContinuous`: their halves swap.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open

from .conversion import load_repa_checkpoint, rename_key, rename_tables, strip_wrapper_prefixes
from .models.transformer_mmdit import MMDIT_HEAD_DIM, MMDiTTransformer2DModel

# Original name prefix -> our name prefix; "{i}" stands for a block index. The qkv entries name the module that
# receives the query rows; the key and value rows go to its siblings (see _QKV_TARGETS).
_NAME_PAIRS: list[tuple[str, str]] = [
    ("x_embedder.proj.", "pos_embed.proj."),
    ("t_embedder.mlp.0.", "time_embed.linear_1."),
    ("t_embedder.mlp.2.", "time_embed.linear_2."),
    ("context_embedder.", "context_embedder."),
    ("joint_blocks.{i}.x_block.adaLN_modulation.1.", "transformer_blocks.{i}.norm1.linear."),
    ("joint_blocks.{i}.x_block.attn.qkv.", "transformer_blocks.{i}.attn.to_qkv."),
    ("joint_blocks.{i}.x_block.attn.proj.", "transformer_blocks.{i}.attn.to_out.0."),
    ("joint_blocks.{i}.x_block.mlp.fc1.", "transformer_blocks.{i}.ff.net.0.proj."),
    ("joint_blocks.{i}.x_block.mlp.fc2.", "transformer_blocks.{i}.ff.net.2."),
    ("joint_blocks.{i}.context_block.adaLN_modulation.1.", "transformer_blocks.{i}.norm1_context.linear."),
    ("joint_blocks.{i}.context_block.attn.qkv.", "transformer_blocks.{i}.attn.add_qkv_proj."),
    ("joint_blocks.{i}.context_block.attn.proj.", "transformer_blocks.{i}.attn.to_add_out."),
    ("joint_blocks.{i}.context_block.mlp.fc1.", "transformer_blocks.{i}.ff_context.net.0.proj."),
    ("joint_blocks.{i}.context_block.mlp.fc2.", "transformer_blocks.{i}.ff_context.net.2."),
    ("final_layer.adaLN_modulation.1.", "norm_out.linear."),
    ("final_layer.linear.", "proj_out."),
    ("projectors.", "projectors."),
]
# Fused names used only inside the conversion -> the three diffusers modules receiving rows [q; k; v].
_QKV_TARGETS = {"to_qkv": ("to_q", "to_k", "to_v"), "add_qkv_proj": ("add_q_proj", "add_k_proj", "add_v_proj")}
_FUSED_KEY = re.compile(r"^(?P<path>.+\.attn\.)(?P<fused>to_qkv|add_qkv_proj)\.(?P<rest>weight|bias)$")
_SPLIT_KEY = re.compile(r"^(?P<path>.+\.attn\.)(?P<name>to_q|add_q_proj)\.(?P<rest>weight|bias)$")
_FUSED_COPY = re.compile(r"\.attn\.(to_qkv|to_added_qkv)\.")


_TO_OURS, _TO_ORIGINAL = rename_tables(_NAME_PAIRS)


def _is_two_chunk_adaln(our_key: str, tensor: torch.Tensor, hidden_size: int) -> bool:
    """The layers whose [shift; scale] (original) and [scale; shift] (diffusers) orders differ."""
    if our_key.startswith("norm_out.linear."):
        return True
    return ".norm1_context.linear." in our_key and tensor.shape[0] == 2 * hidden_size


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first])


def is_mmdit_state_dict(keys: Iterable[str]) -> bool:
    """Whether original parameter names are the text-to-image MMDiT's (``joint_blocks.*``; SiT's are ``blocks.*``)."""
    return any(strip_wrapper_prefixes(key).startswith("joint_blocks.") for key in keys)


def is_mmdit_checkpoint(path: str | Path) -> bool:
    """Whether an original checkpoint file (any of the three forms) holds the text-to-image MMDiT.

    Only the parameter names are read: the safetensors header, or a memory-mapped ``torch.load`` (weights only), so
    that telling SiT from MMDiT does not read a multi-gigabyte ``train_t2i.py`` checkpoint once more before its
    conversion.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as handle:
            return is_mmdit_state_dict(handle.keys())
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            # Files in torch's legacy (pre-zip) format cannot be memory-mapped; they are read in full.
            payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict):
        return False
    state_dicts = [payload[name] for name in ("ema", "model") if isinstance(payload.get(name), dict)] or [payload]
    return is_mmdit_state_dict(state_dicts[0])


def _check_mmdit_state_dict(state_dict: dict[str, torch.Tensor]) -> None:
    if "x_embedder.proj.weight" not in state_dict or not is_mmdit_state_dict(state_dict):
        raise ValueError(
            "Not an original REPA MMDiT state dict: 'x_embedder.proj.weight' or 'joint_blocks.*' missing."
        )


def convert_mmdit_state_dict(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original ``MMDiT`` state dict (optionally DDP/compile-wrapped) → [`MMDiTTransformer2DModel`] state dict.

    ``pos_embed`` (1, (S/p)², D) becomes ``pos_embed.pos_embed``: the original stores the table with the weights
    and so does diffusers' `PatchEmbed` when it crops.
    """
    original = {strip_wrapper_prefixes(key): value for key, value in original.items()}
    _check_mmdit_state_dict(original)
    hidden_size = original["x_embedder.proj.weight"].shape[0]
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in original.items():
        if key == "pos_embed":
            converted["pos_embed.pos_embed"] = tensor
            continue
        ours = rename_key(key, _TO_OURS)
        if ours is None:
            raise ValueError(f"Unexpected parameter {key!r} in the original MMDiT state dict.")
        if _is_two_chunk_adaln(ours, tensor, hidden_size):
            tensor = _swap_halves(tensor)
        fused = _FUSED_KEY.match(ours)
        if fused is None:
            converted[ours] = tensor
            continue
        for name, rows in zip(_QKV_TARGETS[fused["fused"]], tensor.chunk(3, dim=0), strict=True):
            converted[f"{fused['path']}{name}.{fused['rest']}"] = rows.clone()
    return converted


def export_to_mmdit_state_dict(model: MMDiTTransformer2DModel) -> dict[str, torch.Tensor]:
    """The model's weights (and position table) under the original key names, loadable by the original ``MMDiT``.

    A model in `fuse_qkv_projections` mode also holds fused copies (``to_qkv``, ``to_added_qkv``) of the separate
    projections; the export is made from the separate ones.
    """
    state_dict = {key: tensor.detach() for key, tensor in model.state_dict().items() if not _FUSED_COPY.search(key)}
    hidden_size = model.hidden_size
    exported: dict[str, torch.Tensor] = {"pos_embed": state_dict.pop("pos_embed.pos_embed").clone()}
    for key in [key for key in state_dict if _SPLIT_KEY.match(key)]:
        match = _SPLIT_KEY.match(key)
        fused_name = "to_qkv" if match["name"] == "to_q" else "add_qkv_proj"
        parts = [state_dict.pop(f"{match['path']}{name}.{match['rest']}") for name in _QKV_TARGETS[fused_name]]
        state_dict[f"{match['path']}{fused_name}.{match['rest']}"] = torch.cat(parts)
    for key, tensor in state_dict.items():
        original_key = rename_key(key, _TO_ORIGINAL)
        if original_key is None:
            raise ValueError(f"No original MMDiT name for parameter {key!r}.")
        exported[original_key] = (
            _swap_halves(tensor) if _is_two_chunk_adaln(key, tensor, hidden_size) else tensor.clone()
        )
    return exported


def infer_mmdit_config(
    state_dict: dict[str, torch.Tensor], *, encoder_depth: int | None = None, args: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A [`MMDiTTransformer2DModel`] config from an original state dict.

    Sizes come from the weights (heads = width / 32, as the original fixes); the encoder depth from the argument,
    else the checkpoint's training ``args`` (``train_t2i.py`` stores ``encoder_depth``), else the original's
    default 8.
    """
    state_dict = {strip_wrapper_prefixes(key): value for key, value in state_dict.items()}
    _check_mmdit_state_dict(state_dict)
    hidden_size, in_channels, patch_size, _ = state_dict["x_embedder.proj.weight"].shape
    if hidden_size % MMDIT_HEAD_DIM:
        raise ValueError(f"The original MMDiT has heads of {MMDIT_HEAD_DIM} channels; width {hidden_size} is not.")
    depth = 1 + max(int(key.split(".")[1]) for key in state_dict if key.startswith("joint_blocks."))
    projection_dims = []
    while f"projectors.{len(projection_dims)}.4.weight" in state_dict:
        projection_dims.append(state_dict[f"projectors.{len(projection_dims)}.4.weight"].shape[0])
    projector_dim = state_dict["projectors.0.0.weight"].shape[0] if projection_dims else 2048
    if "pos_embed" not in state_dict:
        raise ValueError("The original MMDiT state dict has no 'pos_embed'; it always stores its position table.")
    sample_size = math.isqrt(state_dict["pos_embed"].shape[1]) * patch_size
    encoder_depth = encoder_depth or (args or {}).get("encoder_depth") or 8
    return {
        "sample_size": sample_size,
        "patch_size": patch_size,
        "in_channels": in_channels,
        "depth": depth,
        "num_attention_heads": hidden_size // MMDIT_HEAD_DIM,
        "attention_head_dim": MMDIT_HEAD_DIM,
        "joint_attention_dim": state_dict["context_embedder.weight"].shape[1],
        "encoder_depth": int(encoder_depth),
        "projector_dim": projector_dim,
        "projection_dims": tuple(projection_dims),
    }


def convert_mmdit_checkpoint(
    path: str | Path, *, encoder_depth: int | None = None, weights: Literal["ema", "model"] = "ema"
) -> MMDiTTransformer2DModel:
    """Load an original REPA text-to-image checkpoint (any of the three forms) as a [`MMDiTTransformer2DModel`]."""
    original, args = load_repa_checkpoint(path, weights=weights)
    model = MMDiTTransformer2DModel(**infer_mmdit_config(original, encoder_depth=encoder_depth, args=args))
    model.load_state_dict(convert_mmdit_state_dict(original), strict=True)
    return model

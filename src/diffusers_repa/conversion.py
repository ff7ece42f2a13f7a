"""Conversion between the original REPA checkpoints and [`SiTTransformer2DModel`].

Three original forms are read:

- a bare state dict saved with ``torch.save`` (like the released SiT-XL/2 ``last.pt``),
- a checkpoint of the original ``train.py``: ``{"model", "ema", "opt", "args", "steps"}`` (EMA weights by default),
- a safetensors file holding such a state dict.

Pickles are read with ``torch.load(weights_only=True)``; the only extra type allowed is ``argparse.Namespace``
(the original stores its command-line arguments that way).
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file

from .models.transformer_sit import (
    SIT_SIZES,
    SiTTransformer2DModel,
    convert_legacy_attention_keys,
    get_2d_sincos_pos_embed,
    parse_sit_preset,
)

# Original name prefix -> our name prefix; "{i}" stands for a block index.
_NAME_PAIRS: list[tuple[str, str]] = [
    ("x_embedder.proj.", "patch_embed."),
    ("t_embedder.mlp.0.", "time_embed.linear_1."),
    ("t_embedder.mlp.2.", "time_embed.linear_2."),
    ("y_embedder.embedding_table.", "class_embed.embedding_table."),
    # The fused qkv is split into to_q / to_k / to_v after renaming (rows [q; k; v]), and re-fused on export.
    ("blocks.{i}.attn.qkv.", "transformer_blocks.{i}.attn.to_qkv."),
    ("blocks.{i}.attn.proj.", "transformer_blocks.{i}.attn.to_out.0."),
    ("blocks.{i}.attn.q_norm.", "transformer_blocks.{i}.attn.norm_q."),
    ("blocks.{i}.attn.k_norm.", "transformer_blocks.{i}.attn.norm_k."),
    ("blocks.{i}.mlp.fc1.", "transformer_blocks.{i}.ff.net.0.proj."),
    ("blocks.{i}.mlp.fc2.", "transformer_blocks.{i}.ff.net.2."),
    ("blocks.{i}.adaLN_modulation.1.", "transformer_blocks.{i}.adaln_modulation."),
    ("final_layer.adaLN_modulation.1.", "adaln_out."),
    ("final_layer.linear.", "proj_out."),
    ("projectors.", "projectors."),
]
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_QUERY_KEY = re.compile(r"^(?P<path>.+\.attn\.)to_q\.(?P<rest>.+)$")


RenameTable = list[tuple[re.Pattern, str]]


def rename_tables(name_pairs: list[tuple[str, str]]) -> tuple[RenameTable, RenameTable]:
    """(original → ours, ours → original) tables of key prefixes; ``{i}`` in a prefix matches a block index."""

    def pattern(prefix: str) -> re.Pattern:
        return re.compile("^" + re.escape(prefix).replace(re.escape("{i}"), r"(\d+)"))

    return (
        [(pattern(original), ours) for original, ours in name_pairs],
        [(pattern(ours), original) for original, ours in name_pairs],
    )


def rename_key(key: str, table: RenameTable) -> str | None:
    """`key` with its prefix replaced by the table's first matching entry (block index carried over), or None."""
    for pattern, target in table:
        match = pattern.match(key)
        if match:
            return target.format(i=match.group(1) if match.groups() else "") + key[match.end() :]
    return None


def strip_wrapper_prefixes(key: str) -> str:
    """Drop the prefixes DDP (``module.``) and torch.compile (``_orig_mod.``) add to parameter names."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


_TO_OURS, _TO_ORIGINAL = rename_tables(_NAME_PAIRS)


def convert_repa_state_dict(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original REPA SiT state dict to this package's layout.

    The frozen ``pos_embed`` table is dropped: the model rebuilds it as a buffer. Unknown keys raise a ``ValueError``
    so that a checkpoint of another architecture is never half loaded.
    """
    converted, unknown = {}, []
    for raw_key, tensor in original.items():
        key = strip_wrapper_prefixes(raw_key)
        if key == "pos_embed":
            continue
        new_key = rename_key(key, _TO_OURS)
        if new_key is None:
            unknown.append(raw_key)
        else:
            converted[new_key] = tensor
    if unknown:
        raise ValueError(
            f"Not an original REPA/SiT state dict: unexpected keys {unknown[:5]}{' ...' if len(unknown) > 5 else ''}."
        )
    return convert_legacy_attention_keys(converted)


def _fuse_qkv(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``attn.to_q/to_k/to_v.*`` → one ``attn.to_qkv.*`` with rows [q; k; v], the original's fused layout.

    A model in `fuse_qkv_projections` mode already holds ``to_qkv``: the same concatenation, so it is overwritten.
    """
    fused = dict(state_dict)
    for key in state_dict:
        match = _QUERY_KEY.match(key)
        if match is None:
            continue
        path, rest = match["path"], match["rest"]
        parts = [fused.pop(f"{path}to_{name}.{rest}") for name in "qkv"]
        fused[f"{path}to_qkv.{rest}"] = torch.cat(parts)
    return fused


def export_to_repa_state_dict(model: SiTTransformer2DModel) -> dict[str, torch.Tensor]:
    """The model's weights under the original REPA key names (with ``pos_embed``), loadable by the original code."""
    exported = {}
    for key, tensor in _fuse_qkv(model.state_dict()).items():
        original_key = rename_key(key, _TO_ORIGINAL)
        if original_key is None:
            raise ValueError(f"No original REPA name for parameter {key!r}.")
        exported[original_key] = tensor.detach().clone()
    exported["pos_embed"] = model.pos_embed.detach().clone().unsqueeze(0)
    return exported


def load_repa_checkpoint(
    path: str | Path, weights: Literal["ema", "model"] = "ema"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an original checkpoint file.

    Returns the original-layout state dict and the training arguments stored with it (empty for bare state dicts
    and safetensors files).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {str(path)!r} does not exist.")
    if path.suffix == ".safetensors":
        return load_file(str(path)), {}
    with torch.serialization.safe_globals([argparse.Namespace]):
        payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict):
        raise ValueError(
            f"{str(path)!r} holds a {type(payload).__name__}, expected a state dict or a checkpoint dict."
        )
    if "model" not in payload and "ema" not in payload:
        return payload, {}
    if weights not in payload:
        raise ValueError(f"{str(path)!r} has no {weights!r} weights; available: {sorted(payload)}.")
    args = payload.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    return payload[weights], args


def infer_sit_config(
    state_dict: dict[str, torch.Tensor],
    *,
    model: str | None = None,
    num_heads: int | None = None,
    encoder_depth: int | None = None,
    args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Derive a [`SiTTransformer2DModel`] config from an original state dict.

    Everything the weights reveal is read from them; the number of attention heads and the encoder depth come from
    (in order) the arguments, the checkpoint's training ``args``, the preset ``model`` or the preset whose width and
    depth match the weights.
    """
    args = args or {}
    state_dict = {strip_wrapper_prefixes(key): value for key, value in state_dict.items()}
    if "x_embedder.proj.weight" not in state_dict:
        raise ValueError("Not an original REPA/SiT state dict: 'x_embedder.proj.weight' is missing.")
    hidden_size, in_channels, patch_size, _ = state_dict["x_embedder.proj.weight"].shape
    depth = 1 + max(int(key.split(".")[1]) for key in state_dict if key.startswith("blocks."))
    projection_dims = []
    while f"projectors.{len(projection_dims)}.4.weight" in state_dict:
        projection_dims.append(state_dict[f"projectors.{len(projection_dims)}.4.weight"].shape[0])
    projector_dim = state_dict["projectors.0.0.weight"].shape[0] if projection_dims else 2048
    class_rows = state_dict["y_embedder.embedding_table.weight"].shape[0]
    class_dropout_prob = float(args.get("cfg_prob", 0.1))
    num_classes = class_rows - 1 if class_dropout_prob > 0 else class_rows

    preset = None
    if model is not None and model.lower() != "custom":
        preset = parse_sit_preset(model)
        if (preset["hidden_size"], preset["depth"], preset["patch_size"]) != (hidden_size, depth, patch_size):
            raise ValueError(
                f"--model {model} does not match the weights (width {hidden_size}, depth {depth}, patch {patch_size})."
            )
    else:
        for size, (size_depth, size_width, _, _) in SIT_SIZES.items():
            if (size_width, size_depth) == (hidden_size, depth):
                preset = parse_sit_preset(f"SiT-{size}/{patch_size}")

    if "pos_embed" in state_dict:
        sample_size = math.isqrt(state_dict["pos_embed"].shape[1]) * patch_size
    elif "resolution" in args:
        sample_size = int(args["resolution"]) // 8
    else:
        sample_size = 32

    num_heads = num_heads or args.get("num_heads") or (preset or {}).get("num_attention_heads")
    if num_heads is None:
        raise ValueError(
            f"Cannot tell the number of attention heads of this checkpoint (width {hidden_size}, depth {depth} "
            "matches no SiT preset). Pass --num_heads N (or --model SiT-<size>/<patch>)."
        )
    encoder_depth = encoder_depth or args.get("encoder_depth") or (preset or {}).get("encoder_depth")
    if encoder_depth is None:
        if projection_dims:
            raise ValueError(
                "Cannot tell which block feeds the projectors of this checkpoint. Pass --encoder_depth K "
                "(REPA uses 8 for SiT-XL/2 and SiT-L/2, 4 for SiT-B/2)."
            )
        encoder_depth = 1
    return {
        "sample_size": sample_size,
        "patch_size": patch_size,
        "in_channels": in_channels,
        "hidden_size": hidden_size,
        "depth": depth,
        "num_attention_heads": int(num_heads),
        "mlp_ratio": state_dict["blocks.0.mlp.fc1.weight"].shape[0] / hidden_size,
        "num_classes": num_classes,
        "class_dropout_prob": class_dropout_prob,
        "encoder_depth": int(encoder_depth),
        "projector_dim": projector_dim,
        "projection_dims": tuple(projection_dims),
        "qk_norm": "blocks.0.attn.q_norm.weight" in state_dict,
    }


def convert_repa_checkpoint(
    path: str | Path,
    *,
    model: str | None = None,
    num_heads: int | None = None,
    encoder_depth: int | None = None,
    weights: Literal["ema", "model"] = "ema",
) -> SiTTransformer2DModel:
    """Load an original REPA checkpoint (any of the three forms) as a [`SiTTransformer2DModel`].

    With no options, the released SiT-XL/2 ``last.pt`` converts as SiT-XL/2 with 16 heads and encoder depth 8.
    """
    original, args = load_repa_checkpoint(path, weights=weights)
    config = infer_sit_config(original, model=model, num_heads=num_heads, encoder_depth=encoder_depth, args=args)
    sit = SiTTransformer2DModel(**config)
    converted = convert_repa_state_dict(original)
    sit.load_state_dict(converted, strict=True)
    if "pos_embed" in original:
        stored = original["pos_embed"].reshape(sit.pos_embed.shape).float()
        if not torch.allclose(stored, get_2d_sincos_pos_embed(config["hidden_size"], sit.grid_size), atol=1e-5):
            raise ValueError("The checkpoint's pos_embed is not the fixed 2-D sin-cos table this model rebuilds.")
    return sit

"""The trained model and its optimizer, as the run's arguments ask for them: a new SiT of a preset size, or a
pretrained one fine-tuned in full or with LoRA adapters."""

from __future__ import annotations

import torch
from peft import LoraConfig

from ..data import LatentCacheInfo
from ..models.transformer_sit import SiTTransformer2DModel, parse_sit_preset
from .arguments import REPATrainingArguments

# LoRA goes on the attention and MLP linears of every block (names relative to a SiTBlock; the attention ones are
# diffusers' standard projection names).
LORA_TARGET_MODULES = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.0.proj", "ff.net.2"]


def resolve_encoder_depth(args: REPATrainingArguments) -> int:
    """The block whose output is aligned: --encoder_depth, else the pretrained model's or the preset's."""
    if args.encoder_depth is not None:
        return args.encoder_depth
    if args.pretrained_model is not None:
        return SiTTransformer2DModel.load_config(args.pretrained_model, subfolder="transformer")["encoder_depth"]
    return parse_sit_preset(args.model)["encoder_depth"]


def build_model(
    args: REPATrainingArguments, info: LatentCacheInfo, projection_dims: tuple[int, ...]
) -> SiTTransformer2DModel:
    """A new SiT of the preset size for the cache's inputs (latents, or pixels without a VAE), or the
    `--pretrained_model` transformer (with LoRA adapters if asked), with one projector per alignment target."""
    if args.pretrained_model is None:
        sizes = {
            "depth": args.depth,
            "hidden_size": args.hidden_size,
            "num_attention_heads": args.num_attention_heads,
            "encoder_depth": args.encoder_depth,
        }
        return SiTTransformer2DModel.from_preset(
            args.model,
            sample_size=info.latent_size,
            in_channels=info.latent_channels,
            num_classes=info.num_classes,
            class_dropout_prob=args.cfg_prob,
            projector_dim=args.projector_dim,
            projection_dims=projection_dims,
            qk_norm=args.qk_norm,
            **{name: value for name, value in sizes.items() if value is not None},
        )

    # Its inputs and null class were checked against the cache by preflight; what needs the dataset is checked here.
    config = SiTTransformer2DModel.load_config(args.pretrained_model, subfolder="transformer")
    if info.num_classes > config["num_classes"]:
        raise ValueError(
            f"The dataset has {info.num_classes} classes but {args.pretrained_model} only {config['num_classes']}; "
            "fine-tuning reuses the model's class embeddings, so the dataset's labels must fit in them."
        )
    sizes = {"depth": args.depth, "hidden_size": args.hidden_size, "num_attention_heads": args.num_attention_heads}
    sizes["encoder_depth"] = args.encoder_depth
    different = {name: value for name, value in sizes.items() if value is not None and value != config[name]}
    if different:
        raise ValueError(
            f"--pretrained_model {args.pretrained_model} has "
            + ", ".join(f"{name} {config[name]}" for name in different)
            + f", not {', '.join(f'{name} {value}' for name, value in different.items())}: leave those flags out "
            "(fine-tuning keeps the model's architecture)."
        )
    model = SiTTransformer2DModel.from_pretrained(args.pretrained_model, subfolder="transformer")
    if tuple(model.config.projection_dims) != projection_dims:
        # No projectors, or other widths than the encoders': new ones (initialised as in a new model), trained.
        pretrained = {name: value for name, value in model.state_dict().items() if not name.startswith("projectors.")}
        model = SiTTransformer2DModel.from_config(model.config, projection_dims=projection_dims)
        model.load_state_dict(pretrained, strict=False)
    model.class_embed.dropout_prob = args.cfg_prob
    if args.use_lora:
        model.requires_grad_(False)
        model.add_adapter(
            LoraConfig(
                r=args.lora_rank,
                lora_alpha=args.lora_alpha or args.lora_rank,
                init_lora_weights="gaussian",
                target_modules=LORA_TARGET_MODULES,
            )
        )
        model.projectors.requires_grad_(True)
    return model


def build_optimizer(params: list[torch.nn.Parameter], args: REPATrainingArguments) -> torch.optim.AdamW:
    """AdamW over `params` with the run's settings (fused into one kernel per update on CUDA)."""
    return torch.optim.AdamW(
        params,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        fused=all(param.device.type == "cuda" for param in params) or None,
    )

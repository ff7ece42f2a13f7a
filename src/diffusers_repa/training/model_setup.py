"""The trained model and its optimizer, as the run's arguments ask for them: a new SiT of a preset size, a pretrained
one fine-tuned in full or with LoRA adapters, a new DiT (diffusers' `DiTTransformer2DModel` with learned variance,
for the improved-DDPM objective) with a `REPAHead`, or a text-to-image `MMDiTTransformer2DModel`."""

from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel
from diffusers.configuration_utils import FrozenDict
from peft import LoraConfig
from torch import nn

from ..data import LatentCacheInfo
from ..models.transformer_mmdit import MMDiTTransformer2DModel
from ..models.transformer_sit import SiTTransformer2DModel
from ..presets import parse_preset
from ..repa_head import REPAHead, TransformerWithREPAHead
from .arguments import REPATrainingArguments

# LoRA goes on the attention and MLP linears of every block (names relative to a SiTBlock; the attention ones are
# diffusers' standard projection names).
LORA_TARGET_MODULES = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.0.proj", "ff.net.2"]


def resolve_encoder_depth(args: REPATrainingArguments) -> int:
    """The block whose output is aligned: --encoder_depth, else the pretrained model's or the preset's."""
    if args.encoder_depth is not None:
        return args.encoder_depth
    family = args.family
    if family == "SD3":
        return SD3_ENCODER_DEPTH
    if args.pretrained_model is not None and family != "DiT":
        model_class = SiTTransformer2DModel if family == "SiT" else MMDiTTransformer2DModel
        return model_class.load_config(args.pretrained_model, subfolder="transformer")["encoder_depth"]
    return parse_preset(args.model)["encoder_depth"]


# SD3 fine-tuning aligns after block 8 unless --encoder_depth says otherwise (REPA's choice for 24-block models;
# SD3.5-medium has 24 blocks).
SD3_ENCODER_DEPTH = 8

# diffusers' DiTPipeline draws the unconditional half of classifier-free guidance with class id 1000, so a DiT keeps
# ImageNet's 1000-entry label table (+ the null class) whatever the dataset's classes.
DIT_NUM_CLASSES = 1000


def build_dit(args: REPATrainingArguments, info: LatentCacheInfo, projection_dims: tuple[int, ...]) -> nn.Module:
    """A new `DiTTransformer2DModel` of the preset size with learned variance (2C output channels) and label dropout
    `--cfg_prob`, wrapped with a `REPAHead` after block `--encoder_depth` when there are alignment targets."""
    if info.num_classes > DIT_NUM_CLASSES:
        raise ValueError(
            f"A DiT has {DIT_NUM_CLASSES} classes (diffusers' DiTPipeline); the dataset has {info.num_classes}."
        )
    if args.pretrained_model is not None:
        dit = _pretrained_dit(args, info)
    else:
        preset = parse_preset(args.model)
        hidden = args.hidden_size or preset["hidden_size"]
        heads = args.num_attention_heads or preset["num_attention_heads"]
        dit = DiTTransformer2DModel(
            num_attention_heads=heads,
            attention_head_dim=hidden // heads,
            in_channels=info.latent_channels,
            out_channels=2 * info.latent_channels,  # ε and the variance interpolation v
            num_layers=args.depth or preset["depth"],
            sample_size=info.latent_size,
            patch_size=preset["patch_size"],
            num_embeds_ada_norm=DIT_NUM_CLASSES,
        )
        init_dit_weights(dit)
    for block in dit.transformer_blocks:  # diffusers fixes DiT's label dropout at 0.1; --cfg_prob decides here
        block.norm1.emb.class_embedder.dropout_prob = args.cfg_prob
    if not projection_dims:
        return dit
    head = REPAHead.for_transformer(dit, projection_dims, args.encoder_depth, args.projector_dim)
    return TransformerWithREPAHead(dit, head)


@torch.no_grad()
def init_dit_weights(dit: DiTTransformer2DModel) -> None:
    """DiT's own initialisation (its `initialize_weights`) on diffusers' layout: xavier-uniform linears and patch
    embedding with zero biases, N(0, 0.02) label table and timestep MLP, and adaLN-Zero — every block's modulation and
    the final layer start at zero, so the model starts as the identity of its input stream and predicts 0. DiT shares
    one timestep/label embedder between blocks; diffusers gives each block its own, started here from the same values.
    """
    for module in dit.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    patch = dit.pos_embed.proj
    nn.init.xavier_uniform_(patch.weight.view(patch.weight.shape[0], -1))
    nn.init.zeros_(patch.bias)
    first = dit.transformer_blocks[0].norm1.emb
    nn.init.normal_(first.class_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(first.timestep_embedder.linear_1.weight, std=0.02)
    nn.init.normal_(first.timestep_embedder.linear_2.weight, std=0.02)
    for block in dit.transformer_blocks:
        block.norm1.emb.load_state_dict(first.state_dict())
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    for layer in (dit.proj_out_1, dit.proj_out_2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def _check_pretrained_inputs(config: FrozenDict, info: LatentCacheInfo, name: str) -> None:
    """A pretrained transformer's inputs (its config's sample_size and in_channels) must be the cache's latents."""
    if (config.sample_size, config.in_channels) != (info.latent_size, info.latent_channels):
        raise ValueError(
            f"{name} works on {config.in_channels}×{config.sample_size}² inputs, the cache holds "
            f"{info.latent_channels}×{info.latent_size}²: use the VAE and resolution of its training."
        )


def _pretrained_dit(args: REPATrainingArguments, info: LatentCacheInfo) -> DiTTransformer2DModel:
    """The `--pretrained_model` DiT (a DiTPipeline folder or Hub id, e.g. diffusers' conversion of the official
    DiT-XL-2-256), checked against the cache: learned variance, the latents' size and channels, DiTPipeline's labels."""
    dit = DiTTransformer2DModel.from_pretrained(args.pretrained_model, subfolder="transformer")
    config, name = dit.config, f"--pretrained_model {args.pretrained_model}"
    _check_pretrained_inputs(config, info, name)
    if config.out_channels != 2 * config.in_channels or config.num_embeds_ada_norm != DIT_NUM_CLASSES:
        raise ValueError(
            f"{name} is not a class-conditional DiT with learned variance ({2 * config.in_channels} output channels, "
            f"{DIT_NUM_CLASSES} classes), which the improved-DDPM objective and DiTPipeline need."
        )
    sizes = {"num_layers": args.depth, "num_attention_heads": args.num_attention_heads}
    different = {name: value for name, value in sizes.items() if value is not None and value != config[name]}
    if different or (args.hidden_size and args.hidden_size != dit.inner_dim):
        raise ValueError(
            f"{name}: leave out --depth/--hidden_size/--num_attention_heads (fine-tuning keeps its size)."
        )
    return dit


def build_mmdit(
    args: REPATrainingArguments, info: LatentCacheInfo, projection_dims: tuple[int, ...], text_dim: int
) -> MMDiTTransformer2DModel:
    """A new `MMDiTTransformer2DModel` of the `MMDiT-<depth>/<patch>` preset (the original's sizing) on the cache's
    inputs, conditioned on `text_dim`-wide text token features, with one projector per alignment target — or the
    `--pretrained_model` MMDiTPipeline's transformer (new projectors where the widths differ)."""
    if args.pretrained_model is not None:
        model = MMDiTTransformer2DModel.from_pretrained(args.pretrained_model, subfolder="transformer")
        config, name = model.config, f"--pretrained_model {args.pretrained_model}"
        _check_pretrained_inputs(config, info, name)
        if config.joint_attention_dim != text_dim:
            raise ValueError(
                f"{name} reads {config.joint_attention_dim}-wide text features, --text_encoder {args.text_encoder} "
                f"gives {text_dim}: use the text encoder of its training."
            )
        if tuple(config.projection_dims) != projection_dims:
            pretrained = {k: v for k, v in model.state_dict().items() if not k.startswith("projectors.")}
            model = MMDiTTransformer2DModel.from_config(model.config, projection_dims=projection_dims)
            model.load_state_dict(pretrained, strict=False)
        return model
    preset = parse_preset(args.model)
    return MMDiTTransformer2DModel.from_depth(
        preset["depth"],
        sample_size=info.latent_size,
        patch_size=preset["patch_size"],
        in_channels=info.latent_channels,
        joint_attention_dim=text_dim,
        encoder_depth=args.encoder_depth,
        projector_dim=args.projector_dim,
        projection_dims=projection_dims,
    )


def diffusion_transformer(model: nn.Module) -> nn.Module:
    """The diffusers transformer inside `model` (itself, or the one a `TransformerWithREPAHead` wraps)."""
    return model.transformer if isinstance(model, TransformerWithREPAHead) else model


def token_count(model: nn.Module, latent_size: int) -> int:
    """Image tokens T = (latent_size / patch_size)² of a transformer (or a wrapped one) on latent_size² inputs (its
    config's sample_size for SiT, DiT and MMDiT; SD3 crops its position table to any size)."""
    return (latent_size // diffusion_transformer(model).config.patch_size) ** 2


def build_model(
    args: REPATrainingArguments, info: LatentCacheInfo, projection_dims: tuple[int, ...], text_dim: int | None = None
) -> nn.Module:
    """A new SiT of the preset size for the cache's inputs (latents, or pixels without a VAE), the
    `--pretrained_model` transformer (with LoRA adapters if asked), with one projector per alignment target — or, for
    a DiT preset, [`build_dit`], and for an MMDiT (text features `text_dim` wide), [`build_mmdit`]."""
    family = args.family
    if family == "DiT":
        return build_dit(args, info, projection_dims)
    if family == "MMDiT":
        return build_mmdit(args, info, projection_dims, text_dim)
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

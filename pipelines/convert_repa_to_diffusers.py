"""Convert an original REPA checkpoint into a `SiTTransformer2DModel` folder (`save_pretrained` layout), or with
--text_to_image an original text-to-image MMDiT checkpoint (`train_t2i.py`) into an `MMDiTTransformer2DModel` one.

Examples:
    # the released SiT-XL/2 checkpoint (bare state dict): everything is inferred
    python pipelines/convert_repa_to_diffusers.py --checkpoint last.pt --output sit-xl-repa/transformer
    # a checkpoint of the original train.py: EMA weights by default, encoder depth read from its args
    python pipelines/convert_repa_to_diffusers.py --checkpoint 0400000.pt --output out --model SiT-B/2
    # a whole SiTPipeline (VAE, SDE scheduler, ImageNet class names), ready for sample.py / generate.py
    python pipelines/convert_repa_to_diffusers.py --checkpoint last.pt --output sit-xl-repa --vae stabilityai/sd-vae-ft-ema
    # a train_t2i.py checkpoint (MMDiT on COCO): EMA weights, encoder depth from its args (else --encoder_depth)
    python pipelines/convert_repa_to_diffusers.py --checkpoint 0400000.pt --output mmdit-repa/transformer \
        --text_to_image
    # a whole MMDiTPipeline (VAE + the original's CLIP ViT-L/14 text encoder), ready for generate.py
    python pipelines/convert_repa_to_diffusers.py --checkpoint 0400000.pt --output mmdit-repa --text_to_image \
        --vae stabilityai/sd-vae-ft-ema --text_encoder openai/clip-vit-large-patch14

A mistake (a missing checkpoint or VAE folder, an output that is a file, a bad value, an MMDiT checkpoint without
--text_to_image or a SiT one with it) ends with one ``convert_repa_to_diffusers.py: error: ...`` line (exit status
2) before any weights are converted.
"""

import argparse
import sys
from pathlib import Path

from diffusers_repa.cli import run_cli
from diffusers_repa.pretrained_paths import check_pretrained_source

# The original's text features: CLIP ViT-L/14's last hidden state (U-ViT's COCO preprocessing).
CLIP_TEXT_ENCODER = "openai/clip-vit-large-patch14"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint", required=True, help="original .pt (state dict or train.py checkpoint) or .safetensors"
    )
    parser.add_argument("--output", required=True, help="folder to write the converted transformer (or pipeline) to")
    parser.add_argument("--model", default=None, help="preset such as SiT-XL/2 (gives heads and encoder depth)")
    parser.add_argument("--num_heads", type=int, default=None, help="attention heads (not stored in the weights)")
    parser.add_argument("--encoder_depth", type=int, default=None, help="1-based block feeding the projectors")
    parser.add_argument(
        "--weights", choices=["ema", "model"], default="ema", help="which weights of a train.py checkpoint"
    )
    parser.add_argument(
        "--vae", default=None, help="write a whole SiTPipeline with this AutoencoderKL (Hub id or folder) instead"
    )
    parser.add_argument(
        "--path_type", choices=["linear", "cosine"], default="linear", help="the SDE scheduler's path (with --vae)"
    )
    parser.add_argument(
        "--text_to_image",
        action="store_true",
        help="the checkpoint is the original text-to-image MMDiT (train_t2i.py): write an MMDiTTransformer2DModel",
    )
    parser.add_argument(
        "--text_encoder",
        default=CLIP_TEXT_ENCODER,
        help="with --text_to_image --vae: CLIP tokenizer + text model of the MMDiTPipeline (Hub id or folder, "
        "optionally with tokenizer/ and text_encoder/ inside, or tiny-clip)",
    )
    args = parser.parse_args(argv)
    if not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint} is not a file.")
    if Path(args.output).is_file():
        raise NotADirectoryError(f"--output {args.output} is a file; give the folder to write.")
    for flag in ("num_heads", "encoder_depth"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be at least 1, got {getattr(args, flag)}.")
    if args.text_to_image and (args.model is not None or args.num_heads is not None):
        raise ValueError(
            "--model and --num_heads describe a SiT; the original MMDiT's heads are fixed (32 channels each), so "
            "drop them with --text_to_image."
        )
    if args.vae is not None:
        check_pretrained_source(args.vae, config_name="config.json", what="VAE")
    return args


def check_checkpoint_family(checkpoint: str, text_to_image: bool) -> None:
    """Refuse an MMDiT checkpoint without --text_to_image and a SiT one with it, naming the flag to change."""
    from diffusers_repa.conversion_mmdit import is_mmdit_checkpoint

    mmdit = is_mmdit_checkpoint(checkpoint)
    if mmdit and not text_to_image:
        raise ValueError(
            f"{checkpoint} is an original text-to-image MMDiT checkpoint (joint_blocks.*); add --text_to_image."
        )
    if text_to_image and not mmdit:
        raise ValueError(
            f"--text_to_image: {checkpoint} is not an original MMDiT checkpoint (it has no joint_blocks.*); a "
            "class-conditional SiT checkpoint converts without --text_to_image."
        )


def convert_text_to_image(args: argparse.Namespace) -> None:
    from diffusers import AutoencoderKL

    from diffusers_repa.conversion_mmdit import convert_mmdit_checkpoint
    from diffusers_repa.pipelines import MMDiTPipeline
    from diffusers_repa.schedulers import SiTSDEScheduler
    from diffusers_repa.text_encoding import load_text_encoder

    # The text encoder is read first: a wrong name is reported before the checkpoint is converted.
    tokenizer, text_encoder = load_text_encoder(args.text_encoder) if args.vae is not None else (None, None)
    model = convert_mmdit_checkpoint(args.checkpoint, encoder_depth=args.encoder_depth, weights=args.weights)
    if args.vae is None:
        model.save_pretrained(args.output)
    else:
        if text_encoder.config.hidden_size != model.config.joint_attention_dim:
            raise ValueError(
                f"--text_encoder {args.text_encoder} has width {text_encoder.config.hidden_size}, but the MMDiT reads "
                f"{model.config.joint_attention_dim}-d token features; give the CLIP model it was trained with."
            )
        vae = AutoencoderKL.from_pretrained(args.vae)
        scheduler = SiTSDEScheduler(path_type=args.path_type)
        MMDiTPipeline(model, vae, scheduler, tokenizer, text_encoder).save_pretrained(args.output)
    config = model.config
    print(
        f"Converted {args.checkpoint} -> {args.output}: MMDiT depth {config.depth}, width {model.hidden_size}, "
        f"{config.num_attention_heads} heads, patch {config.patch_size}, text features {config.joint_attention_dim}, "
        f"encoder depth {config.encoder_depth}, projections {list(config.projection_dims)}, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters."
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    check_checkpoint_family(args.checkpoint, args.text_to_image)
    if args.text_to_image:
        convert_text_to_image(args)
        return
    from diffusers import AutoencoderKL

    from diffusers_repa.conversion import convert_repa_checkpoint
    from diffusers_repa.pipelines import SiTPipeline, imagenet_id2label
    from diffusers_repa.schedulers import SiTSDEScheduler

    model = convert_repa_checkpoint(
        args.checkpoint,
        model=args.model,
        num_heads=args.num_heads,
        encoder_depth=args.encoder_depth,
        weights=args.weights,
    )
    if args.vae is None:
        model.save_pretrained(args.output)
    else:
        vae = AutoencoderKL.from_pretrained(args.vae)
        # The original checkpoints are ImageNet models; other label sets can be given to SiTPipeline later.
        labels = imagenet_id2label() if model.config.num_classes == 1000 else None
        scheduler = SiTSDEScheduler(path_type=args.path_type)
        SiTPipeline(transformer=model, vae=vae, scheduler=scheduler, id2label=labels).save_pretrained(args.output)
    config = model.config
    print(
        f"Converted {args.checkpoint} -> {args.output}: depth {config.depth}, width {config.hidden_size}, "
        f"{config.num_attention_heads} heads, patch {config.patch_size}, encoder depth {config.encoder_depth}, "
        f"projections {list(config.projection_dims)}, {sum(p.numel() for p in model.parameters()):,} parameters."
    )


if __name__ == "__main__":
    sys.exit(run_cli(main))

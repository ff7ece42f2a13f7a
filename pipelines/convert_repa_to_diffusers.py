"""Convert an original REPA checkpoint into a `SiTTransformer2DModel` folder (`save_pretrained` layout).

Examples:
    # the released SiT-XL/2 checkpoint (bare state dict): everything is inferred
    python pipelines/convert_repa_to_diffusers.py --checkpoint last.pt --output sit-xl-repa/transformer
    # a checkpoint of the original train.py: EMA weights by default, encoder depth read from its args
    python pipelines/convert_repa_to_diffusers.py --checkpoint 0400000.pt --output out --model SiT-B/2
    # a whole SiTPipeline (VAE, SDE scheduler, ImageNet class names), ready for sample.py / generate.py
    python pipelines/convert_repa_to_diffusers.py --checkpoint last.pt --output sit-xl-repa --vae stabilityai/sd-vae-ft-ema

A mistake (a missing checkpoint or VAE folder, an output that is a file, a bad value) ends with one
``convert_repa_to_diffusers.py: error: ...`` line (exit status 2) before the checkpoint is read.
"""

import argparse
import sys
from pathlib import Path

from diffusers_repa.cli import run_cli
from diffusers_repa.pretrained_paths import check_pretrained_source


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
    args = parser.parse_args(argv)
    if not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint} is not a file.")
    if Path(args.output).is_file():
        raise NotADirectoryError(f"--output {args.output} is a file; give the folder to write.")
    for flag in ("num_heads", "encoder_depth"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be at least 1, got {getattr(args, flag)}.")
    if args.vae is not None:
        check_pretrained_source(args.vae, config_name="config.json", what="VAE")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
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

"""Convert an original REPA checkpoint into a `SiTTransformer2DModel` folder (`save_pretrained` layout).

Examples:
    # the released SiT-XL/2 checkpoint (bare state dict): everything is inferred
    python pipelines/convert_repa_to_diffusers.py --checkpoint last.pt --output sit-xl-repa/transformer
    # a checkpoint of the original train.py: EMA weights by default, encoder depth read from its args
    python pipelines/convert_repa_to_diffusers.py --checkpoint 0400000.pt --output out --model SiT-B/2
"""

import argparse

from diffusers_repa.conversion import convert_repa_checkpoint


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint", required=True, help="original .pt (state dict or train.py checkpoint) or .safetensors"
    )
    parser.add_argument("--output", required=True, help="folder to write the converted model to")
    parser.add_argument("--model", default=None, help="preset such as SiT-XL/2 (gives heads and encoder depth)")
    parser.add_argument("--num_heads", type=int, default=None, help="attention heads (not stored in the weights)")
    parser.add_argument("--encoder_depth", type=int, default=None, help="1-based block feeding the projectors")
    parser.add_argument(
        "--weights", choices=["ema", "model"], default="ema", help="which weights of a train.py checkpoint"
    )
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    model = convert_repa_checkpoint(
        args.checkpoint,
        model=args.model,
        num_heads=args.num_heads,
        encoder_depth=args.encoder_depth,
        weights=args.weights,
    )
    model.save_pretrained(args.output)
    config = model.config
    print(
        f"Converted {args.checkpoint} -> {args.output}: depth {config.depth}, width {config.hidden_size}, "
        f"{config.num_attention_heads} heads, patch {config.patch_size}, encoder depth {config.encoder_depth}, "
        f"projections {list(config.projection_dims)}, {sum(p.numel() for p in model.parameters()):,} parameters."
    )


if __name__ == "__main__":
    main()

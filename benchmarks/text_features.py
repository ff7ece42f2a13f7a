"""Text features cached in the latent cache versus encoded on the fly: training-loader batches/s of both.

Run from the repository root:

    python -m benchmarks.text_features                                   # tiny-clip, offline
    python -m benchmarks.text_features --text_encoder openai/clip-vit-large-patch14 --device cuda --batch_size 256

Two pixel-space caches of the built-in ``digits-captions`` (three captions per image) are built once in --work_dir:
one with the captions' text features (float16, as training reads them) and one with the captions only. "cached"
times a loader batch of the first, ``text_features`` included, moved to --device; "on the fly" times a loader batch
of the second plus :func:`~diffusers_repa.text_encoding.encode_text` of its drawn captions on --device (what a run
without cached features does every step). The text encoder's cost dominates the second and grows with its size, so
tiny-clip's ratio is a lower bound of CLIP ViT-L/14's. Both variants are timed back to back in one process, after
warm-up batches, over --repeats blocks of --num_batches batches; the median block is reported.
Prints a Markdown table and the ratio, and with --output writes text_features.json / .md there.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import (
    add_run_arguments,
    check_finite_positive,
    environment,
    markdown_table,
    median,
    setup_run,
    time_blocks,
    write_report,
)
from diffusers_repa.data import DIGITS_CAPTIONS_DATASET, build_latent_cache, load_latent_cache, make_train_dataloader
from diffusers_repa.precision import MIXED_PRECISIONS, autocast_dtype
from diffusers_repa.text_encoding import encode_text, load_text_encoder


def build_caches(work_dir: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """The digits-captions caches with and without text features (reused if already built)."""
    common = {
        "caption_column": "caption",
        "mixed_precision": args.mixed_precision,
        "num_workers": 0,
        "show_progress": False,
    }
    name = str(args.text_encoder).replace("/", "--")
    with_features = build_latent_cache(
        DIGITS_CAPTIONS_DATASET,
        work_dir / f"digits-captions{args.resolution}-{name}",
        None,
        args.resolution,
        text_encoder=args.text_encoder,
        **common,
    )
    captions_only = build_latent_cache(
        DIGITS_CAPTIONS_DATASET, work_dir / f"digits-captions{args.resolution}", None, args.resolution, **common
    )
    return with_features, captions_only


def batch_stream(cache: Path, device: torch.device, args: argparse.Namespace) -> Callable[[], dict]:
    """A function returning the next loader batch (cycling epochs), its tensors moved to ``device``."""
    loader = make_train_dataloader(load_latent_cache(cache), args.batch_size, seed=args.seed)
    batches = itertools.chain.from_iterable(iter(loader) for _ in itertools.count())

    def next_batch() -> dict:
        return {
            name: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
            for name, value in next(batches).items()
        }

    return next_batch


def measure(step: Callable[[], torch.Tensor], device: torch.device, args: argparse.Namespace) -> dict:
    seconds = median(time_blocks(step, device, warmup=args.warmup, iterations=args.num_batches, repeats=args.repeats))
    return {"ms_per_batch": 1000 * seconds, "batches_per_s": 1 / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text_encoder", default="tiny-clip", help="tiny-clip, or a CLIP repo / folder.")
    parser.add_argument("--work_dir", default=None, help="Where the caches go (default: a temporary folder).")
    parser.add_argument("--resolution", type=int, default=8, help="Crop side of the digits caches.")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--mixed_precision", default="no", choices=MIXED_PRECISIONS, help="Text encoder.")
    parser.add_argument("--num_batches", type=int, default=10, help="Batches per timed block.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    add_run_arguments(parser, "text_features.json/.md")
    args = parser.parse_args()
    device = setup_run(args)
    encoder_autocast_dtype = autocast_dtype(args.mixed_precision)

    with tempfile.TemporaryDirectory() as temp_dir:
        with_features, captions_only = build_caches(Path(args.work_dir or temp_dir), args)
        tokenizer, text_encoder = load_text_encoder(args.text_encoder, device=device)
        cached_batch, caption_batch = (
            batch_stream(with_features, device, args),
            batch_stream(captions_only, device, args),
        )

        def cached() -> torch.Tensor:
            return cached_batch()["text_features"]

        def on_the_fly() -> torch.Tensor:
            captions = caption_batch()["caption"]
            with torch.autocast(device.type, dtype=encoder_autocast_dtype, enabled=encoder_autocast_dtype is not None):
                return encode_text(tokenizer, text_encoder, captions, device=device).float()

        rows = [{"variant": "cached", **measure(cached, device, args)}]
        rows.append({"variant": "on the fly", **measure(on_the_fly, device, args)})
        features_shape = list(cached().shape[1:])
    for row in rows:
        check_finite_positive(row, ["batches_per_s"])
        row.update(text_encoder=str(args.text_encoder), batch_size=args.batch_size)
    ratio = rows[0]["batches_per_s"] / rows[1]["batches_per_s"]
    result = {
        "benchmark": "text_features",
        "environment": environment(device),
        "text_encoder": str(args.text_encoder),
        "text_features_shape": features_shape,
        "mixed_precision": args.mixed_precision,
        "timing": {"warmup": args.warmup, "num_batches": args.num_batches, "repeats": args.repeats},
        "results": rows,
        "cached_over_on_the_fly": ratio,
    }
    columns = [
        ("text_encoder", "text encoder"),
        ("batch_size", "batch"),
        ("variant", "text features"),
        ("ms_per_batch", "ms/batch"),
        ("batches_per_s", "batches/s"),
    ]
    table = markdown_table(rows, columns)
    summary = f"Cached text features {features_shape}: {ratio:.3g}x the batches/s of encoding on the fly."
    write_report(result, f"{table}\n\n{summary}", args.output, "text_features")


if __name__ == "__main__":
    main()

"""Training-loader throughput (samples/s) over a latent cache, for several worker counts.

Run from the repository root:

    python -m benchmarks.loader_throughput --cache data/imagenet256 --batch_size 256 --num_workers 0 4 8
    python -m benchmarks.loader_throughput --output benchmarks/results   # builds a synthetic cache first

Without --cache, a synthetic cache of --num_samples images is built once in --work_dir with a tiny random VAE
that downsamples x8 like the SD-VAE (so shapes match a real cache at that resolution: 4x32x32 latents at 256 px);
the loader's cost depends only on those shapes. Each configuration is timed after warm-up batches (worker start-up
stays out), over --repeats blocks of --num_batches batches, cycling epochs as needed; the median block is reported.
On a CUDA --device the loader pins memory and each timed step includes the copy of the batch to the GPU.
Prints a Markdown table and, with --output, writes loader_throughput.json / .md there.
"""

from __future__ import annotations

import argparse
import itertools
import math
import tempfile
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
from diffusers_repa.data import build_latent_cache, load_latent_cache, make_train_dataloader, synthetic_class_dataset
from diffusers_repa.models.tiny_vae import tiny_random_vae


def build_synthetic_cache(work_dir: Path, num_samples: int, resolution: int) -> Path:
    """A cache of synthetic class images encoded by the tiny random x8 VAE (reused if already built)."""
    vae = tiny_random_vae()
    num_classes = 10
    source = synthetic_class_dataset(num_classes, math.ceil(num_samples / num_classes), resolution)
    output = work_dir / f"synthetic_cache_{num_samples}_{resolution}px"
    return build_latent_cache(source, output, vae, resolution, max_samples=num_samples, batch_size=32)


def measure(dataset, num_workers: int, device: torch.device, args: argparse.Namespace) -> dict:
    batch_size, hflip = args.batch_size, args.hflip
    loader = make_train_dataloader(
        dataset, batch_size, num_workers=num_workers, hflip=hflip, seed=args.seed, pin_memory=device.type == "cuda"
    )
    batches = itertools.chain.from_iterable(iter(loader) for _ in itertools.count())

    def step() -> dict[str, torch.Tensor]:
        return {name: value.to(device, non_blocking=True) for name, value in next(batches).items()}

    seconds = time_blocks(step, device, warmup=args.warmup, iterations=args.num_batches, repeats=args.repeats)
    seconds_per_batch = median(seconds)
    return {
        "num_workers": num_workers,
        "batch_size": batch_size,
        "hflip": hflip,
        "ms_per_batch": 1000 * seconds_per_batch,
        "samples_per_s": batch_size / seconds_per_batch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=None, help="Latent cache directory or Hub dataset id (else synthetic).")
    parser.add_argument("--work_dir", default=None, help="Where the synthetic cache goes (default: a temp dir).")
    parser.add_argument("--num_samples", type=int, default=1024, help="Size of the synthetic cache.")
    parser.add_argument("--resolution", type=int, default=256, help="Resolution of the synthetic cache.")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--num_workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--hflip", action="store_true", help="Also flip (image and latent moments).")
    parser.add_argument("--num_batches", type=int, default=10, help="Batches per timed block.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    add_run_arguments(parser, "loader_throughput.json/.md")
    args = parser.parse_args()
    device = setup_run(args)

    with tempfile.TemporaryDirectory() as temp_dir:
        cache = args.cache or build_synthetic_cache(Path(args.work_dir or temp_dir), args.num_samples, args.resolution)
        dataset = load_latent_cache(cache)
        image_shape = list(dataset.features["image"].shape)
        latent_shape = list(dataset.features["latent_mean"].shape)
        rows = []
        for num_workers in args.num_workers:
            row = measure(dataset, num_workers, device, args)
            check_finite_positive(row, ["samples_per_s"])
            rows.append({**row, "image_shape": "x".join(map(str, image_shape)), "cache_rows": len(dataset)})

    result = {
        "benchmark": "loader_throughput",
        "environment": environment(device),
        "cache": str(args.cache) if args.cache else f"synthetic ({args.num_samples} samples)",
        "image_shape": image_shape,
        "latent_shape": latent_shape,
        "timing": {"warmup": args.warmup, "num_batches": args.num_batches, "repeats": args.repeats},
        "results": rows,
    }
    columns = [
        ("image_shape", "image"),
        ("cache_rows", "cache rows"),
        ("batch_size", "batch"),
        ("num_workers", "workers"),
        ("hflip", "hflip"),
        ("ms_per_batch", "ms/batch"),
        ("samples_per_s", "samples/s"),
    ]
    write_report(result, markdown_table(rows, columns), args.output, "loader_throughput")


if __name__ == "__main__":
    main()

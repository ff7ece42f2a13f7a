"""Helpers shared by the benchmark scripts: device description, peak rates, timing, memory, JSON/Markdown output.

Timing rule used everywhere: a few warm-up calls (compilation, cuDNN/cuBLAS autotuning and allocator growth stay out
of the numbers), then `repeats` timed blocks of `iterations` calls each, with the device synchronised before every
clock read; the reported time is the median over blocks. Ratios between variants are only meaningful when both were
measured in the same process on the same device, back to back.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Dense (no 2:4 sparsity) peak tensor-core rates in TFLOP/s from NVIDIA's data sheets, looked up by a substring of
# `torch.cuda.get_device_name()`; first match wins, so the specific names come before the generic ones.
# "tf32" is the fp32-matmul rate when TF32 is allowed, "fp32" the plain CUDA-core rate when it is not.
PEAK_DENSE_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.8, "fp32": 60.0}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM5, reported as "H100 80GB HBM3"
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
)


def resolve_device(name: str | None) -> torch.device:
    """`cuda` when available and nothing was asked for, else the CPU; an unavailable CUDA request is an error."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for but torch.cuda.is_available() is False; use --device cpu.")
    return device


def add_run_arguments(parser: argparse.ArgumentParser, output_files: str) -> None:
    """Arguments every benchmark takes: where to run, how many CPU threads, seed, output folder."""
    parser.add_argument("--device", help="cuda or cpu (default: cuda if available).")
    parser.add_argument(
        "--num_threads",
        type=int,
        help="torch CPU threads (default: torch's choice). On a loaded shared CPU, 1 avoids spinning threads.",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help=f"Folder for {output_files}.")


MODEL_OVERRIDES = ("depth", "hidden_size", "num_attention_heads", "encoder_depth")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The SiT preset, size overrides (small test models) and image resolution."""
    parser.add_argument("--preset", default="SiT-XL/2", help="SiT preset: SiT-{S,B,L,XL}/{2,4,8}.")
    parser.add_argument("--depth", type=int, help="Override the preset's number of blocks.")
    parser.add_argument("--hidden_size", type=int, help="Override the preset's width.")
    parser.add_argument("--num_attention_heads", type=int, help="Override the preset's heads.")
    parser.add_argument("--encoder_depth", type=int, help="Override the block whose output is projected.")
    parser.add_argument("--resolution", type=int, default=256, help="Image side in pixels (latent side = /8).")


def model_overrides(args: argparse.Namespace) -> dict[str, int]:
    """The preset sizes overridden on the command line."""
    return {name: getattr(args, name) for name in MODEL_OVERRIDES if getattr(args, name) is not None}


def setup_run(args: argparse.Namespace) -> torch.device:
    """Apply `--num_threads` and return the `--device` to run on."""
    if args.num_threads is not None:
        if args.num_threads < 1:
            raise ValueError(f"--num_threads must be positive, got {args.num_threads}.")
        torch.set_num_threads(args.num_threads)
    return resolve_device(args.device)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model name from /proc/cpuinfo (what `lscpu` prints as "Model name")."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers depend on: device, core count, library versions, date."""
    return {
        "device": device_name(device),
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def peak_tflops(device: torch.device, precision: str) -> tuple[float | None, str]:
    """Dense peak TFLOP/s of `device` for matmuls in `precision`, and what the number is (for the report).

    fp32 uses the TF32 rate when `torch.backends.cuda.matmul.allow_tf32` is on. Unknown GPUs and CPUs give None
    (no MFU is reported then).
    """
    if device.type != "cuda":
        return None, "no peak table for CPUs"
    name = torch.cuda.get_device_name(device)
    key = precision
    if precision == "fp32":
        key = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
    for pattern, rates in PEAK_DENSE_TFLOPS:
        if pattern in name:
            return rates[key], f"{pattern} dense {key}"
    return None, f"{name} is not in PEAK_DENSE_TFLOPS"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """Peak memory in bytes and what it measures.

    CUDA: `torch.cuda.max_memory_allocated` since the last `reset_peak_memory` (tensors only, not the caching
    allocator's reserve). CPU: the process's peak resident set size (`ru_maxrss`), which cannot be reset, so it also
    covers everything the process did before (model construction, other variants).
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS (ru_maxrss)"


def time_blocks(
    step: Callable[[], Any], device: torch.device, *, warmup: int, iterations: int, repeats: int
) -> list[float]:
    """Seconds per call of `step`, one value per timed block of `iterations` calls, after `warmup` calls."""
    if warmup < 0 or iterations < 1 or repeats < 1:
        raise ValueError(f"Need warmup >= 0, iterations >= 1, repeats >= 1; got {warmup}, {iterations}, {repeats}.")
    for _ in range(warmup):
        step()
    synchronize(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iterations):
            step()
        synchronize(device)
        seconds.append((time.perf_counter() - start) / iterations)
    return seconds


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def check_finite_positive(record: dict[str, Any], keys: Sequence[str]) -> None:
    """Fail loudly when a measured number is not a positive finite float (a broken benchmark, not a slow one)."""
    for key in keys:
        value = record[key]
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise RuntimeError(f"Benchmark produced an invalid {key}: {value!r}.")


def model_label(preset: str, overrides: dict[str, int]) -> str:
    """`SiT-XL/2`, or `SiT-S/2 (depth=2, hidden_size=64)` when the preset's sizes were overridden."""
    changes = ", ".join(f"{key}={value}" for key, value in overrides.items())
    return f"{preset} ({changes})" if changes else preset


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A Markdown table of `rows` with (key, header) `columns`; floats are printed with 4 significant digits."""

    def cell(value: Any) -> str:
        if value is None:
            return "–"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(header for _, header in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(key)) for key, _ in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_report(result: dict[str, Any], markdown: str, output: str | os.PathLike | None, stem: str) -> None:
    """Print the Markdown, and write `<stem>.json` / `<stem>.md` into the folder `output` (atomically) if given."""
    print(markdown)
    if output is None:
        return
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(result, indent=2) + "\n"), (".md", markdown + "\n")):
        target = folder / f"{stem}{suffix}"
        staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        staging.write_text(text)
        os.replace(staging, target)

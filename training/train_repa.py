#!/usr/bin/env python
"""Train a SiT with REPA (representation alignment) on a class-conditional image dataset.

    # Offline smoke run on a CPU (synthetic data, tiny RANDOM VAE and encoder), a few minutes:
    python training/train_repa.py --config training/configs/quickstart.yaml

    # The paper's SiT-XL/2 on ImageNet 256×256 (global batch 256, DINOv2-B at block 8, λ = 0.5, 400k steps):
    accelerate launch training/train_repa.py --dataset imagenet-1k

Flags override the values of `--config file.yaml`; `--help` lists them all. A mistake in the flags, the config or
the sources ends the run with one `train_repa.py: error: ...` line (exit status 2); add `--debug` for the traceback.
The logic lives in `diffusers_repa.training` (`REPATrainer`, `REPATrainingArguments`).
"""

import logging
import sys

from diffusers_repa.cli import run_cli


def main(argv: list[str]) -> None:
    # Flags are parsed and checked before the trainer and its data stack are imported: `--help` and most mistakes
    # answer in about a second.
    from diffusers_repa.training import parse_training_args

    args = parse_training_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    from diffusers_repa.training import REPATrainer

    trainer = REPATrainer(args)
    export_dir = trainer.train()
    if trainer.accelerator.is_main_process:
        print(f"Done. Final weights: {export_dir}")


if __name__ == "__main__":
    sys.exit(run_cli(main))

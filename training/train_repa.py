#!/usr/bin/env python
"""Train a SiT with REPA (representation alignment) on a class-conditional image dataset.

    # Offline on a CPU in a few minutes: a pixel-space SiT with REPA on scikit-learn's handwritten digits, aligned to
    # a tiny ViT pretrained on them, evaluated by an independent digit classifier:
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
        if trainer.eval_metrics:
            measured = ", ".join(f"{name} {value:.4g}" for name, value in trainer.eval_metrics.items())
            print(f"EMA samples at step {trainer.global_step}: {measured} ({trainer.evaluation.metric} evaluation).")
        print(f"Done. Final weights: {export_dir}")


if __name__ == "__main__":
    sys.exit(run_cli(main))

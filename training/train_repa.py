#!/usr/bin/env python
"""Train a SiT with REPA (representation alignment) on a class-conditional image dataset.

    # Offline smoke run on a CPU (synthetic data, tiny RANDOM VAE and encoder), a few minutes:
    python training/train_repa.py --config training/configs/quickstart.yaml

    # The paper's SiT-XL/2 on ImageNet 256×256 (global batch 256, DINOv2-B at block 8, λ = 0.5, 400k steps):
    accelerate launch training/train_repa.py --dataset imagenet-1k

Flags override the values of `--config file.yaml`; `--help` lists them all. The logic lives in
`diffusers_repa.training` (`REPATrainer`, `REPATrainingArguments`).
"""

import logging
import sys

from diffusers_repa.training import REPATrainer, SourcesUnreachableError, parse_training_args


def main() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse_training_args()
    try:
        trainer = REPATrainer(args)
    except SourcesUnreachableError as error:
        sys.exit(str(error))
    export_dir = trainer.train()
    if trainer.accelerator.is_main_process:
        print(f"Done. Final weights: {export_dir}")


if __name__ == "__main__":
    main()

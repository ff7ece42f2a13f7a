"""Training SiT with REPA: arguments, the trainer, and its small helpers (EMA, checkpoints, model card)."""

from .arguments import REPATrainingArguments, load_config_file, parse_training_args
from .checkpointing import list_checkpoints, resolve_checkpoint, save_checkpoint
from .ema import EMA
from .hub import push_export_to_hub, render_model_card
from .preflight import SourcesUnreachableError, check_sources_reachable
from .trainer import LORA_TARGET_MODULES, NonFiniteLossError, REPATrainer

__all__ = [
    "EMA",
    "LORA_TARGET_MODULES",
    "NonFiniteLossError",
    "REPATrainer",
    "REPATrainingArguments",
    "SourcesUnreachableError",
    "check_sources_reachable",
    "list_checkpoints",
    "load_config_file",
    "parse_training_args",
    "push_export_to_hub",
    "render_model_card",
    "resolve_checkpoint",
    "save_checkpoint",
]

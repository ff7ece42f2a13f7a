"""Training SiT with REPA: arguments, the trainer, and its small helpers (EMA, checkpoints, model card).

Exports are lazy: ``from diffusers_repa.training.ema import EMA`` does not import the trainer and its data stack.
"""

from .._lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "arguments": ["REPATrainingArguments", "load_config_file", "parse_training_args"],
        "checkpointing": ["list_checkpoints", "resolve_checkpoint", "save_checkpoint"],
        "ema": ["create_ema"],
        "model_setup": ["LORA_TARGET_MODULES", "build_model", "build_optimizer"],
        "objectives": ["DDPMObjective", "Objective", "REPAFlowObjective"],
        "step": ["NonFiniteLossError", "StepOutput", "TrainingStep"],
        "hub": ["find_local_paths", "is_local_path", "push_export_to_hub", "remove_local_paths", "render_model_card"],
        "preflight": ["SourcesUnreachableError", "check_sources_reachable"],
        "run_lock": ["OutputDirInUseError", "RunLock", "acquire_run_lock"],
        "stop_signals": ["StopSignals", "TrainingInterrupted"],
        "trainer": ["REPATrainer"],
    },
)

"""Which settings of a run a resume may change, and the check that a resumed run is the same experiment.

A checkpoint records every setting that changes what is trained. Resuming with another value would silently mix
two experiments (or be ignored: the optimizer's saved state wins over a new learning rate), so a resume compares
them and refuses with the list of differences. Settings that can be applied to a running experiment (learning
rate, AdamW's hyper-parameters, clipping, EMA decay, λ …) change only when the user names them in
`--resume_with_changes`; the change is then applied (e.g. written into the optimizer's param groups) and recorded
in the checkpoints' history. The rest (architecture, objective, data, seed) can never change mid-run.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .arguments import REPATrainingArguments

# Settings that change nothing a run computes: where it writes, how often it logs, samples, evaluates or saves, how
# many steps it runs, how it loads data, and speed-only switches.
NEUTRAL_SETTINGS = frozenset(
    {
        "output_dir", "config", "report_to", "tracker_project_name", "logging_dir", "logging_steps",
        "validation_steps", "num_validation_images", "validation_sampler", "validation_inference_steps",
        "validation_guidance_scale", "checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint",
        "resume_with_changes", "push_to_hub", "hub_model_id", "hub_private_repo", "max_train_steps",
        "dataloader_num_workers", "cache_dir", "compile", "gradient_checkpointing", "allow_tf32", "eval_steps",
        "eval_metric", "eval_num_samples", "eval_num_reference", "eval_inference_steps", "eval_guidance_scale",
        "validation_prompts",
    }
)  # fmt: skip
# Settings a resumed run may change on purpose (`--resume_with_changes`); every other one is fixed for the run.
APPLICABLE_SETTINGS = frozenset(
    {
        "learning_rate", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon", "max_grad_norm",
        "ema_decay", "ema_warmup_power", "proj_coeff", "alignment_stop_step", "max_nonfinite_steps",
        "mixed_precision", "encoder_precision",
    }
)  # fmt: skip


def result_settings(args: REPATrainingArguments) -> dict[str, Any]:
    """The settings that change what a run computes (all arguments but the neutral ones), JSON-able."""
    return {name: value for name, value in dataclasses.asdict(args).items() if name not in NEUTRAL_SETTINGS}


def check_resume_settings(
    saved: dict[str, Any], current: dict[str, Any], allowed: set[str], checkpoint: str
) -> dict[str, tuple[Any, Any]]:
    """Compare the checkpoint's settings with this run's; return the changes to apply ({name: (saved, now)}).

    Raises:
        ValueError: a setting differs that is not in `allowed`, or can never change mid-run; the message lists
            every difference and the fix.
    """
    unknown = allowed - APPLICABLE_SETTINGS
    if unknown:
        raise ValueError(
            f"--resume_with_changes names {', '.join(sorted(unknown))}, which cannot change mid-run; it accepts "
            f"{', '.join(sorted(APPLICABLE_SETTINGS))}."
        )
    changed = {
        name: (saved.get(name), value)
        for name, value in current.items()
        if name in saved and _comparable(saved[name]) != _comparable(value)
    }
    fixed = {name: values for name, values in changed.items() if name not in APPLICABLE_SETTINGS}
    unasked = {name: values for name, values in changed.items() if name in APPLICABLE_SETTINGS - allowed}
    if fixed or unasked:
        lines = [
            f"--{name}: {old!r} in the checkpoint, {new!r} now" for name, (old, new) in {**fixed, **unasked}.items()
        ]
        advice = []
        if unasked:
            advice.append(f"to apply a change on purpose, pass --resume_with_changes {','.join(sorted(unasked))}")
        if fixed:
            advice.append(
                f"{', '.join('--' + name for name in sorted(fixed))} cannot change mid-run (it would mix two "
                "experiments): start a new --output_dir"
            )
        raise ValueError(
            f"{checkpoint} was trained with other settings: {'; '.join(lines)}. Resume with the checkpoint's values, "
            f"or {' and '.join(advice)}."
        )
    return changed


def _comparable(value: Any) -> Any:
    # JSON turns tuples into lists and keeps ints and floats apart: 1e-4 saved and 0.0001 now are the same value.
    if isinstance(value, (list, tuple)):
        return [_comparable(item) for item in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value

"""The training step, the one place where an optimizer step happens (the trainer and the benchmarks call it):

    for each of the accumulation steps' micro-batches:
        loss = objective(model, batch, generator, step)        e.g. velocity MSE + λ · REPA alignment
        backward
    clip the global grad norm → if the loss was finite on every process: optimizer step → EMA update

A NaN/Inf loss leaves weights, optimizer state and EMA untouched; `max_nonfinite_steps` such steps in a row stop
the run. The finiteness check is the step's one device→host sync: it comes after backward and clipping have been
queued, so the device still has work while the host waits. Under DeepSpeed the engine updates the weights inside
`backward`, so there the check runs before each backward and a non-finite loss stops the run at once (nothing can
be skipped after the fact).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType
from diffusers.training_utils import EMAModel
from torch import nn

from .objectives import Objective

logger = get_logger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss was NaN or infinite for `--max_nonfinite_steps` optimizer steps in a row."""


@dataclass
class StepOutput:
    """What one optimizer step measured (device tensors: reading them syncs).

    Attributes:
        losses: (3,) loss, mean denoising loss, projection loss, each the mean over the micro-batches.
        grad_norm: global gradient norm before clipping (None where the engine does not report it, e.g. DeepSpeed).
        updated: whether the weights were updated (False: a non-finite loss, or fp16's scaler skipped the step).
    """

    losses: torch.Tensor
    grad_norm: torch.Tensor | None
    updated: bool


class TrainingStep:
    """One optimizer step of `model` on `objective`: see the module docstring.

    Args:
        accelerator: runs backward (loss scaling, engines), accumulation, clipping and the cross-process reductions.
        model: the prepared model. objective: the loss of a micro-batch ([`Objective`]).
        optimizer: the prepared optimizer, over the model's trainable parameters.
        ema: the EMA of those parameters (None: no EMA).
        generator: the process's noise generator, handed to the objective.
        max_grad_norm: clip the global gradient norm to this.
        max_nonfinite_steps: stop after this many non-finite steps in a row.
        autocast: the mixed-precision context of the forward pass (default: the accelerator's).

    Attributes:
        nonfinite_streak / num_nonfinite_steps: non-finite steps in a row now / in all.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        model: nn.Module,
        objective: Objective,
        optimizer: torch.optim.Optimizer,
        ema: EMAModel | None,
        generator: torch.Generator,
        *,
        max_grad_norm: float = 1.0,
        max_nonfinite_steps: int = 10,
        autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    ):
        self.accelerator = accelerator
        self.model = model
        self.objective = objective
        self.optimizer = optimizer
        self.ema = ema
        self.generator = generator
        self.max_grad_norm = max_grad_norm
        self.max_nonfinite_steps = max_nonfinite_steps
        self.autocast = autocast or accelerator.autocast
        self.trainable_params = [param for param in model.parameters() if param.requires_grad]
        self.nonfinite_streak = 0
        self.num_nonfinite_steps = 0
        self._engine_steps_in_backward = accelerator.distributed_type == DistributedType.DEEPSPEED

    def __call__(self, micro_batches: Iterable[dict[str, torch.Tensor]], step: int) -> StepOutput:
        """Run optimizer step `step` (0-based) on the next `gradient_accumulation_steps` micro-batches."""
        accelerator = self.accelerator
        accumulation = accelerator.gradient_accumulation_steps
        losses = torch.zeros(3, device=accelerator.device)
        for batch in itertools.islice(micro_batches, accumulation):
            with accelerator.accumulate(self.model):
                with self.autocast():
                    output = self.objective(self.model, batch, self.generator, step)
                if self._engine_steps_in_backward and not self._all_processes_finite(output.loss):
                    self._count_nonfinite(step, can_skip=False)
                accelerator.backward(output.loss)
            terms = torch.stack([output.loss, output.denoising_loss.mean(), output.projection_loss])
            losses += terms.detach().float() / accumulation
        grad_norm = accelerator.clip_grad_norm_(self.trainable_params, self.max_grad_norm)
        updated = False
        if self._engine_steps_in_backward or self._all_processes_finite(losses[0]):
            self.optimizer.step()
            updated = not accelerator.optimizer_step_was_skipped  # fp16: the scaler skips overflowing steps
            if updated and self.ema is not None:
                self.ema.step(self.trainable_params)
            self.nonfinite_streak = 0
        else:
            self._count_nonfinite(step, can_skip=True)
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutput(losses, grad_norm, updated)

    def _all_processes_finite(self, loss: torch.Tensor) -> bool:
        """Whether `loss` is finite on every process: every process takes the same decision, which keeps the
        replicas identical (a NaN on one process reached all gradients through the all-reduce anyway)."""
        nonfinite = (~torch.isfinite(loss)).float()
        return self.accelerator.reduce(nonfinite, reduction="sum").item() == 0

    def _count_nonfinite(self, step: int, can_skip: bool) -> None:
        """Leave weights, optimizer state and EMA untouched; stop after `max_nonfinite_steps` such steps in a row."""
        self.nonfinite_streak += 1
        self.num_nonfinite_steps += 1
        if not can_skip:
            raise NonFiniteLossError(
                f"Step {step + 1}: the loss is NaN or infinite, and under DeepSpeed the engine updates the weights "
                "inside backward, so the step cannot be skipped; stopping before it. Resume from the last "
                "checkpoint with --resume_from_checkpoint latest, with a lower --learning_rate or bf16."
            )
        logger.warning(
            f"Step {step + 1}: the loss is NaN or infinite; the update is skipped ({self.nonfinite_streak} in a row).",
            main_process_only=True,
        )
        if self.accelerator.scaler is not None:
            # clip_grad_norm_ unscaled the fp16 gradients; update() closes that step and lowers the loss scale.
            self.accelerator.scaler.update()
        if self.nonfinite_streak >= self.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"The loss was NaN or infinite for {self.nonfinite_streak} optimizer steps in a row (steps "
                f"{step + 2 - self.nonfinite_streak}–{step + 1}); stopping. The weights are those of step "
                f"{step + 1 - self.nonfinite_streak}. Try a lower --learning_rate, --mixed_precision bf16 or no, or "
                f"check the data; resume from the last checkpoint with --resume_from_checkpoint latest."
            )

"""Stopping a run cleanly: SIGTERM (a preempted cloud job) or SIGINT (Ctrl-C) during training only set a flag, so
that the loop can checkpoint the step in progress before it exits; a second signal stops at once."""

from __future__ import annotations

import contextlib
import logging
import signal
from types import FrameType

import torch
from accelerate import Accelerator

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(SystemExit):
    """A stop signal ended the run after a checkpoint of its last step; exit status 128 + the signal's number."""


class StopSignals:
    """While entered, SIGTERM and SIGINT set `received` instead of ending the process (handlers restored on exit).

    Signal handlers can only be installed from the main thread; elsewhere the default handling stays.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        for signum in STOP_SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:  # the second one: stop now, without the checkpoint
            raise KeyboardInterrupt
        self.received = signum
        logger.warning(
            f"Received {signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
            "(send it again to stop at once)."
        )

    def requested(self, accelerator: Accelerator) -> bool:
        """Whether any process got a stop signal. With several processes they all take the same decision, at the
        cost of one small all-reduce per call (a signal may reach only some of them)."""
        if accelerator.num_processes > 1:
            flag = torch.tensor(float(self.received is not None), device=accelerator.device)
            if accelerator.reduce(flag, reduction="sum").item() > 0 and self.received is None:
                self.received = signal.SIGTERM  # another process was told to stop
        return self.received is not None

    def exit(self, step: int) -> None:
        """Raise `TrainingInterrupted` for the signal received (call once the step's checkpoint is written)."""
        name = signal.Signals(self.received).name
        logger.warning(f"Stopped by {name} at step {step}; resume with --resume_from_checkpoint latest.")
        raise TrainingInterrupted(128 + int(self.received))

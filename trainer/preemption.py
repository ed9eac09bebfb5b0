"""Preemption: SIGTERM/SIGINT ask the loop to finish its step, checkpoint and exit; a second signal exits at once.

The handler only sets a flag. The loop reads it after each optimizer update and, on more than one
process, all processes agree on it with one all-reduce (`should_stop`), so every rank stops after
the same update and writes the same checkpoint. Exit codes follow the shell's 128 + signal
convention (143 for SIGTERM, 130 for SIGINT), so schedulers see "stopped by a signal" and requeue.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch

EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}
# `accelerate launch` (torchrun) forwards the signal it gets to its workers, and Ctrl-C reaches every
# process of the terminal's group: the same request can arrive twice within milliseconds. Signals
# this close to the first one are the same request, not a second one.
SAME_REQUEST_S = 2.0


class Preempted(Exception):
    """The run stopped on a signal after writing a checkpoint of update `total_step`, the last one this
    process trained; `exit_code` is 128 + the signal."""

    def __init__(self, signum: int, checkpoint, total_step: int) -> None:
        self.signum, self.checkpoint, self.total_step = signum, checkpoint, total_step
        self.exit_code = EXIT_CODES.get(signal.Signals(signum), 128 + signum)
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after update {total_step}, writing {checkpoint}; "
            "continue with --resume auto (same --run-dir)"
        )


class StopSignals:
    """Installs the handlers in the main thread; `requested` is the first signal's number or 0."""

    def __init__(self) -> None:
        self.requested = 0
        self.first_at_s = 0.0
        self._previous: dict[int, object] = {}

    def install(self) -> StopSignals:
        for signum in EXIT_CODES:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, _frame) -> None:
        now = time.monotonic()
        if not self.requested:
            self.requested, self.first_at_s = signum, now
            print(f"\n{signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
                  "(send it again to exit at once)", file=sys.stderr, flush=True)
            return
        if now - self.first_at_s < SAME_REQUEST_S:
            return
        # A second request: leave now. Checkpoints are written under a temporary name and renamed,
        # so whatever was being written is either complete or ignored on resume.
        print(f"{signal.Signals(signum).name} again: exiting without a checkpoint", file=sys.stderr, flush=True)
        os._exit(EXIT_CODES.get(signal.Signals(self.requested), 128 + self.requested))

    def should_stop(self, accelerator) -> int:
        """The signal to stop on, agreed by all processes (0 = go on): a signal reaches ranks at
        slightly different steps."""
        return agreed_max(accelerator, [self.requested])[0]


def agreed_max(accelerator, values: list[int]) -> list[int]:
    """Each value's maximum over all processes (one small all-reduce; none on one process), so a
    rank that saw no signal or no bad loss acts on what another rank saw, and all act alike."""
    if accelerator.num_processes == 1:
        return values
    flags = torch.tensor(values, dtype=torch.int64, device=accelerator.device)
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return flags.tolist()

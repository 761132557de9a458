"""What keeps a run safe from the outside world: preemption (SIGTERM -> save and exit)
and non-finite steps (skipped, logged, and a stop after too many in a row)."""

from __future__ import annotations

import logging
import signal

import jax
import numpy as np

from mtop_jax.errors import MtopError
from mtop_jax.training.metric_writers import MetricWriter

log = logging.getLogger("mtop_jax.train")


class Preemption:
    """SIGTERM (a preempted TPU VM, a cluster's kill) -> save and exit cleanly.

    One process: a Python SIGTERM handler raises a flag. Several processes: JAX's
    preemption service (started by ``jax.distributed.initialize``) catches SIGTERM on
    any of them, and ``reached_preemption_sync_point`` turns true at the same step on
    all, so they save together; a Python handler would hide the signal from it.
    """

    def __init__(self):
        self.requested = False
        self.multihost = jax.process_count() > 1
        self._previous = (None if self.multihost
                          else signal.signal(signal.SIGTERM, self._handle))

    def _handle(self, signum, frame):
        self.requested = True

    def check(self, step: int) -> bool:
        if self.multihost and not self.requested:
            from jax.experimental import multihost_utils

            self.requested = multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class NonFiniteGuard:
    """Watches each step's ``finite`` flag (the step itself already skipped the update).

    Every non-finite step is logged with its batch: the data iterator position before
    it and the example rows, to a warning and a ``nonfinite`` record of metrics.jsonl.
    After ``limit`` in a row, training stops with :class:`MtopError`. Flags are read one
    step late, so checking does not stall the device queue.
    """

    def __init__(self, limit: int, writer: MetricWriter, run: int = 0):
        self.limit, self.writer = int(limit), writer
        self.run = int(run)  # non-finite steps in a row, as of the last step checked
        self.pending: tuple | None = None

    def push(self, step: int, position: dict, rows: np.ndarray, metrics: dict) -> None:
        self.pending = (step, position, rows, metrics["nonfinite_run"], metrics["loss"])

    def check_pending(self, last_checkpoint) -> None:
        if self.pending is None:
            return
        step, position, rows, run, loss = self.pending
        self.pending = None
        self.run = int(jax.device_get(run))  # the step's own count (state.nonfinite_run)
        if self.run == 0:
            return
        rows = [int(r) for r in np.asarray(rows) if r >= 0]
        where = (f"batch {position.get('step')} of the data iterator (epochs "
                 f"{position.get('epochs')}, cursors {position.get('cursors')})")
        log.warning("step %d: loss %s is not finite; update skipped; %s, train rows %s%s",
                    step, float(jax.device_get(loss)), where, rows[:16],
                    " ..." if len(rows) > 16 else "")
        self.writer.write_event(step, "nonfinite", {
            "loss": repr(float(jax.device_get(loss))), "in_a_row": self.run,
            "data_position": position, "train_rows": rows})
        if self.run >= self.limit:
            raise MtopError(
                f"step {step}: the loss was not finite for {self.run} steps in a row "
                f"(steps {step - self.run + 1}-{step}; those updates were skipped, "
                f"train.max_nonfinite_steps={self.limit}); stopping. The last good "
                f"checkpoint is step {last_checkpoint()}; the batches are in metrics.jsonl "
                "('nonfinite' records)")

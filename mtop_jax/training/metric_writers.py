"""Metrics to ``metrics.jsonl`` (one JSON object a line) and TensorBoard event
files, from process 0 only. On gs:// the JSONL object is rewritten whole (object
stores cannot append), so lines are buffered and written at most every
``flush_seconds``, at every checkpoint (``flush``) and at ``close``: one upload
a log line made a long run's metrics cost quadratic time and a request a step.
TensorBoard files are written only where tensorboardX can reach the bucket
(google-cloud-storage installed)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import jax

from mtop_jax.errors import MtopError
from mtop_jax.files import as_path, is_remote

log = logging.getLogger(__name__)


class MetricWriter:
    def __init__(self, workdir: str | Path, flush_seconds: float = 30.0):
        self.active = jax.process_index() == 0
        self.flush_seconds = float(flush_seconds)
        self._flushed_at = time.monotonic()
        self._dirty = False  # remote lines not yet uploaded
        self.workdir = as_path(workdir)
        self.remote = is_remote(workdir)
        self._tb = None
        self._tb_warned = False  # one warning per writer about TensorBoard, at most
        self._jsonl = None
        self._lines: list[str] = []
        if self.active:
            self.workdir.mkdir(parents=True, exist_ok=True)
            path = self.workdir / "metrics.jsonl"
            if self.remote:
                self._lines = path.read_text().splitlines(keepends=True) if path.exists() else []
            else:
                self._jsonl = open(path, "a", buffering=1)  # noqa: SIM115
            from tensorboardX import SummaryWriter  # a dependency: a missing one is an error

            try:
                self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
            except Exception as e:  # a convenience (JSONL is the record): never fatal
                self._warn_tensorboard("no TensorBoard files", e)
                self._tb = None

    def write(self, step: int, scalars: dict[str, Any], kind: str = "train") -> None:
        if not self.active:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        self._append(json.dumps({"step": int(step), "kind": kind, **clean}) + "\n")
        if self._tb is not None:
            try:
                for k, v in clean.items():
                    self._tb.add_scalar(f"{kind}/{k}", v, int(step))
            except Exception as e:  # a full disk, an unreachable bucket: never fatal
                self._drop_tensorboard(e)

    def write_event(self, step: int, kind: str, record: dict[str, Any]) -> None:
        """A JSON record (any JSON values, not only scalars) to metrics.jsonl only."""
        if self.active:
            self._append(json.dumps({"step": int(step), "kind": kind, **record}) + "\n")

    def _append(self, line: str) -> None:
        path = self.workdir / "metrics.jsonl"
        try:
            if self.remote:
                self._lines.append(line)
                self._dirty = True
                if time.monotonic() - self._flushed_at >= self.flush_seconds:
                    self.flush()
            else:
                self._jsonl.write(line)
        except OSError as e:  # a full disk: name the file, no traceback
            raise MtopError(f"{path}: cannot write metrics ({e.strerror or e})") from e

    def flush(self) -> None:
        """Upload the buffered lines (remote workdirs; a local file is line-buffered).
        The loop calls it after each checkpoint, so a preemption loses no metrics
        from before the step it resumes at."""
        if not (self.active and self.remote and self._dirty):
            return
        path = self.workdir / "metrics.jsonl"
        try:
            path.write_text("".join(self._lines))
        except OSError as e:
            raise MtopError(f"{path}: cannot write metrics ({e.strerror or e})") from e
        self._dirty = False
        self._flushed_at = time.monotonic()

    def _drop_tensorboard(self, error: Exception) -> None:
        """TensorBoard is a convenience: on a write error (a full disk) stop writing it,
        and stop tensorboardX from flushing again at exit (a traceback then)."""
        self._warn_tensorboard("TensorBoard files stopped", error)
        for writer in list((getattr(self._tb, "all_writers", None) or {}).values()):
            event_writer = getattr(writer, "event_writer", None)
            if event_writer is not None:
                event_writer._closed = True
        self._tb = None

    def _warn_tensorboard(self, what: str, error: Exception) -> None:
        if not self._tb_warned:
            self._tb_warned = True
            log.warning("%s in %s (%s); metrics go on to metrics.jsonl only", what,
                        self.workdir / "tensorboard", error)

    def close(self) -> None:
        if not self.active:
            return
        self.flush()
        if self._jsonl is not None and not self._jsonl.closed:
            try:
                self._jsonl.close()
            except OSError as e:
                log.warning("metrics.jsonl: %s", e)
        if self._tb is not None:
            try:
                self._tb.close()
            except Exception as e:
                self._drop_tensorboard(e)

"""Metrics to ``metrics.jsonl`` (one JSON object a line) and TensorBoard event
files, from process 0 only.

On gs:// an object cannot be appended to: every upload rewrites it whole. So the
JSONL lines are buffered and uploaded at most every ``flush_seconds``, at every
checkpoint (``flush``) and at ``close``; one upload a log line made a long run's
metrics cost quadratic time and a request a step. TensorBoard events go to
``gs://.../tensorboard/events.out.tfevents.*`` through tensorboardX's own GCS
writer (google-cloud-storage, the ``gcs`` extra), which keeps the event file in
memory and re-uploads it whole: at most every ``flush_seconds`` (tensorboardX's
``flush_secs``), at ``flush`` and at ``close``, and only when it has changed.
Without google-cloud-storage a gs:// run warns once and writes JSONL only.
Tested against a fake ``google.cloud.storage`` and a local stand-in for GCS,
never a real bucket."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import jax

from mtop_jax.errors import MtopError
from mtop_jax.files import as_path, is_remote

log = logging.getLogger(__name__)

GCS_FIX = "pip install 'mtop-jax[gcs]' (launch/remote_setup.sh does)"


def tensorboard_dir(workdir: str | os.PathLike) -> str:
    """The event files' directory as tensorboardX wants it: a ``gs://bucket/path``
    URL stays one (tensorboardX picks its GCS writer by the ``gs`` prefix; pathlib
    would turn it into ``gs:/bucket``, a local directory)."""
    workdir = str(workdir)
    if is_remote(workdir):
        return workdir.rstrip("/") + "/tensorboard"
    return os.path.join(workdir, "tensorboard")


def _gcs_writer_factory():
    """tensorboardX's GCS event writer, with two changes. It skips uploads that
    change nothing: each re-uploads the whole object, GCS takes about one write a
    second to one object, and tensorboardX's ``close`` alone flushes four times
    (``__del__`` once more). And a failed upload warns instead of raising: raised in
    tensorboardX's writer thread it ends that thread, and training then blocks
    forever on the thread's full queue."""
    from tensorboardX import record_writer

    class EventObject(record_writer.GCSRecordWriter):
        _uploaded = -1  # bytes in the object after the last upload
        _warned = False

        def flush(self) -> None:
            size = self.buffer.getbuffer().nbytes
            if size == self._uploaded:
                return
            try:
                super().flush()
            except Exception as e:
                if not self._warned:
                    self._warned = True
                    log.warning("%s: TensorBoard upload failed (%s); retried at each flush, "
                                "further failures not logged", self.path, e)
                # The next upload goes without the generation precondition: this one
                # may have landed although it failed here (a lost response).
                self.blob = record_writer.storage.Blob(self.blob.name, self.blob.bucket)
                return
            self._uploaded = size

    class Factory(record_writer.GCSRecordWriterFactory):
        def open(self, path):
            return EventObject(path)

    return Factory()


class MetricWriter:
    def __init__(self, workdir: str | Path, flush_seconds: float = 30.0):
        self.active = jax.process_index() == 0
        self.flush_seconds = float(flush_seconds)
        self._flushed_at = time.monotonic()
        self._dirty = False  # remote lines not yet uploaded
        self.workdir = as_path(workdir)
        self.remote = is_remote(workdir)
        self.tensorboard_dir = tensorboard_dir(workdir)
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
            self._tb = self._open_tensorboard()

    def _open_tensorboard(self):
        # a dependency: a missing one is an error
        from tensorboardX import SummaryWriter, record_writer

        logdir = self.tensorboard_dir
        if logdir.startswith("gs://"):
            if not record_writer.GCS_ENABLED:  # tensorboardX's own test for the client
                self._warn_tensorboard(
                    "no TensorBoard files", f"google-cloud-storage is not installed: {GCS_FIX}")
                return None
            record_writer.register_writer_factory("gs", _gcs_writer_factory())
        try:
            # Each flush of a gs:// event file rewrites the object whole, and GCS takes
            # about one write a second to one object: flush on the JSONL's cadence (30 s
            # by default; tensorboardX's 120 s would lose two minutes to a preemption),
            # never more often than every second, and at every checkpoint (flush()).
            return SummaryWriter(logdir, flush_secs=max(self.flush_seconds, 1.0))
        except Exception as e:  # a convenience (JSONL is the record): never fatal
            self._warn_tensorboard("no TensorBoard files", e)
            return None

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
                    self._upload_jsonl()
            else:
                self._jsonl.write(line)
        except OSError as e:  # a full disk: name the file, no traceback
            raise MtopError(f"{path}: cannot write metrics ({e.strerror or e})") from e

    def flush(self) -> None:
        """Upload the buffered JSONL lines (remote workdirs; a local file is
        line-buffered) and the TensorBoard events. The loop calls it after each
        checkpoint, so a preemption loses no metrics from before the step it
        resumes at."""
        if not self.active:
            return
        self._upload_jsonl()
        if self._tb is not None:
            try:
                self._tb.flush()
            except Exception as e:
                self._drop_tensorboard(e)

    def _upload_jsonl(self) -> None:
        if not (self.remote and self._dirty):
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

    def _warn_tensorboard(self, what: str, error: Exception | str) -> None:
        if not self._tb_warned:
            self._tb_warned = True
            log.warning("%s in %s (%s); metrics go on to metrics.jsonl only", what,
                        self.tensorboard_dir, error)

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

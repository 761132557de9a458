"""Metrics to ``metrics.jsonl`` (one JSON object a line) and TensorBoard event
files, from process 0 only. On gs:// the JSONL object is rewritten whole at
every write (object stores cannot append), and TensorBoard files are written
only where tensorboardX can reach the bucket (google-cloud-storage installed)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax

from mtop_jax.files import as_path, is_remote


class MetricWriter:
    def __init__(self, workdir: str | Path):
        self.active = jax.process_index() == 0
        self.workdir = as_path(workdir)
        self.remote = is_remote(workdir)
        self._tb = None
        self._jsonl = None
        self._lines: list[str] = []
        if self.active:
            self.workdir.mkdir(parents=True, exist_ok=True)
            path = self.workdir / "metrics.jsonl"
            if self.remote:
                self._lines = path.read_text().splitlines(keepends=True) if path.exists() else []
            else:
                self._jsonl = open(path, "a", buffering=1)  # noqa: SIM115
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
            except Exception as e:  # a convenience (JSONL is the record): never fatal
                if not isinstance(e, ImportError):
                    logging.getLogger(__name__).warning("no TensorBoard files: %s", e)
                self._tb = None

    def write(self, step: int, scalars: dict[str, Any], kind: str = "train") -> None:
        if not self.active:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        line = json.dumps({"step": int(step), "kind": kind, **clean}) + "\n"
        if self.remote:
            self._lines.append(line)
            (self.workdir / "metrics.jsonl").write_text("".join(self._lines))
        else:
            self._jsonl.write(line)
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(f"{kind}/{k}", v, int(step))

    def close(self) -> None:
        if self.active:
            if self._jsonl is not None:
                self._jsonl.close()
            if self._tb is not None:
                self._tb.close()

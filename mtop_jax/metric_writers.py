"""Metrics to ``metrics.jsonl`` (one JSON object a line) and TensorBoard event
files, from process 0 only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax


class MetricWriter:
    def __init__(self, workdir: str | Path):
        self.active = jax.process_index() == 0
        self.workdir = Path(workdir)
        self._tb = None
        if self.active:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.workdir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
            except ImportError:  # TensorBoard files are a convenience, JSONL the record
                self._tb = None

    def write(self, step: int, scalars: dict[str, Any], kind: str = "train") -> None:
        if not self.active:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), "kind": kind, **clean}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(f"{kind}/{k}", v, int(step))

    def close(self) -> None:
        if self.active:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()

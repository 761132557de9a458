"""Buffered metrics.jsonl on remote workdirs: an object store cannot append, so every
upload rewrites the object; it happens at most every flush_seconds, at flush() (after each
checkpoint) and at close(), not at every line."""

from __future__ import annotations

import json

from mtop_jax.training import metric_writers
from mtop_jax.training.metric_writers import MetricWriter


def steps(path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_remote_metrics_are_buffered_and_flushed(tmp_path, monkeypatch):
    monkeypatch.setattr(metric_writers, "is_remote", lambda workdir: True)  # "gs://" here
    uploads = []
    real_write_text = type(tmp_path / "x").write_text
    clock = [1000.0]
    monkeypatch.setattr(metric_writers.time, "monotonic", lambda: clock[0])
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "kind": "train", "loss": 2.0}) + "\n")  # resumed

    writer = MetricWriter(tmp_path, flush_seconds=30)
    monkeypatch.setattr(type(writer.workdir / "metrics.jsonl"), "write_text",
                        lambda self, text, *a, **k: uploads.append(text) or
                        real_write_text(self, text, *a, **k), raising=True)
    for step in (2, 3, 4):
        writer.write(step, {"loss": 1.0})
    assert uploads == [] and steps(path) == [1]  # nothing uploaded yet
    clock[0] += 30
    writer.write(5, {"loss": 1.0})  # 30 s since the last upload: this one goes out
    assert len(uploads) == 1 and steps(path) == [1, 2, 3, 4, 5]
    writer.write_event(6, "nonfinite", {"rows": [1, 2]})
    writer.flush()  # a checkpoint
    writer.flush()  # nothing new: no upload
    assert len(uploads) == 2 and steps(path) == [1, 2, 3, 4, 5, 6]
    writer.write(7, {"loss": 0.5})
    writer.close()
    assert len(uploads) == 3 and steps(path) == [1, 2, 3, 4, 5, 6, 7]


def test_local_metrics_are_written_at_once(tmp_path):
    writer = MetricWriter(tmp_path, flush_seconds=3600)
    writer.write(1, {"loss": 1.0})
    assert steps(tmp_path / "metrics.jsonl") == [1]  # line-buffered file, no waiting
    writer.flush()
    writer.close()

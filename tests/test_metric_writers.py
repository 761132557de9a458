"""Buffered metrics.jsonl on remote workdirs: an object store cannot append, so every
upload rewrites the object; it happens at most every flush_seconds, at flush() (after each
checkpoint) and at close(), not at every line. TensorBoard event files on gs:// go through
tensorboardX's GCS writer, here with a fake google.cloud.storage (never a real bucket)."""

from __future__ import annotations

import email.parser
import email.policy
import json
import logging
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from tensorboardX import record_writer
from tensorboardX.proto.event_pb2 import Event

from mtop_jax.training import metric_writers
from mtop_jax.training.metric_writers import MetricWriter, tensorboard_dir


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


# ---------------------------------------------------------------------- TensorBoard on gs://


class FakeStorage:
    """The part of google.cloud.storage tensorboardX's GCSRecordWriter uses; every upload
    is recorded, and generation preconditions are checked as GCS checks them."""

    def __init__(self):
        self.objects: dict[str, bytes] = {}  # "bucket/path" -> bytes
        self.generations: dict[str, int] = {}
        self.uploads: list[str] = []
        self.fail_next = 0  # uploads that land but answer with an error (a lost response)
        self.opened = []  # the event writers, to see what tensorboardX's thread has written
        storage = self

        class Blob:
            def __init__(self, name, bucket):
                self.name, self.bucket, self.generation = name, bucket, None

            def upload_from_string(self, data, if_generation_match=None):
                key = f"{self.bucket}/{self.name}"
                if if_generation_match is not None and \
                        if_generation_match != storage.generations.get(key):
                    raise RuntimeError("412 Precondition Failed")
                storage.objects[key] = bytes(data)
                storage.generations[key] = storage.generations.get(key, 0) + 1
                storage.uploads.append(key)
                if storage.fail_next:  # the blob never hears of its new generation
                    storage.fail_next -= 1
                    raise ConnectionError("connection reset")
                self.generation = storage.generations[key]

        self.Blob = Blob
        self.Client = lambda: object()
        self.Bucket = lambda client, name: name


@pytest.fixture
def gcs(tmp_path, monkeypatch) -> FakeStorage:
    """gs://bucket/... workdirs: metrics.jsonl under tmp_path/bucket/..., TensorBoard
    events into a FakeStorage through tensorboardX's own gs:// writer."""
    fake = FakeStorage()
    monkeypatch.setattr(record_writer, "storage", fake, raising=False)
    monkeypatch.setattr(record_writer, "GCS_ENABLED", True)
    monkeypatch.setitem(record_writer.REGISTERED_FACTORIES, "gs",
                        record_writer.REGISTERED_FACTORIES["gs"])  # restored after the test
    monkeypatch.setattr(metric_writers, "as_path",
                        lambda workdir: tmp_path / str(workdir).removeprefix("gs://"))
    real_factory = metric_writers._gcs_writer_factory

    def recording_factory():
        factory = real_factory()
        open_ = factory.open
        factory.open = lambda path: fake.opened.append(open_(path)) or fake.opened[-1]
        return factory

    monkeypatch.setattr(metric_writers, "_gcs_writer_factory", recording_factory)
    return fake


def tf_records(data: bytes) -> list[Event]:
    """The TFRecord framing tensorboardX writes: length, its CRC, the bytes, their CRC."""
    events, at = [], 0
    while at < len(data):
        header = data[at:at + 8]
        (length,) = struct.unpack("Q", header)
        assert struct.unpack("I", data[at + 8:at + 12])[0] == record_writer.masked_crc32c(header)
        body = data[at + 12:at + 12 + length]
        assert struct.unpack("I", data[at + 12 + length:at + 16 + length])[0] == \
            record_writer.masked_crc32c(body)
        events.append(Event.FromString(body))
        at += 16 + length
    return events


def scalars(data: bytes) -> list[tuple[int, str, float]]:
    return sorted((e.step, v.tag, v.simple_value)
                  for e in tf_records(data) for v in e.summary.value)


def f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]  # TensorBoard's simple_value


def test_tensorboard_dir_keeps_gs_urls():
    from etils import epath

    assert tensorboard_dir("gs://b/runs/x/") == "gs://b/runs/x/tensorboard"
    assert tensorboard_dir(epath.Path("gs://b/runs/x")) == "gs://b/runs/x/tensorboard"
    assert tensorboard_dir(Path("/tmp/runs/x")) == "/tmp/runs/x/tensorboard"


def test_tensorboard_events_go_to_the_bucket_rate_limited(gcs, tmp_path):
    writer = MetricWriter("gs://bucket/runs/x", flush_seconds=30)
    assert writer._tb.logdir == "gs://bucket/runs/x/tensorboard"
    assert writer._tb._flush_secs == 30  # tensorboardX's writer thread: one upload a 30 s
    written = []
    for step in range(1, 51):
        writer.write(step, {"loss": 1.0 / step, "acc": step / 100})
        written += [(step, "train/acc", f32(step / 100)), (step, "train/loss", f32(1 / step))]
    # 100 scalars, at most one upload (the thread's first flush, if it came before them all)
    assert len(gcs.uploads) <= 1
    [events_object] = gcs.opened
    deadline = time.monotonic() + 30
    while len(scalars(events_object.buffer.getvalue())) < len(written):  # the thread's pace
        assert time.monotonic() < deadline, "tensorboardX's thread wrote nothing"
        time.sleep(0.01)
    before = len(gcs.uploads)
    writer.flush()  # a checkpoint: all of it goes up now
    assert len(gcs.uploads) == before + 1
    [key] = gcs.objects
    assert key.startswith("bucket/runs/x/tensorboard/events.out.tfevents.")
    assert scalars(gcs.objects[key]) == written
    writer.flush()  # nothing new: no upload
    writer.close()  # nothing new: tensorboardX's four flushes upload nothing
    assert len(gcs.uploads) == before + 1
    events = tf_records(gcs.objects[key])
    assert events[0].file_version == "brain.Event:2"
    assert scalars(gcs.objects[key]) == written
    assert steps(tmp_path / "bucket/runs/x/metrics.jsonl") == list(range(1, 51))


def test_gcs_event_object_uploads_only_changes_and_survives_failures(gcs, caplog):
    factory = metric_writers._gcs_writer_factory()
    obj = factory.open("gs://bucket/tb/events.out.tfevents.1")
    obj.write(b"one")
    obj.flush()
    obj.flush()  # nothing new: no upload
    assert gcs.uploads == ["bucket/tb/events.out.tfevents.1"]
    obj.write(b"two")
    gcs.fail_next = 1  # lands, but the client sees an error
    caplog.set_level(logging.WARNING)
    obj.flush()  # does not raise (it would end tensorboardX's thread)
    assert "TensorBoard upload failed" in caplog.text and "connection reset" in caplog.text
    obj.flush()  # retried without the stale generation precondition
    obj.close()
    assert len(gcs.uploads) == 3 and gcs.objects["bucket/tb/events.out.tfevents.1"] == b"onetwo"


def test_gs_without_the_gcs_client_warns_and_keeps_jsonl(gcs, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(record_writer, "GCS_ENABLED", False)
    caplog.set_level(logging.WARNING)
    writer = MetricWriter("gs://bucket/runs/y", flush_seconds=30)
    for step in (1, 2, 3):
        writer.write(step, {"loss": 1.0})
    writer.close()
    [warning] = [r.getMessage() for r in caplog.records if "TensorBoard" in r.getMessage()]
    assert "google-cloud-storage is not installed" in warning
    assert "pip install 'mtop-jax[gcs]'" in warning and "gs://bucket/runs/y/tensorboard" in warning
    assert gcs.uploads == []
    assert steps(tmp_path / "bucket/runs/y/metrics.jsonl") == [1, 2, 3]


class GCSUploads(BaseHTTPRequestHandler):
    """GCS's JSON API, the one call google-cloud-storage makes for upload_from_string (a
    multipart POST), with generation preconditions; objects in the class's dict."""

    objects: dict[str, tuple[bytes, int]] = {}  # "bucket/name" -> (bytes, generation)

    def do_POST(self):
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        bucket = url.path.removeprefix("/upload/storage/v1/b/").removesuffix("/o")
        body = self.rfile.read(int(self.headers["Content-Length"]))
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + body)
        meta, data = (part.get_payload(decode=True) for part in message.iter_parts())
        key = f"{bucket}/{json.loads(meta)['name']}"
        generation = self.objects.get(key, (b"", 0))[1]
        if query.get("uploadType") != "multipart" or \
                int(query.get("ifGenerationMatch", generation)) != generation:
            self.send_response(412)
            self.end_headers()
            return
        self.objects[key] = (data, generation + 1)
        out = json.dumps({"bucket": bucket, "name": key.split("/", 1)[1],
                          "generation": str(generation + 1), "size": str(len(data))}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


def test_the_real_gcs_client_against_a_local_server(tmp_path, monkeypatch):
    """tensorboardX's GCS writer with the real client (the gcs extra; skipped where it is
    not installed, as in the development venv) against a local stand-in for GCS."""
    pytest.importorskip("google.cloud.storage")
    server = ThreadingHTTPServer(("127.0.0.1", 0), GCSUploads)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setitem(record_writer.REGISTERED_FACTORIES, "gs",
                        record_writer.REGISTERED_FACTORIES["gs"])
    monkeypatch.setattr(metric_writers, "as_path",
                        lambda workdir: tmp_path / str(workdir).removeprefix("gs://"))
    monkeypatch.setattr(GCSUploads, "objects", {})
    writer = MetricWriter("gs://bucket/runs/x", flush_seconds=30)
    for step in range(1, 21):
        writer.write(step, {"loss": 1 / step})
    writer.close()
    [(key, (data, generation))] = GCSUploads.objects.items()
    assert key.startswith("bucket/runs/x/tensorboard/events.out.tfevents.")
    assert scalars(data) == [(step, "train/loss", f32(1 / step)) for step in range(1, 21)]
    # Someone else's write: the generation precondition fails (412); the writer warns,
    # and its next upload goes without the stale precondition.
    events_object = metric_writers._gcs_writer_factory().open("gs://bucket/tb/ev")
    events_object.write(b"a")
    events_object.flush()
    GCSUploads.objects["bucket/tb/ev"] = (b"?", 99)
    events_object.write(b"b")
    events_object.flush()
    events_object.flush()
    server.shutdown()
    assert GCSUploads.objects["bucket/tb/ev"] == (b"ab", 100)


def test_atomic_files_are_written_whole_or_not_at_all(tmp_path):
    """What the writers (and the trainer's predictions file) rely on: the destination
    appears complete, and a failed write leaves neither it nor a temporary file."""
    import numpy as np

    from mtop_jax.files import atomic_save_npz, atomic_write_bytes, atomic_write_text

    atomic_write_text(tmp_path / "a.txt", "one\ntwo ü\n")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "one\ntwo ü\n"
    atomic_save_npz(tmp_path / "p.npz", predictions=np.arange(6.0).reshape(3, 2))
    np.testing.assert_array_equal(np.load(tmp_path / "p.npz")["predictions"],
                                  np.arange(6.0).reshape(3, 2))
    with pytest.raises(TypeError):
        atomic_write_bytes(tmp_path / "b.bin", "not bytes")  # fails inside the write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "p.npz"]

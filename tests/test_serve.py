"""``mtop-jax serve``: a real server process on loopback, driven by a real HTTP client.

The model is a random-weight tiny 3-task model (one task named ``text``, one
regression), exported; answers are compared with ``Predictor.predict`` of the same
export in this process. One server (``server``) answers most tests; a second one
(``guarded``) has a bearer token and a queue of 2; the SIGTERM test starts its own.
"""

import asyncio
import json
import math
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import jax
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mtop_jax
from mtop_jax.data.tasks import TaskSpec
from mtop_jax.models.config import PRESETS
from mtop_jax.models.multitask import ModelConfig, MultiTaskModel
from mtop_jax.models.pretrained import load_tokenizer
from mtop_jax.models.spec import ModelSpec
from mtop_jax.serving.export import save_model_dir
from mtop_jax.serving.metrics import parse
from mtop_jax.serving.predictor import Predictor

TASKS = (TaskSpec("topic", "classification", ("admin", "devel", "games", "libs", "web")),
         TaskSpec("text", "classification", ("c", "python")),  # not the echoed text
         TaskSpec("size", "regression", target_mean=3.0, target_std=2.0))
POOL = ["GNU C library: shared libraries", "Python bindings for the GTK toolkit", "",
        "a daemon that serves web pages over HTTP " * 8, "ünïcödé テキスト 文本", "x",
        "games: a puzzle with falling blocks", "   ", "\x00 nul", "tiny"]
SERVE = ["--max-batch", "8", "--max-wait-ms", "5", "--max-texts", "16",
         "--max-body-bytes", "4096", "--read-timeout", "2"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, devices):
    tokenizer = load_tokenizer()
    spec = ModelSpec(PRESETS["tiny"].replace(vocab_size=len(tokenizer)),
                     ModelConfig(num_prompts=2), TASKS)
    _, params, _ = nnx.split(MultiTaskModel(spec.encoder, spec.model, spec.head_tasks,
                                            rngs=nnx.Rngs(1)), nnx.Param, ...)
    sharding = jax.sharding.SingleDeviceSharding(devices[0])
    saved = Predictor(spec, jax.device_put(params, sharding), tokenizer, max_length=32,
                      sharding=sharding)
    return save_model_dir(saved, tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def predictor(model_dir, devices):
    return mtop_jax.load(model_dir, devices=devices[:1], batch_size=8)


@pytest.fixture(scope="module")
def expected(predictor):
    """Every pool text's full answer (all tasks, every class), computed one at a time."""
    return {t: predictor.predict([t], top_k=None)[0] for t in POOL}


class Server:
    """``mtop-jax serve`` in a child process (one CPU device unless its flags say
    ``--cpu-devices``); its stderr is collected."""

    def __init__(self, model_dir, *flags: str, **env_vars: str):
        from fault_helpers import child_env

        env = {**child_env(), **env_vars}
        env["XLA_FLAGS"] += " --xla_force_host_platform_device_count=1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mtop_jax.cli", "serve", str(model_dir), "--port", "0",
             *flags], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._listening = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._listening.wait(120):
            self.stop()
            raise AssertionError(f"server did not listen: {self.lines}")
        self.url = self.lines[-1].split("listening on ")[1].split()[0]
        self.host, self.port = self.url.removeprefix("http://").rsplit(":", 1)

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if "listening on" in line:
                self._listening.set()

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.lines
            if httpx.get(self.url + "/readyz").status_code == 200:
                return
            time.sleep(0.2)
        raise AssertionError(f"not ready in {timeout} s: {self.lines}")

    def metrics(self, **headers) -> dict[str, float]:
        r = httpx.get(self.url + "/metrics", headers=headers)
        assert r.status_code == 200, r.text
        return parse(r.text)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


@pytest.fixture(scope="module")
def server(model_dir):
    srv = Server(model_dir, *SERVE, "--max-queue", "64")
    try:
        # Alive while it compiles (readiness may come first on a warm cache).
        assert httpx.get(srv.url + "/healthz").json() == {"status": "alive"}
        assert srv.host == "127.0.0.1"  # loopback unless --host says otherwise
        srv.wait_ready()
        yield srv
    finally:
        assert srv.stop() == 0, srv.lines


def post(srv: Server, body, **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(srv.url + "/v1/predict", content=content, timeout=60, **kw)


def assert_same(got: dict, want: dict, tasks=None, top_k: int | None = 1) -> None:
    """One text's answer equals ``want`` (the full one) cut to ``tasks`` and ``top_k``:
    labels and order exactly, unless two scores tie within float noise; scores to 1e-5."""
    assert list(got) == list(tasks or want)
    for task, answer in got.items():
        full = want[task]
        if "value" in full:
            assert set(answer) == {"value"} and answer["value"] == pytest.approx(
                full["value"], abs=1e-5)
            continue
        assert set(answer) == {"label", "score", "top_k"}
        k = len(full["top_k"]) if top_k is None else min(top_k, len(full["top_k"]))
        assert len(answer["top_k"]) == k
        scores = dict(full["top_k"])
        for label, score in answer["top_k"]:
            assert score == pytest.approx(scores[label], abs=1e-5)
        for (a, _), (b, s) in zip(answer["top_k"], full["top_k"]):
            assert a == b or abs(scores[a] - s) < 1e-5, (task, answer, full)
        assert [answer["label"], answer["score"]] == answer["top_k"][0]


# ------------------------------------------------------------------------ answers


def test_predict_answers_as_the_predictor_with_model_name_and_step(server, expected):
    texts = POOL[:5]
    r = post(server, {"texts": texts})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["model"] == "model" and body["step"] is None
    assert len(body["predictions"]) == len(texts)
    for got, text in zip(body["predictions"], texts):
        assert_same(got, expected[text])
    r = post(server, {"texts": texts[::-1], "tasks": ["size", "topic"], "top_k": 3})
    for got, text in zip(r.json()["predictions"], texts[::-1]):
        assert_same(got, expected[text], ["size", "topic"], 3)
    r = post(server, {"texts": ["x"], "top_k": None})  # null: every class
    assert_same(r.json()["predictions"][0], expected["x"], top_k=None)
    assert post(server, {"texts": []}).json()["predictions"] == []
    ready = httpx.get(server.url + "/readyz").json()
    assert ready["status"] == "ready" and ready["tasks"] == ["topic", "text", "size"]
    assert ready["devices"] == 1 and ready["batch_buckets"] == [1, 2, 4, 8]


def test_every_status_code_with_a_message_naming_the_field(server):
    cases = [
        (b"{not json", 400, "body: malformed JSON"),
        (b"\xff\xfe", 400, "body: not UTF-8"),
        (b"", 400, "body: malformed JSON"),
        ([1, 2], 400, "body: expected a JSON object"),
        ({"text": ["a"]}, 400, "body: unknown field 'text'"),
        ({}, 400, "texts: required"),
        ({"texts": "one string"}, 400, "texts: expected a list of strings, got string"),
        ({"texts": ["ok", 3]}, 400, "texts[1]: expected a string, got integer"),
        ({"texts": ["ok", None]}, 400, "texts[1]: expected a string, got null"),
        (b'{"texts": ["\\ud800"]}', 400, "texts[0]: not valid Unicode"),
        ({"texts": ["a"], "tasks": ["nope"]}, 400, "tasks: unknown tasks ['nope']"),
        ({"texts": ["a"], "tasks": "topic"}, 400, "tasks: expected a list"),
        ({"texts": ["a"], "tasks": ["topic", "topic"]}, 400, "tasks: expected distinct"),
        ({"texts": ["a"], "top_k": 0}, 400, "top_k: expected a positive integer"),
        ({"texts": ["a"], "top_k": 2.0}, 400, "top_k"),
        ({"texts": ["a"], "top_k": True}, 400, "top_k"),
        (b'{"texts": ["a"], "top_k": NaN}', 400, "top_k"),
        ({"texts": ["a"] * 17}, 413, "texts: 17 texts, over the limit of 16"),
        ({"texts": ["a" * 5000]}, 413, "body: 5015 bytes, over the limit of 4096"),
        (b"[" * 100_000, 413, "body:"),
        (b"[" * 4000, 400, "body: malformed JSON"),  # too deep for the parser
    ]
    for body, status, message in cases:
        r = post(server, body)
        assert (r.status_code, r.json()["error"][:len(message)]) == (status, message), body
    # A body without Content-Length (chunked) is counted as it arrives.
    r = httpx.post(server.url + "/v1/predict",
                   content=iter([b'{"texts": ["', b"a" * 5000, b'"]}']))
    assert r.status_code == 413 and r.json()["error"].startswith("body: over the limit")
    assert httpx.get(server.url + "/v1/predict").status_code == 405
    assert httpx.post(server.url + "/v2/predict", content=b"{}").status_code == 404
    m = server.metrics()
    assert m['mtop_requests_total{code="400",path="/v1/predict"}'] >= 17
    assert m['mtop_requests_total{code="413",path="/v1/predict"}'] >= 4
    assert m['mtop_requests_total{code="404",path="other"}'] >= 1


def test_bad_flags_are_refused_before_listening(model_dir, tmp_path, capsys):
    from mtop_jax.cli import main

    empty = tmp_path / "empty-token"
    empty.write_text("\n")
    for flags, message in ((["--max-batch", "0"], "--max-batch: must be at least 1"),
                           (["--max-wait-ms", "-1"], "--max-wait-ms: must be >= 0"),
                           (["--token-file", str(empty)], "empty"),
                           (["--token-file", str(tmp_path / "none")], "No such file"),
                           (["--max-batch", "8", "--batch-buckets", "16"], "batch_buckets"),
                           (["--host", "256.0.0.1"], "--host 256.0.0.1")):
        assert main(["serve", str(model_dir), "--port", "0", *flags]) == 2, flags
        assert message in capsys.readouterr().err, flags


def test_a_failed_compile_stops_the_server_instead_of_never_being_ready(predictor):
    """In-process: the warm-up raises (as an out-of-memory would); the server is told
    to exit, and is never ready."""
    from types import SimpleNamespace

    from mtop_jax.serving.batcher import Batcher
    from mtop_jax.serving.server import ServeConfig, State

    class Broken(SimpleNamespace):
        def warm_up(self):
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory\nmore lines")

    broken = Broken(batch_buckets=predictor.batch_buckets,
                    length_buckets=predictor.length_buckets)
    state = State(broken, ServeConfig(), "model")
    state.server = SimpleNamespace(should_exit=False)

    async def run():
        state.batcher = Batcher(broken, state.metrics, max_batch=8, max_wait_s=0.005,
                                max_queue=4)
        state.batcher.start()
        await state.warm_up()
        await state.batcher.drain()

    asyncio.run(run())
    assert state.server.should_exit and not state.ready
    assert state.failed == "RuntimeError: RESOURCE_EXHAUSTED: out of memory"


# ------------------------------------------------------------------------ clients


def raw(srv: Server, data: bytes, *, read: bool) -> bytes:
    with socket.create_connection((srv.host, int(srv.port)), timeout=10) as s:
        s.sendall(data)
        if not read:
            return b""
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def request_bytes(body: bytes, length: int | None = None) -> bytes:
    return (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: " + str(length or len(body)).encode()
            + b"\r\n\r\n" + body)


def test_clients_that_disconnect_or_are_slow_do_not_disturb_the_others(server, expected):
    body = json.dumps({"texts": POOL[:8]}).encode()
    for _ in range(5):
        raw(server, request_bytes(body[:20], len(body)), read=False)  # gone mid-body
        raw(server, request_bytes(body), read=False)  # gone before the answer
    # A slow client (a byte every 20 ms) is answered; others are served meanwhile.
    slow_body = json.dumps({"texts": ["slow"]}).encode()
    result = {}

    def slow():
        with socket.create_connection((server.host, int(server.port)), timeout=10) as s:
            data = request_bytes(slow_body)
            head, rest = data[:len(data) - len(slow_body)], slow_body
            s.sendall(head)
            for i in range(len(rest)):
                s.sendall(rest[i:i + 1])
                time.sleep(0.05)
            result["answer"] = s.makefile("rb").read()

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.1)
    r = post(server, {"texts": ["fast"]})
    assert r.status_code == 200 and thread.is_alive(), "waited for the slow client"
    thread.join(30)
    status, _, answer = result["answer"].partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 200") and json.loads(answer)["predictions"]
    # Slower than --read-timeout (2 s): 408.
    with socket.create_connection((server.host, int(server.port)), timeout=10) as s:
        s.sendall(request_bytes(slow_body)[:-5])
        reply = s.makefile("rb").read()
    assert reply.startswith(b"HTTP/1.1 408") and b"body: not received within 2 s" in reply
    deadline = time.monotonic() + 10
    while server.metrics()["mtop_queue_depth"] != 0:  # the dropped requests finished
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r = post(server, {"texts": POOL[:3]})
    for got, text in zip(r.json()["predictions"], POOL[:3]):
        assert_same(got, expected[text])


async def hammer(url: str, bodies: list[dict], concurrency: int, headers=None):
    """(status, json or error, headers, time answered) per body, ``concurrency`` clients
    at once."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    queue: asyncio.Queue = asyncio.Queue()
    for i, body in enumerate(bodies):
        queue.put_nowait((i, body))
    out: list = [None] * len(bodies)

    async def client(http: httpx.AsyncClient):
        while not queue.empty():
            i, body = queue.get_nowait()
            try:
                r = await http.post(url + "/v1/predict", json=body, headers=headers)
                out[i] = (r.status_code, r.json(), r.headers, time.monotonic())
            except httpx.TransportError as e:
                out[i] = ("refused", repr(e), {}, time.monotonic())

    async with httpx.AsyncClient(limits=limits, timeout=60) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return out


def test_1000_requests_from_32_clients_answered_as_the_predictor_without_compiles(
        server, expected):
    import random

    rng = random.Random(0)
    bodies = []
    for i in range(1000):
        body: dict = {"texts": rng.choices(POOL, k=rng.choice((1, 1, 1, 2, 5)))}
        if i % 3 == 1:
            body["tasks"] = rng.sample(["topic", "text", "size"], rng.randint(1, 3))
        if i % 4 == 2:
            body["top_k"] = rng.choice([None, 2, 3, 10])
        bodies.append(body)
    before = server.metrics()
    start = time.monotonic()
    answers = asyncio.run(hammer(server.url, bodies, 32))
    seconds = time.monotonic() - start
    for body, (status, data, _, _) in zip(bodies, answers):
        assert status == 200, data
        assert len(data["predictions"]) == len(body["texts"])
        for got, text in zip(data["predictions"], body["texts"]):
            assert_same(got, expected[text], body.get("tasks"), body.get("top_k", 1))
    m = server.metrics()
    assert m['mtop_compiles_total{phase="serving"}'] == 0
    assert m['mtop_compiles_total{phase="warmup"}'] >= 1  # the listener counts: can fail
    batches = m["mtop_batch_size_texts_count"] - before["mtop_batch_size_texts_count"]
    texts = m["mtop_texts_total"] - before["mtop_texts_total"]
    assert texts == sum(len(b["texts"]) for b in bodies)
    assert batches < 0.8 * len(bodies), "concurrent requests were not batched together"
    assert m['mtop_batch_size_texts_bucket{le="8"}'] == m["mtop_batch_size_texts_count"]
    print(f"1000 requests, 32 clients: {seconds:.1f} s, {texts / batches:.1f} texts a batch")


# ------------------------------------------------------------------------ fuzzing

json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4), max_leaves=12)
near_valid = st.fixed_dictionaries(
    {"texts": st.one_of(st.lists(st.one_of(st.text(max_size=30), json_value), max_size=6),
                        json_value)},
    optional={"tasks": st.one_of(st.lists(st.sampled_from(["topic", "text", "size", "x", ""]),
                                          max_size=4), json_value),
              "top_k": st.one_of(st.integers(-3, 2**70), json_value),
              "extra": json_value})
bodies = st.one_of(json_value.map(json.dumps), near_valid.map(json.dumps),
                   st.binary(max_size=200), st.text(max_size=200).map(lambda s: s.encode(
                       "utf-8", "surrogatepass")))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=bodies)
def test_fuzzed_bodies_get_200_or_a_4xx_naming_the_problem(server, body):
    r = post(server, body)
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text)
    if r.status_code == 200:
        data = r.json()
        assert len(data["predictions"]) == len(json.loads(body)["texts"])
        for p in data["predictions"]:
            for answer in p.values():
                assert all(math.isfinite(v) for v in (answer.get("score", 0),
                                                      answer.get("value", 0)))
    else:
        assert r.json()["error"].split(":")[0]  # "field: what is wrong"


# ------------------------------------------------------------------------ guarded


def test_bearer_token_and_a_full_queue(model_dir, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    srv = Server(model_dir, *SERVE, "--max-batch", "1", "--max-queue", "2",
                 "--token-file", str(token),
                 JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cold-cache"))  # compiles take s
    good = {"Authorization": "Bearer s3cret"}
    try:
        # Listening, not ready: probes answer (no token needed), predictions wait.
        assert httpx.get(srv.url + "/healthz").status_code == 200
        r = httpx.get(srv.url + "/readyz")
        assert r.status_code == 503 and r.json()["error"] == "not ready: compiling"
        r = post(srv, {"texts": ["a"]}, headers=good)
        assert (r.status_code, r.headers["retry-after"]) == (503, "1"), r.text
        srv.wait_ready()
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "s3cret"}):
            r = post(srv, {"texts": ["a"]}, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert httpx.get(srv.url + "/metrics", headers=headers).status_code == 401
        assert post(srv, {"texts": ["a"]}, headers=good).status_code == 200
        assert post(srv, {"texts": ["a"]},  # the scheme is case-insensitive (RFC 6750)
                    headers={"Authorization": "bearer s3cret"}).status_code == 200
        # 40 clients at once against a queue of 2 requests of 8 texts (a batch is 1 text).
        answers = asyncio.run(hammer(srv.url, [{"texts": POOL[:8]}] * 40, 40, good))
        codes = [a[0] for a in answers]
        assert set(codes) == {200, 503} and codes.count(200) >= 2, codes
        for status, data, headers, _ in answers:
            if status == 503:
                assert headers["retry-after"] == "1" and data["error"].startswith("queue full")
        m = srv.metrics(**good)
        assert m['mtop_requests_total{code="503",path="/v1/predict"}'] == codes.count(503) + 1
        assert m['mtop_requests_total{code="401",path="/v1/predict"}'] == 3
    finally:
        assert srv.stop() == 0, srv.lines


def test_sigterm_answers_the_requests_in_flight_and_exits_0(model_dir, expected):
    srv = Server(model_dir, *SERVE, "--max-batch", "1", "--max-queue", "64")
    srv.wait_ready()
    signalled: list[float] = []

    async def drive():
        async def signal_when_busy():
            async with httpx.AsyncClient() as http:
                while True:  # requests queued and computing: then the signal
                    page = parse((await http.get(srv.url + "/metrics")).text)
                    if page["mtop_queue_depth"] >= 8:
                        break
                    await asyncio.sleep(0.01)
            srv.proc.send_signal(signal.SIGTERM)
            signalled.append(time.monotonic())
            await asyncio.sleep(0.3)
            return await hammer(srv.url, [{"texts": ["late"]}] * 4, 4)

        # 32 requests of 8 texts, a forward pass per text: far from done at the signal.
        return await asyncio.gather(hammer(srv.url, [{"texts": POOL[:8]}] * 32, 32),
                                    signal_when_busy())

    in_flight, late = asyncio.run(drive())
    assert srv.proc.wait(60) == 0, srv.lines
    # Every request received is answered, and correctly; those sent after the signal are
    # refused (connection refused, or 503 while draining): none is lost or left hanging.
    for status, data, _, _ in in_flight:
        assert status == 200, data
        for got, text in zip(data["predictions"], POOL[:8]):
            assert_same(got, expected[text])
    assert any(at > signalled[0] for *_, at in in_flight), "nothing was in flight"
    assert all(a[0] in ("refused", 503) for a in late), late
    assert any("draining" in line for line in srv.lines), srv.lines


# ------------------------------------------------------------------------ devices


def test_several_devices_split_each_batch_by_rows_and_answer_as_one(
        model_dir, predictor, devices):
    """Data parallel: parameters replicated, each device 1/8 of the rows (and 1/8 of the
    work, by XLA's own cost analysis), the same logits as one device."""
    eight = mtop_jax.load(model_dir, devices=devices, batch_size=16)
    assert eight.batch_buckets == (8, 16)  # multiples of the device count
    batch = eight.tokenize(POOL)  # 10 texts -> 16 rows
    placed = eight.place(batch)
    for x in placed:
        shards = sorted((s.device.id, s.data.shape) for s in x.addressable_shards)
        assert shards == [(d.id, (2, x.shape[1])) for d in devices]
    out = eight._logits(eight.params, eight.rest, *placed)
    assert sorted(s.data.shape[0] for s in out.addressable_shards) == [2] * 8
    one = mtop_jax.load(model_dir, devices=devices[:1], batch_size=16)
    flops = [p._logits.lower(p.params, p.rest, *p.place(batch)).compile().cost_analysis()[
        "flops"] for p in (eight, one)]
    assert flops[0] == pytest.approx(flops[1] / 8, rel=0.05)
    np.testing.assert_allclose(eight.logits(POOL * 3), one.logits(POOL * 3), atol=1e-5)
    assert eight.predict(POOL, top_k=2)[0].keys() == predictor.predict(POOL)[0].keys()
    # The server's buckets (1, 2, 4, 8, 16, 24, ..., max batch), rounded to the device count.
    from mtop_jax.errors import ConfigError
    from mtop_jax.serving.server import batch_buckets

    assert batch_buckets(32) == [1, 2, 4, 8, 16, 24, 32] and batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20] and batch_buckets(3) == [1, 2, 3]
    finer = mtop_jax.load(model_dir, devices=devices, batch_size=32,
                          batch_buckets=batch_buckets(32))
    assert finer.batch_buckets == (8, 16, 24, 32)
    with pytest.raises(ConfigError, match="batch_buckets"):
        mtop_jax.load(model_dir, devices=devices[:1], batch_size=8, batch_buckets=[16])


def test_server_on_two_devices_answers_as_one(model_dir, expected):
    # --cpu-devices sets the CPU's device count itself (the child starts with one).
    srv = Server(model_dir, *SERVE, "--cpu-devices", "2")
    try:
        srv.wait_ready()
        ready = httpx.get(srv.url + "/readyz").json()
        assert ready["devices"] == 2 and ready["batch_buckets"] == [2, 4, 8]
        answers = asyncio.run(hammer(srv.url, [{"texts": [t]} for t in POOL * 4], 8))
        for (status, data, _, _), text in zip(answers, POOL * 4):
            assert status == 200, data
            assert_same(data["predictions"][0], expected[text])
        assert srv.metrics()['mtop_compiles_total{phase="serving"}'] == 0
    finally:
        assert srv.stop() == 0, srv.lines


# ------------------------------------------------------------------------ load test


@pytest.mark.slow  # 30 s of load; the server's answers are tested above
def test_serve_load_quick_writes_its_table_targets_json_and_png(model_dir, tmp_path, capsys):
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import serve_load

    result = serve_load.main([str(model_dir), "--quick", "--concurrency", "1,4",
                              "--seconds", "0.5", "--max-batch", "8", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| texts/request | clients |" in out and "## Targets" in out
    assert "PASS compiles after ready: 0" in out
    assert "PASS failed requests within the queue bound: 0" in out
    saved = json.loads((tmp_path / "serve_load.json").read_text())
    assert saved["results"] == json.loads(json.dumps(result["results"]))
    assert {"device", "jax_version", "command", "date"} <= set(saved)
    assert (tmp_path / "serve_load.png").stat().st_size > 10_000
    rows = saved["results"]
    assert {(r["texts_per_request"], r["concurrency"]) for r in rows} == {
        (k, c) for k in (1, 8) for c in (1, 4)}
    for r in rows:
        assert r["failed"] == 0 and r["ok"] == r["requests"] > 0
        assert r["p50_s"] <= r["p95_s"] <= r["p99_s"]
        assert r["texts_per_s"] == pytest.approx(r["ok"] * r["texts_per_request"] / r["wall_s"])
        # every text went through a forward pass of at most 8 rows (the window's ends
        # cut through at most one request per client)
        assert sum(r["batch_sizes"].values()) >= (r["ok"] - r["concurrency"]) * r[
            "texts_per_request"] / 8
        assert set(r["batch_sizes"]) == {"1", "2", "4", "8", "+Inf"}
        assert r["batch_sizes"]["+Inf"] == 0
    solo = next(r for r in rows if r["texts_per_request"] == 8 and r["concurrency"] == 1)
    assert solo["batch_sizes"]["8"] == sum(solo["batch_sizes"].values())  # 8 texts: 1 pass
    assert saved["offline"]["texts_per_s"] > 0 and saved["offline"]["batch"] == 8
    assert saved["compiles_after_ready"] == 0 and saved["server_exit_code"] == 0
    assert saved["predict_cold_start_s"] > 0 and saved["ready_s"] > 0
    assert [c["name"].split(" (")[0] for c in saved["checks"]] == [
        "compiles after ready", "failed requests within the queue bound"]  # no 32 clients

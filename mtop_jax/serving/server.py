"""``mtop-jax serve``: the HTTP/JSON API of DESIGN.md section 10, on Starlette and uvicorn.

``POST /v1/predict`` (``schema`` says the JSON), ``GET /healthz`` (the process answers),
``/readyz`` (200 once every bucket is compiled and warm; 503 before and while draining),
``/metrics`` (Prometheus text). Requests go through the :class:`Batcher`, which shares
forward passes between concurrent requests.

Status codes: 200; 400 malformed (the message names the field); 401 without the bearer
token (with ``--token-file``); 404/405 other paths and methods; 408 a body not received
within ``--read-timeout``; 413 over ``--max-texts`` or ``--max-body-bytes``; 503 with
``Retry-After`` when not ready yet, the queue is full, or the server is draining.

The server listens before it is ready, so a probe sees it alive while it compiles; the
compiles run on the forward thread, and a ``jax.monitoring`` listener counts every
program lowered after ready (``mtop_compiles_total{phase="serving"}``, which should stay
0). SIGTERM (or Ctrl-C): stop accepting connections, answer every request received,
exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from mtop_jax.errors import ConfigError
from mtop_jax.serving.batcher import Batcher, Closed, QueueFull
from mtop_jax.serving.metrics import Metrics
from mtop_jax.serving.schema import RequestError, parse_request

COMPILE_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256  # requests waiting or being computed
    max_texts: int = 256  # a request
    max_body_bytes: int = 1 << 20
    read_timeout_s: float = 30.0
    drain_timeout_s: float = 60.0
    token: str | None = None
    batch_buckets: tuple[int, ...] | None = None  # None: batch_buckets(max_batch)

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "max_texts", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: must be at least 1, got "
                                  f"{getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ConfigError(f"--max-wait-ms: must be >= 0, got {self.max_wait_ms}")


def read_token(path: str | Path) -> str:
    """The bearer token of ``--token-file`` (its first line), refused if empty."""
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise ConfigError(f"--token-file {path}: {e.strerror}") from None
    if not token:
        raise ConfigError(f"--token-file {path}: empty")
    return token


class State:
    """What the handlers share: the predictor, its batcher, metrics, readiness."""

    def __init__(self, predictor: Any, config: ServeConfig, name: str):
        self.predictor, self.config, self.name = predictor, config, name
        self.metrics = Metrics(predictor.batch_buckets)
        self.ready = False
        self.draining = False
        self.batcher: Batcher | None = None
        self.warm_task: asyncio.Task | None = None
        self.failed: str | None = None  # why compiling failed: the server then stops
        self.server: Any = None  # the uvicorn server, told to exit on such a failure
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs: Any) -> None:
        if event == COMPILE_EVENT:
            self.metrics.compiles.inc(phase="serving" if self.ready else "warmup")

    async def warm_up(self) -> None:
        """Compile every bucket on the forward thread, then say ready; if that fails (out
        of memory, a broken backend) the server stops, exit 1, rather than stay alive
        and never ready."""
        start = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            n = await loop.run_in_executor(self.batcher._pool, self.predictor.warm_up)
        except Exception as e:
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log(f"error: compiling the forward passes failed ({self.failed}); stopping")
            if self.server is not None:
                self.server.should_exit = True
            return
        self.ready = True
        self.metrics.ready.set(1)
        log(f"ready: {n} forward programs (batch buckets {list(self.predictor.batch_buckets)}"
            f" x length buckets {list(self.predictor.length_buckets)}) compiled in "
            f"{time.monotonic() - start:.1f} s")


def log(message: str) -> None:
    print(f"mtop-jax serve: {message}", file=sys.stderr, flush=True)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def build_app(state: State) -> CountRequests:
    """The Starlette application over ``state``."""
    config = state.config
    expected = config.token.encode() if config.token else None

    def authorized(request: Request) -> bool:
        if expected is None:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode("latin-1", "replace"), expected)

    def unauthorized():
        return _error(401, "authorization: a bearer token is required",
                      {"WWW-Authenticate": "Bearer"})

    def unavailable(message: str):
        return _error(503, message, {"Retry-After": "1"})

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > config.max_body_bytes:
            raise RequestError(413, f"body: {declared} bytes, over the limit of "
                                    f"{config.max_body_bytes}")
        chunks, size = [], 0

        async def read() -> None:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > config.max_body_bytes:
                    raise RequestError(413, f"body: over the limit of {config.max_body_bytes} "
                                            "bytes")
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), config.read_timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(408, f"body: not received within {config.read_timeout_s:g} s") \
                from None
        return b"".join(chunks)

    async def predict(request: Request) -> Response:
        if not authorized(request):
            return unauthorized()
        if state.draining:
            return unavailable("shutting down")
        if not state.ready:
            return unavailable("not ready: compiling")
        if state.batcher.depth >= config.max_queue:  # before reading the body: shed load
            return unavailable(f"queue full ({config.max_queue} requests)")
        try:
            body = await read_body(request)
            parsed = parse_request(body, state.predictor, max_texts=config.max_texts)
            predictions = await state.batcher.submit(parsed)
        except RequestError as e:
            return _error(e.status, e.message, e.headers)
        except ClientDisconnect:
            return Response(status_code=499)  # nobody reads it; counted as nginx does
        except QueueFull:
            return unavailable(f"queue full ({config.max_queue} requests)")
        except Closed:
            return unavailable("shutting down")
        return JSONResponse({"model": state.name, "step": state.predictor.step,
                             "predictions": predictions})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def readyz(request: Request) -> Response:
        if state.failed:
            return _error(503, f"compiling failed: {state.failed}")
        if state.draining:
            return _error(503, "shutting down")
        if not state.ready:
            return _error(503, "not ready: compiling")
        return JSONResponse({"status": "ready", "model": state.name,
                             "step": state.predictor.step,
                             "tasks": list(state.predictor.task_names),
                             "devices": len(state.predictor.devices),
                             "batch_buckets": list(state.predictor.batch_buckets)})

    async def metrics(request: Request) -> Response:
        if not authorized(request):
            return unauthorized()
        return PlainTextResponse(state.metrics.render(),
                                 media_type="text/plain; version=0.0.4")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.batcher = Batcher(state.predictor, state.metrics, max_batch=config.max_batch,
                                max_wait_s=config.max_wait_ms / 1000,
                                max_queue=config.max_queue)
        state.batcher.start()
        state.warm_task = asyncio.get_running_loop().create_task(state.warm_up())
        yield
        state.draining = True
        await state.batcher.drain()
        if not state.warm_task.done():
            state.warm_task.cancel()

    routes = [Route("/v1/predict", predict, methods=["POST"]),
              Route("/healthz", healthz, methods=["GET"]),
              Route("/readyz", readyz, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan)
    return CountRequests(app, state)


class CountRequests:
    """ASGI middleware: ``mtop_requests_total`` by path and status, and /v1/predict's
    latency, from the response each request actually got."""

    PATHS = ("/v1/predict", "/healthz", "/readyz", "/metrics")

    def __init__(self, app, state: State):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.monotonic(), 500

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            path = scope["path"] if scope["path"] in self.PATHS else "other"
            self.state.metrics.requests.inc(path=path, code=str(status))
            if path == "/v1/predict":
                self.state.metrics.latency.observe(time.monotonic() - start)


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, then every multiple of 8 up to ``max_batch`` (and it). On a CPU a text
    costs about the same alone as in a batch of 32 (the demo-size model: 20 ms vs 17 ms),
    so what a batch wastes is its padding rows: under a steady load the batches are
    rarely full (the clients answered together send again together), and with buckets
    of 8 and 32 alone, 32 clients made batches of ~20 texts padded to 32."""
    sizes = {1, 2, 4, *range(8, max_batch + 1, 8), max_batch}
    return sorted(b for b in sizes if b <= max_batch)


def serve(model: str | Path, config: ServeConfig, *, devices: int | None = None) -> int:
    """Load ``model``, listen, compile, answer until SIGTERM or Ctrl-C; returns 0 (1 if
    compiling failed).

    The address is bound first, so that a taken port or a bad host fails before the
    model is loaded; connections are accepted from when the model is loaded."""
    import mtop_jax

    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((config.host, config.port))
        except OSError as e:
            raise ConfigError(f"--host {config.host} --port {config.port}: "
                              f"{e.strerror}") from None
        chosen = jax.devices()[:devices] if devices else None
        predictor = mtop_jax.load(model, batch_size=config.max_batch, devices=chosen,
                                  batch_buckets=config.batch_buckets or batch_buckets(
                                      config.max_batch))
    except BaseException:
        sock.close()
        raise
    state = State(predictor, config, Path(model).resolve().name)
    sock.listen(2048)
    sock.set_inheritable(True)

    server = _Server(uvicorn.Config(
        build_app(state), log_level="warning", access_log=False, lifespan="on",
        timeout_graceful_shutdown=config.drain_timeout_s, timeout_keep_alive=5), state)
    host, port = sock.getsockname()[:2]
    log(f"listening on http://{host}:{port} (model {state.name}, step {predictor.step}, "
        f"tasks {list(predictor.task_names)}, {len(predictor.devices)} device(s))")
    state.server = server
    server.run(sockets=[sock])
    log("stopped")
    return 1 if state.failed else 0


class _Server(uvicorn.Server):
    """uvicorn's server, but SIGTERM and SIGINT end in a clean exit 0 after draining
    (uvicorn re-raises the signal once it has drained, which would kill the process)."""

    def __init__(self, config: uvicorn.Config, state: State):
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig, frame) -> None:
        if not self.state.draining:
            log("draining: no new connections; answering the requests received")
        self.state.draining = True
        super().handle_exit(sig, frame)
        self._captured_signals.clear()  # drained: exit normally, not by the signal

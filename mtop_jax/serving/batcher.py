"""Concurrent requests gathered into shared forward passes.

Requests queue as rows (a text each). One asyncio task takes rows in arrival order
until a batch holds ``max_batch`` rows or ``max_wait`` has passed since the batch
opened (its first row arrived, or the model became free, whichever is later), and
runs it on the predictor in a single worker thread, so the event loop keeps accepting
and parsing requests while the model runs (and the next batch gathers meanwhile). A
request larger than ``max_batch`` spans several batches; it is answered when its last
row is. The predictor's batch buckets are compiled before the
server is ready, so any batch of at most ``max_batch`` rows reuses a compiled program.

The queue is bounded in requests (waiting or being computed): ``submit`` beyond the
bound raises :class:`QueueFull` at once (the server's 503) instead of letting
latency grow without limit. ``drain`` answers everything queued, then stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mtop_jax.serving.metrics import Metrics
from mtop_jax.serving.schema import PredictRequest


class QueueFull(Exception):
    """The bounded queue holds ``max_queue`` requests already."""


class Closed(Exception):
    """The batcher is draining or stopped: no new requests."""


@dataclass
class _Pending:
    request: PredictRequest
    future: asyncio.Future
    logits: list[np.ndarray | None] = field(default_factory=list)
    left: int = 0


class Batcher:
    def __init__(self, predictor: Any, metrics: Metrics, *, max_batch: int, max_wait_s: float,
                 max_queue: int):
        self.predictor, self.metrics = predictor, metrics
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self._rows: deque[tuple[_Pending, int]] = deque()  # (request, row index)
        self._first_at: float | None = None  # arrival of the oldest queued row
        self._free_at = 0.0  # when the model finished its last batch
        self._pending = 0
        self._closed = False
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mtop-forward")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    @property
    def depth(self) -> int:
        return self._pending

    async def submit(self, request: PredictRequest) -> list[dict[str, Any]]:
        """The predictions of ``request``'s texts, from whichever batches hold them."""
        if self._closed:
            raise Closed()
        if self._pending >= self.max_queue:
            raise QueueFull()
        future = asyncio.get_running_loop().create_future()
        n = len(request.texts)
        if n == 0:
            return []
        item = _Pending(request, future, [None] * n, n)
        self._pending += 1
        self._idle.clear()
        self.metrics.queue_depth.set(self._pending)
        if not self._rows:
            self._first_at = time.monotonic()
        self._rows.extend((item, i) for i in range(n))
        self._wake.set()
        try:
            # A client that goes away does not cancel its rows (they are batched already);
            # shield keeps the answer's future intact for the batch that computes it.
            return await asyncio.shield(future)
        finally:
            if future.done() and not future.cancelled():
                future.exception()  # retrieved, so a dropped client leaves no warning

    async def drain(self) -> None:
        """Refuse new requests, answer the queued ones, stop the worker."""
        self._closed = True
        self._wake.set()
        await self._idle.wait()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._pool.shutdown(wait=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._rows:
                self._wake.clear()
                await self._wake.wait()
                continue
            # Gather: until max_batch rows, or max_wait after the batch opened: when its
            # oldest row arrived, or when the model became free if that was later. Under
            # load, the clients just answered send again at once: waiting for them fills
            # the batch, where starting on the rows queued meanwhile would halve it.
            while len(self._rows) < self.max_batch and not self._closed:
                opened = max(self._first_at or 0.0, self._free_at)
                wait = self.max_wait_s - (time.monotonic() - opened)
                if wait <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), wait)
                except asyncio.TimeoutError:
                    break
            batch = [self._rows.popleft() for _ in range(min(self.max_batch, len(self._rows)))]
            self._first_at = time.monotonic() if self._rows else None
            texts = [item.request.texts[i] for item, i in batch]
            self.metrics.batch_size.observe(len(texts))
            try:
                logits = await loop.run_in_executor(self._pool, self.predictor.logits, texts)
            except Exception as e:  # a bug or a device failure: every request of it fails
                for item, _ in batch:
                    if not item.future.done():
                        item.future.set_exception(e)
                    self._finish(item)
                continue
            done = []
            for (item, i), row in zip(batch, logits):
                item.logits[i] = row
                item.left -= 1
                if item.left == 0:
                    done.append(item)
            if done:
                answers = await loop.run_in_executor(self._pool, self._format, done)
                for item, answer in zip(done, answers):
                    if not item.future.done():
                        item.future.set_result(answer)
            for item in done:
                self.metrics.texts.inc(len(item.request.texts))
                self._finish(item)
            self._free_at = time.monotonic()

    def _format(self, items: list[_Pending]) -> list[list[dict[str, Any]]]:
        return [self.predictor.format(np.stack(item.logits), tasks=item.request.tasks,
                                      top_k=item.request.top_k) for item in items]

    def _finish(self, item: _Pending) -> None:
        if item.left > 0:  # a failed batch: the request's other rows are dropped
            item.left = -1
            remaining = [r for r in self._rows if r[0] is not item]
            self._rows.clear()
            self._rows.extend(remaining)
        elif item.left < 0:
            return
        item.left = -1
        self._pending -= 1
        self.metrics.queue_depth.set(self._pending)
        if self._pending == 0:
            self._idle.set()


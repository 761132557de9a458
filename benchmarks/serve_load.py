"""Load test of ``mtop-jax serve``: a real server process, a real async HTTP client.

    .venv/bin/python benchmarks/serve_load.py workdirs/demo --out benchmarks/results/serve
    .venv/bin/python benchmarks/serve_load.py MODEL --quick --out /tmp/serve   # seconds

Starts the server on MODEL (a workdir or an export) on loopback, waits for ``/readyz``
and drives ``POST /v1/predict`` with httpx at each concurrency (closed loop: each client
sends its next request when the last is answered) for ``--seconds``, with requests of 1
and of 8 texts (the demo set's test texts, in turn). Per setting: requests and texts
per second, p50/p95/p99 latency, failed requests, and the batch-size histogram (from
``/metrics``, the difference over the setting), after an untimed warm-up of the same
load (connections opened). Then, in the same run and with the
server stopped (it would compete for the same cores), the offline predictor at batch 32
over the same texts, and the cold start of ``mtop-jax predict`` for one text.

Targets (issue 17): at concurrency 32 of one-text requests, server throughput >= 0.8x
the offline predictor's at batch 32, and p99 latency <= max-wait + 2 batch times (the
offline time of a batch of 32); zero compiles after ready; zero failed requests at a
concurrency within the queue bound. Printed as PASS/MISS with the ratios; JSON and
PNG with ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    environment,
    fill_defaults,
    fmt,
    int_list,
    markdown_table,
    pyplot,
    save_figure,
    write_json,
)

FULL = {"concurrency": [1, 4, 16, 32, 64], "texts_per_request": [1, 8], "seconds": 10.0,
        "offline_repeats": 3, "n_texts": 320}
QUICK = {"concurrency": [1, 4, 32], "texts_per_request": [1, 8], "seconds": 1.0,
         "offline_repeats": 2, "n_texts": 64}
TARGET_CONCURRENCY = 32


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def demo_texts(n: int) -> list[str]:
    from mtop_jax.data.demo import DEBIAN_PACKAGES_DIR

    with open(DEBIAN_PACKAGES_DIR / "test.jsonl", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    return [texts[i % len(texts)] for i in range(n)]


class ServerProcess:
    """``mtop-jax serve MODEL --port 0`` in a child process; its stderr is kept."""

    def __init__(self, model: str, flags: list[str]):
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mtop_jax.cli", "serve", model, "--port", "0", *flags],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        listening = threading.Event()

        def read() -> None:
            for line in self.proc.stderr:
                self.lines.append(line.rstrip("\n"))
                if "listening on" in line:
                    listening.set()

        threading.Thread(target=read, daemon=True).start()
        if not listening.wait(300):
            self.stop()
            raise RuntimeError(f"the server did not start: {self.lines}")
        self.url = next(x for x in self.lines if "listening on" in x).split(
            "listening on ")[1].split()[0]

    def wait_ready(self) -> float:
        import httpx

        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.lines}")
            try:
                if httpx.get(self.url + "/readyz").status_code == 200:
                    return time.monotonic() - self.started
            except httpx.TransportError:
                pass
            time.sleep(0.1)

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of the server process so far (Linux /proc), else None."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def metrics(self) -> dict[str, float]:
        import httpx

        from mtop_jax.serving.metrics import parse

        return parse(httpx.get(self.url + "/metrics").text)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)


async def drive(url: str, texts: list[str], per_request: int, concurrency: int,
                seconds: float, warmup_s: float,
                snapshot: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Closed-loop load: ``warmup_s`` untimed (connections opened, the loop at its pace),
    then a window of ``seconds``: the requests answered within it (throughput, latency,
    statuses), and ``snapshot()`` taken at its start and its end. Counting what completes
    in the window, not what was sent in it, keeps a latency near the window's length from
    hiding the work done for requests sent before it."""
    import httpx

    done: list[tuple[float, float, str]] = []  # (answered at, latency, status)
    begin = time.monotonic()
    window = (begin + warmup_s, begin + warmup_s + seconds)
    counter = iter(range(10**12))
    marks: dict[str, Any] = {}

    async def client(http: httpx.AsyncClient) -> None:
        while time.monotonic() < window[1]:
            start = next(counter) * per_request
            body = {"texts": [texts[(start + j) % len(texts)] for j in range(per_request)]}
            t0 = time.monotonic()
            try:
                r = await http.post(url + "/v1/predict", json=body)
                status = str(r.status_code)
            except httpx.TransportError as e:
                status = type(e).__name__
            now = time.monotonic()
            done.append((now, now - t0, status))

    async def one_client() -> None:
        # A client of its own (one keep-alive connection) per simulated user: one shared
        # pool of many connections costs httpx ~3x the CPU a request at 32.
        async with httpx.AsyncClient(timeout=120) as http:
            await client(http)

    async def marker() -> None:
        for name, at in zip(("start", "end"), window):
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            marks[name] = snapshot()

    await asyncio.gather(marker(), *(one_client() for _ in range(concurrency)))
    answered = [(lat, st) for at, lat, st in done if window[0] <= at < window[1]]
    ok = sum(st == "200" for _, st in answered)
    statuses: dict[str, int] = {}
    for _, st in answered:
        statuses[st] = statuses.get(st, 0) + 1
    lat = np.asarray([x for x, _ in answered] or [float("nan")])
    return {"requests": len(answered), "ok": ok, "failed": len(answered) - ok,
            "failed_outside_window": sum(st != "200" for at, _, st in done
                                         if not window[0] <= at < window[1]),
            "statuses": statuses, "wall_s": seconds, "requests_per_s": ok / seconds,
            "texts_per_s": ok * per_request / seconds,
            **{f"p{q}_s": float(np.percentile(lat, q)) for q in (50, 95, 99)},
            "start": marks["start"], "end": marks["end"]}


def batch_histogram(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    """Forward passes per batch-size bucket (``le``) between two /metrics pages."""
    out, previous = {}, 0
    for key in after:
        if key.startswith("mtop_batch_size_texts_bucket"):
            le = key.split('le="')[1].rstrip('"}')
            total = int(after[key] - before.get(key, 0))
            out[le] = total - previous
            previous = total
    return out


def offline(model: str, texts: list[str], batch: int, repeats: int) -> dict[str, Any]:
    """The in-process predictor at ``batch`` over ``texts`` (compiled first): texts/s and
    the median time of one full batch."""
    import mtop_jax

    predictor = mtop_jax.load(model, batch_size=batch)
    predictor.warm_up()
    predictor.logits(texts)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        predictor.predict(texts)
        times.append(time.perf_counter() - t0)
    full = texts[:batch]
    batch_times = []
    for _ in range(max(3, repeats)):
        t0 = time.perf_counter()
        predictor.predict(full)
        batch_times.append(time.perf_counter() - t0)
    median = float(np.median(times))
    return {"batch": batch, "texts": len(texts), "times_s": times,
            "texts_per_s": len(texts) / median, "batch_time_s": float(np.median(batch_times))}


def cold_start(model: str) -> float:
    """Seconds of ``mtop-jax predict --model MODEL --text ...`` as a new process."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mtop_jax.cli", "predict", "--model", model,
                    "--text", "GNU C library: shared libraries"], check=True,
                   capture_output=True)
    return time.perf_counter() - t0


def checks(rows: list[dict], off: dict, args, compiles_after_ready: float) -> list[dict]:
    out = []
    target = [r for r in rows if r["concurrency"] == TARGET_CONCURRENCY
              and r["texts_per_request"] == 1]
    if target:
        r = target[0]
        ratio = r["texts_per_s"] / off["texts_per_s"]
        out.append({"name": f"throughput at concurrency {TARGET_CONCURRENCY} (1 text) / "
                            f"offline batch {off['batch']}", "value": ratio, "bound": 0.8,
                    "pass": ratio >= 0.8})
        bound = args.max_wait_ms / 1000 + 2 * off["batch_time_s"]
        out.append({"name": f"p99 latency at concurrency {TARGET_CONCURRENCY} (1 text) / "
                            "(max wait + 2 batch times)", "value": r["p99_s"] / bound,
                    "bound": 1.0, "pass": r["p99_s"] <= bound, "p99_s": r["p99_s"],
                    "bound_s": bound})
    out.append({"name": "compiles after ready", "value": compiles_after_ready, "bound": 0,
                "pass": compiles_after_ready == 0})
    failed = sum(r["failed"] + r["failed_outside_window"] for r in rows
                 if r["concurrency"] <= args.max_queue)
    out.append({"name": "failed requests within the queue bound", "value": failed,
                "bound": 0, "pass": failed == 0})
    return out


def plot(rows: list[dict], off: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for k in sorted({r["texts_per_request"] for r in rows}):
        sel = [r for r in rows if r["texts_per_request"] == k]
        c = [r["concurrency"] for r in sel]
        axes[0].plot(c, [r["texts_per_s"] for r in sel], "o-", label=f"{k} text(s)/request")
        axes[1].plot(c, [1000 * r["p99_s"] for r in sel], "o-", label=f"p99, {k}/request")
        axes[1].plot(c, [1000 * r["p50_s"] for r in sel], "x--", label=f"p50, {k}/request")
    axes[0].axhline(off["texts_per_s"], color="gray", ls=":",
                    label=f"offline, batch {off['batch']}")
    for ax, title, unit in ((axes[0], "throughput", "texts/s"), (axes[1], "latency", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.legend(fontsize=8)
    shown = TARGET_CONCURRENCY if any(r["concurrency"] == TARGET_CONCURRENCY for r in rows) \
        else max(r["concurrency"] for r in rows)
    target = next((r for r in rows if r["concurrency"] == shown
                   and r["texts_per_request"] == 1), rows[0])
    hist = target["batch_sizes"]
    axes[2].bar(range(len(hist)), list(hist.values()))
    axes[2].set_xticks(range(len(hist)), [f"<={k}" for k in hist], fontsize=8)
    axes[2].set_title(f"batch sizes, concurrency {target['concurrency']}, 1 text/request")
    axes[2].set_ylabel("forward passes")
    save_figure(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a training workdir or an exported model")
    parser.add_argument("--quick", action="store_true", help="a short sweep, for tests")
    parser.add_argument("--concurrency", type=int_list, default=None)
    parser.add_argument("--texts-per-request", type=int_list, default=None)
    parser.add_argument("--seconds", type=float, default=None, help="per setting")
    parser.add_argument("--offline-repeats", type=int, default=None)
    parser.add_argument("--n-texts", type=int, default=None, help="demo test texts used")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--batch-buckets", default=None,
                        help="the server's --batch-buckets (default: its own)")
    parser.add_argument("--max-queue", type=int, default=256)
    parser.add_argument("--out", default=None, help="write serve_load.json and .png here")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    args = fill_defaults(args, QUICK if args.quick else FULL)
    texts = demo_texts(args.n_texts)

    log(f"starting the server on {args.model}")
    flags = ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
             "--max-queue", str(args.max_queue), "--max-texts", str(max(args.texts_per_request))]
    if args.batch_buckets:
        flags += ["--batch-buckets", args.batch_buckets]
    server = ServerProcess(args.model, flags)
    rows = []
    try:
        ready_s = server.wait_ready()
        log(f"ready in {ready_s:.1f} s")
        for k in args.texts_per_request:
            for c in args.concurrency:
                def snapshot() -> dict[str, Any]:
                    return {"metrics": server.metrics(), "server_cpu": server.cpu_seconds(),
                            "client_cpu": time.process_time()}

                row = asyncio.run(drive(server.url, texts, k, c, args.seconds,
                                        min(1.0, args.seconds / 2), snapshot))
                a, b = row.pop("start"), row.pop("end")
                row.update(concurrency=c, texts_per_request=k,
                           batch_sizes=batch_histogram(a["metrics"], b["metrics"]),
                           # where the 2 cores went: the server process, the HTTP client
                           server_cpu_s=None if a["server_cpu"] is None
                           else b["server_cpu"] - a["server_cpu"],
                           client_cpu_s=b["client_cpu"] - a["client_cpu"])
                rows.append(row)
                log(f"{k} text(s)/request, {c} clients: {row['texts_per_s']:.0f} texts/s, "
                    f"p99 {1000 * row['p99_s']:.1f} ms, {row['failed']} failed")
        after = server.metrics()
    finally:
        exit_code = server.stop()
    compiles = after.get('mtop_compiles_total{phase="serving"}', float("nan"))
    log(f"offline predictor, batch {args.max_batch}")
    off = offline(args.model, texts, args.max_batch, args.offline_repeats)
    log("cold start of mtop-jax predict")
    cold = cold_start(args.model)

    table = markdown_table(
        ["texts/request", "clients", "requests/s", "texts/s", "p50 ms", "p95 ms", "p99 ms",
         "failed", "mean batch", "server CPU ms/request", "client CPU ms/request"],
        [[r["texts_per_request"], r["concurrency"], fmt(r["requests_per_s"]),
          fmt(r["texts_per_s"]), fmt(1000 * r["p50_s"]), fmt(1000 * r["p95_s"]),
          fmt(1000 * r["p99_s"]), r["failed"], fmt(mean_batch(r["batch_sizes"], r)),
          fmt(per_request(r["server_cpu_s"], r)), fmt(per_request(r["client_cpu_s"], r))]
         for r in rows])
    print(f"## mtop-jax serve, {Path(args.model).name}: --max-batch {args.max_batch} "
          f"--max-wait-ms {args.max_wait_ms:g}, {args.seconds:g} s per setting\n")
    print(table)
    print(f"\nOffline predictor, batch {off['batch']}: {fmt(off['texts_per_s'])} texts/s "
          f"(a batch of {off['batch']}: {fmt(1000 * off['batch_time_s'])} ms). Server ready "
          f"{ready_s:.1f} s after start; `mtop-jax predict` cold start {cold:.1f} s for one "
          f"text; compiles after ready: {compiles:g}; server exit code {exit_code}.\n")
    found = checks(rows, off, args, compiles)
    print("## Targets\n")
    for c in found:
        print(f"- {'PASS' if c['pass'] else 'MISS'} {c['name']}: {fmt(c['value'])} "
              f"(bound {c['bound']})")
    result = {"results": rows, "offline": off, "ready_s": ready_s, "predict_cold_start_s": cold,
              "compiles_after_ready": compiles, "server_exit_code": exit_code,
              "checks": found, "settings": {k: getattr(args, k) for k in (
                  "max_batch", "max_wait_ms", "max_queue", "seconds", "quick", "batch_buckets")},
              **environment(argv if argv is not None else sys.argv[1:])}
    if args.out:
        out = Path(args.out)
        write_json(out / "serve_load.json", result)
        if not args.no_plot:
            plot(rows, off, out / "serve_load.png")
        log(f"wrote {out / 'serve_load.json'}")
    return result


def per_request(seconds: float | None, row: dict) -> float | None:
    return None if seconds is None or not row["requests"] else 1000 * seconds / row["requests"]


def mean_batch(hist: dict[str, int], row: dict) -> float | None:
    passes = sum(hist.values())
    return row["ok"] * row["texts_per_request"] / passes if passes else None


if __name__ == "__main__":
    main()

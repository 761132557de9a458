"""Train-step throughput per mode and per loss-weighting method.

    python benchmarks/train_step.py --quick --out /tmp/bench
    python benchmarks/train_step.py --sizes minilm --out benchmarks/results/cpu

The real train step of ``mtop-jax train`` (``Run.train_step`` of
``mtop_jax.training.setup``: jitted with explicit shardings and the state
donated, on one device) on real
batches of the embedded demo set (``mtop_jax/data/debian-packages``, its 4 tasks),
with a random-weight encoder (``config.encoder = "random:<size>"``). For
every (size, L, B, mode, weighting method): compile time (lower + compile,
reported apart), then the median step time over repeats after warmup steps,
as examples/s, padded tokens/s (B L) and real tokens/s (attention mask), the
step's FLOPs (XLA's cost analysis), and the ratios to ``static`` weighting in
the same mode: the extra cost of gradient-based weighting (K per-task
backward passes) made visible.

Outputs: a Markdown table on stdout, ``train_step.json`` and
``train_step.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from benchmarks.common import (
    GB,
    compiled_flops,
    compiled_memory_bytes,
    default_memory_budget,
    environment,
    fill_defaults,
    fmt,
    gb,
    int_list,
    markdown_table,
    noise_note,
    pyplot,
    save_figure,
    str_list,
    summarize,
    time_calls,
    tree_bytes,
    write_json,
)
from mtop_jax.config.defaults import base_config
from mtop_jax.data.demo import debian_packages_config
from mtop_jax.data.pipeline import build_dataset
from mtop_jax.models.config import PRESETS
from mtop_jax.models.multitask import MODES, ModelConfig, MultiTaskModel
from mtop_jax.parallel.sharding import to_global
from mtop_jax.training.setup import load_tokenizer, setup
from mtop_jax.training.steps import BATCH_KEYS
from mtop_jax.weighting import WEIGHTINGS

METHODS = tuple(WEIGHTINGS)  # every registered method (mtop_jax.weighting.WEIGHTINGS)
DTYPES = ("float32", "bfloat16")

FULL = dict(sizes="tiny,minilm", modes=",".join(MODES), methods=",".join(METHODS),
            lengths="128", batches="32", prompts=4, repeats=10, warmup=2, max_seconds=120.0)
QUICK = dict(sizes="tiny", modes="mtop", methods="static,pcgrad", lengths="16", batches="4",
             prompts=2, repeats=2, warmup=1, max_seconds=10.0)


@dataclasses.dataclass(frozen=True)
class Setting:
    size: str
    length: int
    batch: int
    mode: str
    method: str

    def label(self) -> str:
        return f"{self.size} L={self.length} B={self.batch} {self.mode} {self.method}"


# ---------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Lists are comma-separated. Defaults are the full sweep; --quick changes the "
               f"defaults to {QUICK} (explicit flags still win).")
    p.add_argument("--sizes", help="encoder presets for random:<size>, of "
                   f"{sorted(PRESETS)} (default {FULL['sizes']})")
    p.add_argument("--modes", help=f"of {list(MODES)} (default: all)")
    p.add_argument("--methods", help=f"weighting methods, of {list(METHODS)} (default: all)")
    p.add_argument("--lengths", help=f"sequence lengths L, batches padded to L "
                   f"(default {FULL['lengths']})")
    p.add_argument("--batches", help=f"batch sizes B (default {FULL['batches']})")
    p.add_argument("--prompts", type=int, help="prompt length P of mtop and prefix "
                   f"(default {FULL['prompts']})")
    p.add_argument("--repeats", type=int, help=f"timed steps (default {FULL['repeats']})")
    p.add_argument("--warmup", type=int, help=f"untimed steps first (default {FULL['warmup']})")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="compute dtype (params stay float32)")
    p.add_argument("--max-mem-gb", type=float, default=None,
                   help="skip settings that need more: estimated from the parameter count "
                        "before building (params, gradients, Adam moments, per-task "
                        "gradients), then from XLA's memory analysis of the compiled step; "
                        "default 90%% of an accelerator's memory, half the host RAM on CPU")
    p.add_argument("--max-seconds", type=float,
                   help="time budget per setting: skipped when one step is predicted (its "
                        "FLOPs at the best FLOP rate measured so far for the same size) to "
                        "take longer; timing "
                        f"stops early once the timed steps add up to it "
                        f"(default {FULL['max_seconds']:g})")
    p.add_argument("--out", type=Path, help="directory for train_step.json and .png")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--quick", action="store_true",
                   help="a tiny sweep: about a minute on a 2-core CPU (two train-step compiles)")
    args = p.parse_args(argv)
    fill_defaults(args, QUICK if args.quick else FULL)
    try:
        args.sizes = str_list(args.sizes, tuple(PRESETS))
        args.modes = str_list(args.modes, MODES)
        args.methods = str_list(args.methods, METHODS)
        args.lengths = int_list(args.lengths)
        args.batches = int_list(args.batches)
    except ValueError as e:
        p.error(str(e))
    if args.repeats < 1 or args.warmup < 0 or args.prompts < 1:
        p.error("--repeats and --prompts must be >= 1, --warmup >= 0")
    if args.max_mem_gb is None:
        args.max_mem_gb = default_memory_budget()
    return args


def settings(args: argparse.Namespace) -> list[Setting]:
    # static first in every mode: the reference of the ratios, and the cheapest step.
    methods = sorted(args.methods, key=lambda m: (m != "static", METHODS.index(m)))
    return [Setting(size, length, batch, mode, method)
            for size in args.sizes for length in args.lengths for batch in args.batches
            for mode in args.modes for method in methods]


def make_config(s: Setting, args: argparse.Namespace):
    c = base_config()
    c.encoder = f"random:{s.size}"
    c.model.mode = s.mode
    c.model.num_prompts = args.prompts
    c.model.dtype = args.dtype
    c.data = debian_packages_config()
    c.data.max_length = s.length
    c.data.buckets = None  # every batch padded to L: one compiled shape
    c.data.batch_size = s.batch
    c.data.eval_batch_size = s.batch
    c.data.max_examples = max(256, 8 * s.batch)
    c.weighting.method = s.method
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    c.train.steps = 100_000  # only sets the learning-rate schedule's length
    c.optim.warmup_steps = 0
    return c


# ---------------------------------------------------------------------------- one setting


class Data:
    """The tokenizer and each (L, B)'s dataset, built once and shared by the settings."""

    def __init__(self):
        self.tokenizer = None
        self.sets: dict[tuple[int, int], Any] = {}

    def get(self, config, s: Setting):
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(config)
        key = (s.length, s.batch)
        if key not in self.sets:
            self.sets[key] = build_dataset(config.data, self.tokenizer, "train")
        return self.tokenizer, self.sets[key]


def estimated_bytes(s: Setting, args, vocab_size: int, num_tasks: int, grad_based: bool) -> int:
    """Parameters x (param, gradient, 2 Adam moments, + K per-task gradients if gradient-based)."""
    enc = PRESETS[s.size].replace(vocab_size=vocab_size)
    cfg = ModelConfig(mode=s.mode, num_prompts=args.prompts, dtype=args.dtype)
    tasks = [(f"task{t}", 2) for t in range(num_tasks)]
    abstract = nnx.eval_shape(lambda: MultiTaskModel(enc, cfg, tasks, rngs=nnx.Rngs(0)))
    params = tree_bytes(nnx.state(abstract, nnx.Param))
    return params * (4 + (num_tasks if grad_based else 0))


def run_setting(s: Setting, args: argparse.Namespace, data: Data,
                best_rate: dict[str, float]) -> dict[str, Any]:
    config = make_config(s, args)
    row: dict[str, Any] = {**dataclasses.asdict(s), "prompts": args.prompts,
                           "dtype": args.dtype, "status": "ok", "skip_reason": None,
                           "kind": WEIGHTINGS[s.method].kind}
    enc = PRESETS[s.size]
    if s.length > enc.max_length:
        return skipped(row, f"L={s.length} > the {s.size} position table ({enc.max_length})")
    tokenizer, dataset = data.get(config, s)
    row["tasks"] = len(dataset.tasks)
    row["estimated_bytes"] = estimated_bytes(s, args, len(tokenizer), len(dataset.tasks),
                                             row["kind"] == "grad")
    if row["estimated_bytes"] > args.max_mem_gb * GB:
        return skipped(row, f"memory: ~{gb(row['estimated_bytes'])} of parameters, "
                            f"gradients and optimizer state > --max-mem-gb "
                            f"{args.max_mem_gb:.3g}")

    t0 = time.perf_counter()
    device = jax.devices()[0]
    run = setup(config, dataset.tasks, tokenizer, devices=[device])
    row["setup_s"] = time.perf_counter() - t0
    step = run.train_step  # the trainer's own jitted step
    iterator = dataset.train_iterator(seed=0)
    host_batches = [next(iterator) for _ in range(min(8, args.warmup + args.repeats))]
    batches = [to_global(b, run.data_sharding, BATCH_KEYS) for b in host_batches]
    row["real_tokens_per_example"] = float(np.mean(
        [b["attention_mask"].sum() / b["attention_mask"].shape[0] for b in host_batches]))

    t0 = time.perf_counter()
    lowered = step.lower(run.state, batches[0])
    row["lower_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    row["compile_s"] = row["lower_s"] + time.perf_counter() - t0
    row["flops"] = compiled_flops(compiled)
    row["memory_bytes"] = compiled_memory_bytes(compiled)
    if row["memory_bytes"] is not None and row["memory_bytes"] > args.max_mem_gb * GB:
        return skipped(row, f"memory: needs {gb(row['memory_bytes'])} > "
                            f"--max-mem-gb {args.max_mem_gb:.3g}")
    if row["flops"] and best_rate.get(s.size):
        predicted = row["flops"] / best_rate[s.size]
        if predicted > args.max_seconds:
            return skipped(row, f"time: ~{predicted:.0f} s per step > --max-seconds "
                                f"{args.max_seconds:g}")

    held = {"state": run.state, "metrics": None}
    cycle = itertools.cycle(batches)

    def one_step():
        held["state"], held["metrics"] = compiled(held["state"], next(cycle))
        return held["state"], held["metrics"]

    times = time_calls(one_step, repeats=args.repeats, warmup=args.warmup,
                       max_seconds=args.max_seconds)
    row.update(summarize(times))
    row["finite"] = bool(held["metrics"]["finite"])
    row["examples_per_s"] = s.batch / row["median_s"]
    row["tokens_per_s"] = s.batch * s.length / row["median_s"]
    row["real_tokens_per_s"] = row["examples_per_s"] * row["real_tokens_per_example"]
    if row["flops"]:
        row["flops_per_s"] = row["flops"] / row["median_s"]
        best_rate[s.size] = max(best_rate.get(s.size, 0.0), row["flops_per_s"])
    return row


def skipped(row: dict[str, Any], reason: str) -> dict[str, Any]:
    row.update(status="skipped", skip_reason=reason)
    return row


# ---------------------------------------------------------------------------- report


def group_key(r: dict[str, Any]) -> tuple:
    return (r["size"], r["length"], r["batch"])


def ok(r: dict[str, Any] | None) -> bool:
    return r is not None and r["status"] == "ok"


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Throughput, step time and FLOPs relative to ``static`` in the same mode."""
    index = {(*group_key(r), r["mode"], r["method"]): r for r in rows}
    for r in rows:
        ref = index.get((*group_key(r), r["mode"], "static"))
        r["throughput_vs_static"] = (r["examples_per_s"] / ref["examples_per_s"]
                                     if ok(r) and ok(ref) else None)
        r["time_vs_static"] = (r["median_s"] / ref["median_s"] if ok(r) and ok(ref) else None)
        r["flops_vs_static"] = (r["flops"] / ref["flops"]
                                if ref and r.get("flops") and ref.get("flops") else None)


def report(rows: list[dict[str, Any]], args, env) -> str:
    lines = [f"# Train step: {env['device']} ({env['platform']}), jax {env['jax_version']}, "
             f"{args.dtype}", "",
             "compile: lower + compile of the jitted step, seconds, not in the rates; "
             "ms/step: median over the repeats; spread: (max - min) / median; tokens/s: "
             "B L padded tokens; real tok/s: non-padding tokens (attention mask); "
             "time / static and FLOPs / static: against static weighting in the same mode."]
    by_group = defaultdict(list)
    for r in rows:
        by_group[group_key(r)].append(r)
    for (size, length, batch), group in by_group.items():
        tasks = next((r["tasks"] for r in group if r.get("tasks")), "?")
        lines += ["", f"## {size}, L={length}, B={batch}, {tasks} tasks, P={args.prompts}", ""]
        table = []
        for r in group:
            head = [r["mode"], r["method"], r["kind"]]
            gflop = fmt(r["flops"] / 1e9) if r.get("flops") else "-"
            if r["status"] != "ok":
                table.append([*head, fmt(r.get("compile_s")), f"skipped ({r['skip_reason']})",
                              "", "", "", "", gflop, "", fmt(r.get("flops_vs_static"))])
                continue
            spread = f"{100 * r['spread']:.1f}%" + (
                "" if r["repeats"] >= args.repeats else f" (n={r['repeats']})")
            table.append([*head, fmt(r["compile_s"]), fmt(1e3 * r["median_s"]), spread,
                          fmt(r["examples_per_s"]), fmt(r["tokens_per_s"]),
                          fmt(r["real_tokens_per_s"]), gflop, fmt(r.get("time_vs_static")),
                          fmt(r.get("flops_vs_static"))])
        lines.append(markdown_table(
            ["mode", "method", "kind", "compile s", "ms/step", "spread", "examples/s",
             "tokens/s", "real tok/s", "GFLOP/step", "time / static", "FLOPs / static"],
            table, align="lllrrrrrrrrr"))
    note = noise_note(rows, lambda r: Setting(**{f.name: r[f.name] for f in
                                                  dataclasses.fields(Setting)}).label())
    if note:
        lines += ["", note]
    bad = [r for r in rows if ok(r) and not r["finite"]]
    if bad:
        lines += ["", "Non-finite loss or gradient in the last timed step (not applied): "
                  + ", ".join(f"{r['mode']}/{r['method']}" for r in bad)]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, args, env) -> None:
    plt = pyplot()
    groups = sorted({group_key(r) for r in rows})
    fig, axes = plt.subplots(len(groups), 3, figsize=(17, 4.2 * len(groups)), squeeze=False)
    methods = [m for m in METHODS if m in args.methods]
    modes = [m for m in MODES if m in args.modes]
    width = 0.8 / max(1, len(modes))
    x = np.arange(len(methods))
    for g, (ax_thr, ax_rel, ax_comp) in zip(groups, axes):
        index = {(r["mode"], r["method"]): r for r in rows if group_key(r) == g}
        for i, mode in enumerate(modes):
            get = lambda field, mode=mode, index=index: [
                (index.get((mode, m)) or {}).get(field) or 0.0 for m in methods]
            offset = x + (i - (len(modes) - 1) / 2) * width
            ax_thr.bar(offset, get("examples_per_s"), width, label=mode)
            ax_rel.bar(offset, get("time_vs_static"), width, label=mode)
            ax_comp.bar(offset, get("compile_s"), width, label=mode)
        title = f"{g[0]}, L={g[1]}, B={g[2]}"
        ax_thr.set(title=f"train step throughput, {title}", ylabel="examples / s")
        ax_rel.set(title="step time / static (same mode)", ylabel="ratio")
        ax_rel.axhline(1.0, color="gray", linewidth=0.8)
        ax_comp.set(title="compile time (lower + compile)", ylabel="seconds")
        for ax in (ax_thr, ax_rel, ax_comp):
            ax.set_xticks(x, methods, rotation=30, ha="right")
            ax.grid(True, axis="y", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"{env['device']} ({env['platform']}), jax {env['jax_version']}, "
                 f"{args.dtype}; 0 = skipped")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


# ---------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    env = environment(argv if argv is not None else sys.argv[1:])
    data = Data()
    rows: list[dict[str, Any]] = []
    best_rate: dict[str, float] = {}
    progress = tqdm(settings(args), desc="train_step", unit="setting", dynamic_ncols=True)
    for s in progress:
        progress.set_postfix_str(s.label())
        row = run_setting(s, args, data, best_rate)
        rows.append(row)
        done = (f"{row['examples_per_s']:.4g} examples/s, compile {row['compile_s']:.1f} s"
                if row["status"] == "ok" else f"skipped ({row['skip_reason']})")
        tqdm.write(f"{s.label()}: {done}", file=sys.stderr)
    add_ratios(rows)
    result = {**env, "benchmark": "train_step",
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "results": rows}
    print(report(rows, args, env))
    if args.out is not None:
        write_json(args.out / "train_step.json", result)
        if not args.no_plot:
            plot(rows, args.out / "train_step.png", args, env)
        print(f"\nwrote {args.out / 'train_step.json'}"
              + ("" if args.no_plot else f" and {args.out / 'train_step.png'}"))
    return result


if __name__ == "__main__":
    main()

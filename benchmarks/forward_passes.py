"""Forward-pass throughput: MTOP's one pass against N passes (DESIGN.md I3).

    python benchmarks/forward_passes.py --quick --out /tmp/bench
    python benchmarks/forward_passes.py --sizes minilm --tasks 1,2,4,8,16,32 \\
        --lengths 128 --batches 32 --prompts 4 --out benchmarks/results/cpu

For every (model size, sequence length L, batch B, prompt length P, number of
tasks N, mode) the script compiles ``model.logits(ids, mask)`` of a
random-weight model ahead of time, reads its FLOPs from XLA's cost analysis,
then times it (compile excluded, ``block_until_ready``, median of repeats after
warmup calls). Modes:

- ``mtop``: the fast path, all N tasks in one pass;
- ``mtop-dense``: the same model through the dense (L + N P)^2 masked reference;
- ``prefix``: prefix tuning as its users serve it: N passes of B rows, one per task
  (one compiled one-task program called with each task's prefix and head; the
  encoder's weights are shared);
- ``prefix-folded``: the same N passes folded into one batch of N B rows (one
  program): an extra row, not what a prefix-tuning user runs;
- ``single``: N separately fine-tuned encoders as their users serve them: N passes
  of B rows, each through its own encoder's weights;
- ``single-folded``: the N encoders stacked on a task axis, one program (an extra row);
- ``shared``: one plain pass and N heads, the floor that no mode can beat.

The N-passes rows count the FLOPs and the time of all N calls (the calls are
dispatched back to back and waited for once, at the end).

Outputs: Markdown tables on stdout, ``forward_passes.json`` and
``forward_passes.png`` in ``--out``. Settings too big for the memory budget or
the time budget are reported as skipped rows with the reason, never run.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
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
    padded_batch,
    pyplot,
    random_state,
    save_figure,
    str_list,
    summarize,
    time_calls,
    tree_bytes,
    with_new_task_variables,
    write_json,
)
from mtop_jax.models.config import PRESETS
from mtop_jax.models.multitask import ModelConfig, MultiTaskModel

MODES = ("mtop", "mtop-dense", "prefix", "prefix-folded", "single", "single-folded", "shared")
#: the modes that P applies to
PROMPT_MODES = ("mtop", "mtop-dense", "prefix", "prefix-folded")
#: N passes of B rows, one call per task (what users of these methods run)
PASS_MODES = ("prefix", "single")
#: Cheapest first within one N: the FLOP-rate estimate (time guard) comes from them.
MODE_ORDER = ("shared", "mtop", "mtop-dense", "prefix", "prefix-folded", "single",
              "single-folded")
DTYPES = ("float32", "bfloat16")

#: The issue's targets: minilm, L=128, B=32, P=4.
TARGET = {"size": "minilm", "length": 128, "batch": 32, "prompts": 4}
TARGET_N = 16
TARGET_VS_PREFIX = 9.0
TARGET_VS_SHARED = 0.6
TARGET_COST_FACTOR = 1.2
TARGET_DENSE_FROM_N = 8

FULL = dict(sizes="tiny,minilm,bert-base,bert-large", modes=",".join(MODES),
            tasks="1,2,4,8,16,32,64", prompts="4", lengths="128", batches="32", repeats=5,
            warmup=1, max_seconds=120.0)
QUICK = dict(sizes="tiny", modes=",".join(MODES), tasks="1,4", prompts="2", lengths="16",
             batches="4", repeats=2, warmup=1, max_seconds=10.0)


@dataclasses.dataclass(frozen=True)
class Setting:
    size: str
    length: int
    batch: int
    tasks: int
    mode: str
    prompts: int | None  # None for the modes without prompts (shared, single)

    def label(self) -> str:
        p = f" P={self.prompts}" if self.prompts is not None else ""
        return f"{self.size} L={self.length} B={self.batch} N={self.tasks} {self.mode}{p}"


# ---------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Lists are comma-separated. Defaults are the full sweep; --quick changes the "
               f"defaults to {QUICK} (explicit flags still win).")
    p.add_argument("--sizes", help=f"encoder presets, of {sorted(PRESETS)} "
                   f"(default {FULL['sizes']})")
    p.add_argument("--modes", help=f"of {list(MODES)} (default: all)")
    p.add_argument("--tasks", help=f"numbers of tasks N (default {FULL['tasks']})")
    p.add_argument("--prompts", help=f"prompt lengths P (default {FULL['prompts']})")
    p.add_argument("--lengths", help=f"sequence lengths L (default {FULL['lengths']})")
    p.add_argument("--batches", help=f"batch sizes B (default {FULL['batches']})")
    p.add_argument("--repeats", type=int, help=f"timed calls per setting "
                   f"(default {FULL['repeats']})")
    p.add_argument("--warmup", type=int, help="untimed calls first (default 1)")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="compute dtype (params stay float32)")
    p.add_argument("--max-param-gb", type=float, default=8.0,
                   help="skip settings whose parameters need more (from nnx.eval_shape; "
                        "default 8)")
    p.add_argument("--max-mem-gb", type=float, default=None,
                   help="skip settings whose compiled program needs more (XLA memory "
                        "analysis: arguments + outputs + temporaries); default 90%% of an "
                        "accelerator's memory, half the host RAM on CPU")
    p.add_argument("--max-seconds", type=float,
                   help="time budget per setting: a setting whose one call is predicted "
                        "(its FLOPs at the best FLOP rate measured so far for the same size) "
                        "to take longer is "
                        "skipped, and timing stops early once the timed calls add up to it "
                        f"(default {FULL['max_seconds']:g})")
    p.add_argument("--out", type=Path, help="directory for forward_passes.json and .png")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--quick", action="store_true", help="a tiny sweep that runs in seconds")
    args = p.parse_args(argv)
    fill_defaults(args, QUICK if args.quick else FULL)
    try:
        args.sizes = str_list(args.sizes, tuple(PRESETS))
        args.modes = str_list(args.modes, MODES)
        args.tasks = int_list(args.tasks)
        args.prompts = int_list(args.prompts)
        args.lengths = int_list(args.lengths)
        args.batches = int_list(args.batches)
    except ValueError as e:
        p.error(str(e))
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    if args.max_mem_gb is None:
        args.max_mem_gb = default_memory_budget()
    return args


def settings(args: argparse.Namespace) -> list[Setting]:
    """Every setting of the sweep, per (size, L, B) by growing N, cheapest mode first."""
    out = []
    for size in args.sizes:
        for length in args.lengths:
            for batch in args.batches:
                for n in sorted(set(args.tasks)):
                    for mode in MODE_ORDER:
                        if mode not in args.modes:
                            continue
                        prompts = args.prompts if mode in PROMPT_MODES else [None]
                        out.extend(Setting(size, length, batch, n, mode, p) for p in prompts)
    return out


# ---------------------------------------------------------------------------- one setting


def model_config(s: Setting, dtype: str) -> ModelConfig:
    base = "mtop" if s.mode.startswith("mtop") else s.mode.removesuffix("-folded")
    return ModelConfig(mode=base, num_prompts=s.prompts or 1,
                       attention="dense" if s.mode == "mtop-dense" else "fast", dtype=dtype)


def run_setting(s: Setting, args: argparse.Namespace,
                best_rate: dict[str, float]) -> dict[str, Any]:
    """Compile, check the budgets, time. ``best_rate``: size -> the best FLOP/s measured so
    far for that size (the time guard's estimate; updated here)."""
    enc = PRESETS[s.size]
    row: dict[str, Any] = {**dataclasses.asdict(s), "dtype": args.dtype, "status": "ok",
                           "skip_reason": None}
    if s.length > enc.max_length:
        return skipped(row, f"L={s.length} > the {s.size} position table ({enc.max_length})")
    tasks = [(f"task{t}", 3) for t in range(s.tasks)]
    cfg = model_config(s, args.dtype)
    passes = s.tasks if s.mode in PASS_MODES else 1  # calls of one program per batch

    def create(tasks=tasks):
        return MultiTaskModel(enc, cfg, tasks, rngs=nnx.Rngs(0))

    # All N tasks' parameters count, whether one program holds them or N calls share them.
    row["param_bytes"] = tree_bytes(nnx.state(nnx.eval_shape(create), nnx.Param))
    if row["param_bytes"] > args.max_param_gb * GB:
        return skipped(row, f"memory: parameters need {gb(row['param_bytes'])} > "
                            f"--max-param-gb {args.max_param_gb:.3g}")
    abstract = nnx.eval_shape(lambda: create(tasks[:1] if passes > 1 else tasks))
    abstract.eval()  # dropout off
    graphdef, abstract_state = nnx.split(abstract)

    fn = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state).logits(ids, mask))
    spec = jax.ShapeDtypeStruct((s.batch, s.length), jnp.int32)
    t0 = time.perf_counter()
    compiled = fn.lower(abstract_state, spec, spec).compile()
    row["compile_s"] = time.perf_counter() - t0
    row["passes"] = passes
    flops = compiled_flops(compiled)
    row["flops"] = flops * passes if flops is not None else None
    row["flops_per_seq"] = row["flops"] / s.batch if row["flops"] is not None else None
    row["memory_bytes"] = compiled_memory_bytes(compiled)
    if row["memory_bytes"] is not None and passes > 1:  # the other tasks' parameters
        row["memory_bytes"] += row["param_bytes"] - tree_bytes(
            nnx.state(abstract, nnx.Param))
    if row["memory_bytes"] is not None and row["memory_bytes"] > args.max_mem_gb * GB:
        return skipped(row, f"memory: needs {gb(row['memory_bytes'])} > "
                            f"--max-mem-gb {args.max_mem_gb:.3g}")
    if row["flops"] and best_rate.get(s.size):
        predicted = row["flops"] / best_rate[s.size]
        if predicted > args.max_seconds:
            return skipped(row, f"time: ~{predicted:.0f} s per call > --max-seconds "
                                f"{args.max_seconds:g}")

    ids, mask = padded_batch(s.batch, s.length, enc.vocab_size)
    if passes > 1:
        states = task_states(abstract_state, passes, share_backbone=s.mode == "prefix")
        call = lambda: [compiled(state, ids, mask) for state in states]
    else:
        state = random_state(abstract_state)
        call = lambda: compiled(state, ids, mask)
    times = time_calls(call, repeats=args.repeats, warmup=args.warmup,
                       max_seconds=args.max_seconds)
    row.update(summarize(times))
    row["seq_per_s"] = s.batch / row["median_s"]
    if row["flops"]:
        row["flops_per_s"] = row["flops"] / row["median_s"]
        best_rate[s.size] = max(best_rate.get(s.size, 0.0), row["flops_per_s"])
    return row


def task_states(abstract_state, n: int, *, share_backbone: bool) -> list:
    """``n`` random states of a one-task model, one per task.

    ``share_backbone`` (prefix tuning: one base model, N prefixes and heads): the
    encoder's arrays are the same objects in every state and only the per-task
    variables differ. Otherwise (N fine-tuned models) every state is drawn whole, so
    each pass reads its own weights, as N separate models do.
    """
    if not share_backbone:
        return [random_state(abstract_state, seed=t) for t in range(n)]
    base = random_state(abstract_state, seed=0)
    return [base, *(with_new_task_variables(base, seed=t) for t in range(1, n))]


def skipped(row: dict[str, Any], reason: str) -> dict[str, Any]:
    row.update(status="skipped", skip_reason=reason)
    return row


# ---------------------------------------------------------------------------- derived numbers


def group_key(r: dict[str, Any]) -> tuple:
    return (r["size"], r["length"], r["batch"])


def ok(r: dict[str, Any] | None) -> bool:
    return r is not None and r["status"] == "ok"


def add_ratios(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Throughput and FLOP ratios to ``shared`` and ``prefix`` at the same (size, L, B, N)."""
    index = {(*group_key(r), r["tasks"], r["mode"], r["prompts"]): r for r in rows}
    for r in rows:
        shared = index.get((*group_key(r), r["tasks"], "shared", None))
        prefix = index.get((*group_key(r), r["tasks"], "prefix",
                            r["prompts"] if r["prompts"] is not None else args.prompts[0]))
        r["flops_vs_shared"] = (r["flops"] / shared["flops"]
                                if shared and r.get("flops") and shared.get("flops") else None)
        r["flops_vs_prefix"] = (r["flops"] / prefix["flops"]
                                if prefix and r.get("flops") and prefix.get("flops") else None)
        r["throughput_vs_shared"] = (r["seq_per_s"] / shared["seq_per_s"]
                                     if ok(r) and ok(shared) else None)
        r["throughput_vs_prefix"] = (r["seq_per_s"] / prefix["seq_per_s"]
                                     if ok(r) and ok(prefix) else None)
        r["relative_cost"] = (r["median_s"] / shared["median_s"]
                              if ok(r) and ok(shared) else None)


def per_task_costs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For ``mtop`` and ``mtop-dense``: the cost of one more task, as a fraction of a plain
    pass, against the extra tokens' share P/L.

    From time: (t(N) - t(N0)) / (N - N0) / t_shared, N0 the smallest N measured and
    t_shared the ``shared`` pass at N0; the summary is the least-squares slope of t(N)
    over every N, divided by t_shared. The same from FLOPs.
    """
    out = []
    keys = sorted({(*group_key(r), r["prompts"], r["mode"]) for r in rows
                   if r["mode"] in ("mtop", "mtop-dense")})
    for size, length, batch, prompts, mode in keys:
        mine = sorted((r for r in rows if (*group_key(r), r["prompts"], r["mode"])
                       == (size, length, batch, prompts, mode)), key=lambda r: r["tasks"])
        shared = sorted((r for r in rows if group_key(r) == (size, length, batch)
                         and r["mode"] == "shared"), key=lambda r: r["tasks"])
        base_shared = shared[0] if shared else None
        entry: dict[str, Any] = {"size": size, "length": length, "batch": batch,
                                 "prompts": prompts, "mode": mode,
                                 "p_over_l": prompts / length, "per_n": []}
        timed = [r for r in mine if ok(r)]
        counted = [r for r in mine if r.get("flops")]
        for kind, have, field, ref in (("time", timed, "median_s", base_shared),
                                       ("flops", counted, "flops", base_shared)):
            ref_value = ref.get(field) if ref and (kind == "flops" or ok(ref)) else None
            if len(have) >= 2 and ref_value:
                n = np.array([r["tasks"] for r in have], float)
                y = np.array([r[field] for r in have], float)
                entry[f"slope_{kind}"] = float(np.polyfit(n, y, 1)[0] / ref_value)
            else:
                entry[f"slope_{kind}"] = None
            if have and ref_value:
                n0, y0 = have[0]["tasks"], have[0][field]
                for r in have[1:]:
                    r[f"cost_per_task_{kind}"] = (r[field] - y0) / (r["tasks"] - n0) / ref_value
        for r in mine:
            if r["tasks"] == mine[0]["tasks"]:
                continue
            entry["per_n"].append({"tasks": r["tasks"],
                                   "time": r.get("cost_per_task_time"),
                                   "flops": r.get("cost_per_task_flops")})
        out.append(entry)
    return out


def checks(rows: list[dict[str, Any]], costs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, evaluated for every (size, L, B, P) with the data they need;
    ``target`` marks the setting the issue states them for (minilm, L=128, B=32, P=4)."""
    out = []
    index = {(*group_key(r), r["tasks"], r["mode"], r["prompts"]): r for r in rows}
    groups = sorted({(*group_key(r), r["prompts"]) for r in rows if r["mode"] == "mtop"})
    for size, length, batch, prompts in groups:
        is_target = (size, length, batch, prompts) == tuple(TARGET.values())
        where = dict(size=size, length=length, batch=batch, prompts=prompts, target=is_target)
        g = (size, length, batch)
        mtop = index.get((*g, TARGET_N, "mtop", prompts))
        prefix = index.get((*g, TARGET_N, "prefix", prompts))
        shared = index.get((*g, TARGET_N, "shared", None))
        ideal = TARGET_N / (1 + TARGET_N * prompts / length)
        if ok(mtop) and ok(prefix):
            v = mtop["seq_per_s"] / prefix["seq_per_s"]
            out.append({**where, "name": f"mtop vs prefix at N={TARGET_N}", "value": v,
                        "threshold": TARGET_VS_PREFIX, "passed": v >= TARGET_VS_PREFIX,
                        "detail": f"ideal {ideal:.2f}x = N/(1+NP/L)"
                                  + (f", from FLOPs {prefix['flops'] / mtop['flops']:.2f}x"
                                     if mtop.get("flops") and prefix.get("flops") else "")})
        if ok(mtop) and ok(shared):
            v = mtop["seq_per_s"] / shared["seq_per_s"]
            out.append({**where, "name": f"mtop vs shared at N={TARGET_N}", "value": v,
                        "threshold": TARGET_VS_SHARED, "passed": v >= TARGET_VS_SHARED,
                        "detail": f"ideal {1 / (1 + TARGET_N * prompts / length):.3f}x "
                                  "= 1/(1+NP/L)"
                                  + (f", from FLOPs {shared['flops'] / mtop['flops']:.3f}x"
                                     if mtop.get("flops") and shared.get("flops") else "")})
        cost = next((c for c in costs if (c["size"], c["length"], c["batch"], c["prompts"],
                                          c["mode"]) == (size, length, batch, prompts, "mtop")),
                    None)
        if cost and cost["slope_time"] is not None:
            limit = TARGET_COST_FACTOR * cost["p_over_l"]
            v = cost["slope_time"]
            flops = cost["slope_flops"]
            out.append({**where, "name": "mtop cost per added task (time slope / t_shared)",
                        "value": v, "threshold": limit, "passed": v <= limit,
                        "detail": f"{v / cost['p_over_l']:.2f}x P/L (P/L = "
                                  f"{cost['p_over_l']:.4f}, limit {TARGET_COST_FACTOR}x)"
                                  + (f"; from FLOPs {flops:.4f} = "
                                     f"{flops / cost['p_over_l']:.2f}x P/L" if flops else "")})
        pairs = [(n, index.get((*g, n, "mtop", prompts)), index.get((*g, n, "mtop-dense",
                                                                     prompts)))
                 for n in sorted({r["tasks"] for r in rows if group_key(r) == g})
                 if n >= TARGET_DENSE_FROM_N]
        pairs = [(n, a["seq_per_s"] / b["seq_per_s"]) for n, a, b in pairs if ok(a) and ok(b)]
        if pairs:
            worst = min(v for _, v in pairs)
            out.append({**where, "name": f"mtop fast beats dense at N>={TARGET_DENSE_FROM_N}",
                        "value": worst, "threshold": 1.0, "passed": worst > 1.0,
                        "detail": "fast/dense throughput: "
                                  + ", ".join(f"N={n} {v:.2f}x" for n, v in pairs)})
    return out


# ---------------------------------------------------------------------------- report


def spread_text(r: dict[str, Any], repeats: int) -> str:
    text = f"{100 * r['spread']:.1f}%"
    return text if r["repeats"] >= repeats else f"{text} (n={r['repeats']})"


def report(rows, costs, found_checks, args, env) -> str:
    lines = [f"# Forward passes: {env['device']} ({env['platform']}), jax {env['jax_version']}, "
             f"{args.dtype}", ""]
    lines.append("seq/s: batch / median time of one call (compile excluded); spread: "
                 "(max - min) / median over the repeats; FLOPs from XLA's cost analysis; "
                 "x shared / x prefix: throughput ratios at the same N (prefix: N passes "
                 "of B rows); FLOPs / shared: relative cost by FLOPs. prefix and single: N "
                 "calls of B rows, one per task; *-folded: the same N passes as one batch "
                 "of N B rows (one program), an extra row.")
    by_group = defaultdict(list)
    for r in rows:
        by_group[group_key(r)].append(r)
    for (size, length, batch), group in by_group.items():
        lines += ["", f"## {size}, L={length}, B={batch}", ""]
        table = []
        for r in sorted(group, key=lambda r: (r["tasks"], MODES.index(r["mode"]),
                                              r["prompts"] or 0)):
            head = [r["tasks"], r["mode"], r["prompts"] if r["prompts"] is not None else "-"]
            gflop = fmt(r["flops_per_seq"] / 1e9) if r.get("flops_per_seq") else "-"
            if r["status"] != "ok":
                table.append([*head, f"skipped ({r['skip_reason']})", "", "", gflop,
                              fmt(r.get("flops_vs_shared")), "", ""])
                continue
            table.append([*head, fmt(r["seq_per_s"]), spread_text(r, args.repeats),
                          fmt(1e3 * r["median_s"]), gflop, fmt(r.get("flops_vs_shared")),
                          fmt(r.get("throughput_vs_shared")),
                          fmt(r.get("throughput_vs_prefix"))])
        lines.append(markdown_table(
            ["N", "mode", "P", "seq/s", "spread", "ms/batch", "GFLOP/seq", "FLOPs / shared",
             "x shared", "x prefix"], table, align="rlrrrrrrrr"))
    if costs:
        lines += ["", "## Cost of one more task (mtop), as a fraction of one plain pass", "",
                  "(t(N) - t(N0)) / (N - N0) / t_shared, N0 the smallest N; slope: "
                  "least-squares over every N. The ideal is about P/L (the extra tokens' "
                  "share of a pass).", ""]
        table = []
        for c in costs:
            for e in c["per_n"]:
                table.append([c["size"], c["length"], c["batch"], c["prompts"], c["mode"],
                              e["tasks"], fmt(e["time"]), fmt(e["flops"]),
                              fmt(c["p_over_l"]),
                              fmt(e["time"] / c["p_over_l"]) if e["time"] is not None
                              else "-"])
            table.append([c["size"], c["length"], c["batch"], c["prompts"], c["mode"],
                          "slope", fmt(c["slope_time"]), fmt(c["slope_flops"]),
                          fmt(c["p_over_l"]),
                          fmt(c["slope_time"] / c["p_over_l"]) if c["slope_time"] is not None
                          else "-"])
        lines.append(markdown_table(
            ["size", "L", "B", "P", "mode", "N", "time / task", "FLOPs / task", "P/L",
             "time / task / (P/L)"], table, align="lrrrlrrrrr"))
    lines += ["", "## Targets", ""]
    if not found_checks:
        lines.append("No setting has the data the targets need (mtop with prefix, shared or "
                     f"mtop-dense at N={TARGET_N} / N>={TARGET_DENSE_FROM_N}).")
    t = TARGET
    lines.append(f"The issue states the targets for {t['size']}, L={t['length']}, "
                 f"B={t['batch']}, P={t['prompts']} on the 2-core CPU; other settings are "
                 "informational.")
    lines.append("")
    for c in found_checks:
        tag = "TARGET" if c["target"] else "check "
        verdict = "PASS" if c["passed"] else "MISS"
        op = "<=" if "cost" in c["name"] else ">=" if "beats" not in c["name"] else ">"
        lines.append(f"- {tag} {verdict}: {c['name']} [{c['size']} L={c['length']} "
                     f"B={c['batch']} P={c['prompts']}]: {c['value']:.4g} (needs {op} "
                     f"{c['threshold']:.4g}); {c['detail']}")
    note = noise_note(rows, lambda r: Setting(**{f.name: r[f.name] for f in
                                                  dataclasses.fields(Setting)}).label())
    if note:
        lines += ["", note]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, args: argparse.Namespace, env) -> None:
    plt = pyplot()
    groups = sorted({(*group_key(r), p) for r in rows
                     for p in ([r["prompts"]] if r["prompts"] is not None else args.prompts)})
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 4.2 * len(groups)), squeeze=False)
    colors = dict(zip(MODES, ("tab:blue", "tab:cyan", "tab:orange", "tab:orange", "tab:red",
                              "tab:red", "tab:green")))
    markers = dict(zip(MODES, "osDD^^v"))
    for (size, length, batch, prompts), (ax_thr, ax_cost) in zip(groups, axes):
        for mode in MODES:
            pts = sorted((r for r in rows if ok(r) and group_key(r) == (size, length, batch)
                          and r["mode"] == mode and r["prompts"] in (prompts, None)),
                         key=lambda r: r["tasks"])
            if not pts:
                continue
            n = [r["tasks"] for r in pts]
            style = dict(color=colors[mode], marker=markers[mode], label=mode,
                         linestyle="--" if mode.endswith("-folded") else "-")
            ax_thr.plot(n, [r["seq_per_s"] for r in pts], **style)
            cost = [(r["tasks"], r["relative_cost"]) for r in pts if r.get("relative_cost")]
            if cost:
                ax_cost.plot(*zip(*cost), **style)
        ns = np.array(sorted({r["tasks"] for r in rows if group_key(r) == (size, length,
                                                                           batch)}), float)
        ax_cost.plot(ns, 1 + ns * prompts / length, color="gray", linestyle="--",
                     label="ideal one pass: 1 + NP/L")
        ax_cost.plot(ns, ns, color="gray", linestyle=":", label="N passes: N")
        title = f"{size}, L={length}, B={batch}, P={prompts}"
        ax_thr.set(title=f"throughput, {title}", xlabel="tasks N", ylabel="sequences / s")
        ax_cost.set(title=f"relative cost, {title}", xlabel="tasks N",
                    ylabel="time / shared time (same N)")
        for ax in (ax_thr, ax_cost):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"{env['device']} ({env['platform']}), jax {env['jax_version']}, "
                 f"{args.dtype}")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


# ---------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    env = environment(argv if argv is not None else sys.argv[1:])
    todo = settings(args)
    rows: list[dict[str, Any]] = []
    best_rate: dict[str, float] = {}
    progress = tqdm(todo, desc="forward", unit="setting", dynamic_ncols=True)
    for s in progress:
        progress.set_postfix_str(s.label())
        row = run_setting(s, args, best_rate)
        rows.append(row)
        done = (f"{row['seq_per_s']:.4g} seq/s" if row["status"] == "ok"
                else f"skipped ({row['skip_reason']})")
        tqdm.write(f"{s.label()}: {done}", file=sys.stderr)
    add_ratios(rows, args)
    costs = per_task_costs(rows)
    found = checks(rows, costs)
    result = {**env, "benchmark": "forward_passes",
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "results": rows, "cost_per_task": costs, "checks": found}
    print(report(rows, costs, found, args, env))
    if args.out is not None:
        write_json(args.out / "forward_passes.json", result)
        if not args.no_plot:
            plot(rows, args.out / "forward_passes.png", args, env)
        print(f"\nwrote {args.out / 'forward_passes.json'}"
              + ("" if args.no_plot else f" and {args.out / 'forward_passes.png'}"))
    return result


if __name__ == "__main__":
    main()

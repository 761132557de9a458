"""MTOP against what its peers run for N tasks, in one process (issue 18).

    make bench-peers                                      # the full comparison
    .venv-peers/bin/python benchmarks/peers.py --out benchmarks/results/peers
    .venv-peers/bin/python benchmarks/peers.py --quick --out /tmp/peers   # a smoke test

The same pretrained weights (MiniLM-L6 by default), fp32, on the CPU:

- ``torch-shared``: Hugging Face PyTorch ``AutoModel`` as a shared encoder, one pass of
  B rows and N linear heads on its pooled output;
- ``peft-prefix``: PEFT prefix tuning (``peft.PrefixTuningConfig``, P virtual tokens),
  one adapter per task on one base ``AutoModelForSequenceClassification``: N passes of
  B rows, ``set_adapter`` before each, the way a PEFT user serves N tasks (PEFT's
  mixed-adapter batches are LoRA-only);
- ``jax-shared``, ``mtop``, ``jax-prefix``: this project's ``shared`` (one pass),
  ``mtop`` (one pass for N tasks) and ``prefix`` (N calls of one compiled one-task
  program, B rows each, one prefix and head per task) modes, compiled ahead of time;
- ``mtop-recipe``: ``mtop`` with the model settings of ``configs/debian_packages.py``
  (the recipe the quality tables train: P, prompt depth and pooler from that file, so
  ``--prompts`` does not apply), for what serving the shipped recipe costs; its ratio
  is printed as information, the issue's targets stay on ``mtop`` (DESIGN.md's defaults);
- end to end, on real texts (the demo set's test split): ``mtop-predict``,
  ``mtop_jax.load(model).predict(texts)`` of an N-task model (``--predict-model``, a
  trained model or workdir; by default an ``mtop`` model built from the same encoder
  with random prompts and heads, saved and loaded through the public API), against
  ``hf-pipelines``: N ``pipeline("text-classification")`` models, each an
  ``AutoModelForSequenceClassification`` from the same weights with its own random head,
  each run over all the texts (every text answered for every task).

Timing: every variant is built, compiled and called ``--warmup`` times first (compile
excluded); then ``--rounds`` rounds, each timing every variant once (``--calls`` calls,
their median; the order rotates from round to round), so that a change in the
machine's load hits every variant alike. torch uses ``--threads`` threads (default:
every core), XLA its own pool over every core; the JAX variants split each batch's rows
over ``--cpu-devices`` XLA CPU devices (default: one per core, as many as divide B; see
``mtop_jax.parallel.host_cpu``; 1: one device, as before 2026-12-04). Throughput is
sequences (texts) answered for all N tasks per second. The ratios are paired: one per
round, from the same round's figures; the reported value is their median.

Output: a Markdown table (sequences/s per round, median, spread), the ratios with
PASS/MISS against the issue's targets, ``peers.json`` (every time, the versions of
jax, flax, torch, transformers and peft, the CPU) and ``peers.png`` in ``--out``.
torch, transformers' PyTorch models and peft are imported only by the variants that
need them: the JAX variants run without torch (``--variants jax-shared,mtop,...``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from benchmarks.common import (
    environment,
    fill_defaults,
    fmt,
    int_list,
    markdown_table,
    padded_batch,
    pyplot,
    save_figure,
    str_list,
    time_calls,
    with_new_task_variables,
    write_json,
)
from mtop_jax.parallel.host_cpu import default_host_cpu_devices, use_host_cpu_devices

FORWARD = ("torch-shared", "peft-prefix", "jax-shared", "mtop", "mtop-recipe", "jax-prefix")
END_TO_END = ("mtop-predict", "hf-pipelines")
VARIANTS = FORWARD + END_TO_END
TORCH_VARIANTS = ("torch-shared", "peft-prefix", "hf-pipelines")
NUM_CLASSES = 3  # of every random head

#: The issue's targets: (name, variant, against, N or None for every N, threshold).
TARGETS = (
    ("JAX shared vs PyTorch shared", "jax-shared", "torch-shared", None, 0.9),
    ("mtop vs PEFT prefix, N passes", "mtop", "peft-prefix", 8, 6.0),
    ("mtop vs PEFT prefix, N passes", "mtop", "peft-prefix", 16, 9.0),
    ("mtop vs JAX shared", "mtop", "jax-shared", 16, 0.65),
    ("load().predict vs N HF pipelines", "mtop-predict", "hf-pipelines", 8, 5.0),
)
#: Ratios printed beside the targets, without a verdict.
INFO_RATIOS = (
    ("mtop vs JAX prefix, N passes", "mtop", "jax-prefix"),
    ("JAX prefix vs PEFT prefix (both N passes)", "jax-prefix", "peft-prefix"),
    ("mtop vs PyTorch shared", "mtop", "torch-shared"),
    ("the shipped recipe's mtop vs JAX shared", "mtop-recipe", "jax-shared"),
)
#: The quality recipe whose model settings ``mtop-recipe`` serves.
RECIPE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "debian_packages.py"

FULL = dict(tasks="8,16", length=128, batch=32, prompts=4, rounds=3, calls=3, warmup=1,
            predict_tasks=8, predict_texts=128)
QUICK = dict(tasks="2", length=16, batch=4, prompts=2, rounds=1, calls=1, warmup=1,
             predict_tasks=2, predict_texts=8)


@dataclasses.dataclass
class Variant:
    """One timed thing: ``call`` answers ``rows`` sequences for ``tasks`` tasks."""

    name: str
    tasks: int
    rows: int
    passes: int  # encoder passes per call
    call: Callable[[], Any]
    detail: str = ""


# ---------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Defaults: {FULL}; --quick: {QUICK} (explicit flags still win).")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, of {list(VARIANTS)} (default: all)")
    p.add_argument("--tasks", help="numbers of tasks N of the forward variants (default 8,16)")
    p.add_argument("--length", type=int, help="tokens per sequence L (default 128)")
    p.add_argument("--batch", type=int, help="rows per pass B (default 32)")
    p.add_argument("--prompts", type=int, help="prompt / prefix length P (default 4)")
    p.add_argument("--rounds", type=int, help="alternating rounds (default 3)")
    p.add_argument("--calls", type=int, help="timed calls per variant per round, their "
                   "median is the round's figure (default 3)")
    p.add_argument("--warmup", type=int, help="untimed calls of each variant first (default 1)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch threads (default: every core, %(default)s here)")
    p.add_argument("--cpu-devices", type=int,
                   help="XLA CPU devices the JAX variants split each batch over (default: "
                        "the most, one per core, that divide --batch; 1: one device)")
    p.add_argument("--model", default="all-MiniLM-L6-v2",
                   help="the pretrained encoder all variants start from (default: the "
                        "offline MiniLM-L6)")
    p.add_argument("--predict-model", type=Path,
                   help="a trained model (workdir or export) for mtop-predict; default: an "
                        "mtop model of --predict-tasks tasks built from --model with random "
                        "prompts and heads")
    p.add_argument("--predict-tasks", type=int, help="tasks of the built model (default 8)")
    p.add_argument("--predict-texts", type=int, help="texts per end-to-end call, from the "
                   "demo set's test split (default 128)")
    p.add_argument("--predict-length", type=int,
                   help="max length of the built model and of the pipelines' truncation "
                        "(default --length; a given model keeps its own)")
    p.add_argument("--out", type=Path, help="directory for peers.json and peers.png")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round: a smoke test")
    args = p.parse_args(argv)
    fill_defaults(args, QUICK if args.quick else FULL)
    try:
        args.variants = str_list(args.variants, VARIANTS)
        args.tasks = sorted(set(int_list(args.tasks)))
    except ValueError as e:
        p.error(str(e))
    for name in ("length", "batch", "prompts", "rounds", "calls", "predict_tasks",
                 "predict_texts", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.predict_length is None:
        args.predict_length = args.length
    if args.cpu_devices is None:
        args.cpu_devices = default_host_cpu_devices(args.batch)
    if args.cpu_devices < 1 or args.batch % args.cpu_devices:
        p.error(f"--cpu-devices {args.cpu_devices}: must be >= 1 and divide --batch "
                f"{args.batch}")
    return args


# ---------------------------------------------------------------------------- JAX variants


def model_config(variant: str, prompts: int):
    """The ``ModelConfig`` a JAX variant runs: DESIGN.md's defaults with P = ``prompts``, or
    for ``mtop-recipe`` the model section of :data:`RECIPE_CONFIG` (its own P)."""
    from mtop_jax.config.loading import load_config_file
    from mtop_jax.models.multitask import ModelConfig

    if variant == "mtop-recipe":
        return ModelConfig.from_dict({**dict(load_config_file(str(RECIPE_CONFIG)).model),
                                      "mode": "mtop"})
    mode = {"jax-shared": "shared", "mtop": "mtop", "jax-prefix": "prefix"}[variant]
    return ModelConfig(mode=mode, num_prompts=prompts)


def jax_variants(args: argparse.Namespace, ids: np.ndarray, mask: np.ndarray,
                 devices: Sequence[jax.Device]) -> list[Variant]:
    """``jax-shared``, ``mtop``, ``mtop-recipe`` and ``jax-prefix`` per N, from the
    pretrained weights, compiled ahead of time (so that compile never lands in a timed
    call); each variant's model from :func:`model_config`."""
    from mtop_jax.models.multitask import MultiTaskModel, load_backbone
    from mtop_jax.models.pretrained import pretrained_params

    enc, params = pretrained_params(args.model)
    # On the devices once, as torch's; the rows split over every CPU device, the weights
    # on each (mtop_jax.parallel.host_cpu).
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    by_rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    ids, mask = jax.device_put(ids, by_rows), jax.device_put(mask, by_rows)

    def compiled_state(name: str, n: int):
        tasks = [(f"task{t}", NUM_CLASSES) for t in range(n)]
        model = MultiTaskModel(enc, model_config(name, args.prompts), tasks, rngs=nnx.Rngs(0))
        load_backbone(model, params)
        model.eval()
        graphdef, state = nnx.split(model)
        state = jax.device_put(state, whole)
        fn = jax.jit(lambda st, i, m: nnx.merge(graphdef, st).logits(i, m))
        return fn.lower(state, ids, mask).compile(), state

    wanted = [v for v in ("jax-shared", "mtop", "mtop-recipe", "jax-prefix")
              if v in args.variants]
    out: list[Variant] = []
    if not wanted:
        return out
    prefix_one = compiled_state("jax-prefix", 1) if "jax-prefix" in wanted else None
    for n in args.tasks:
        for name in wanted:
            if name == "jax-prefix":
                program, base = prefix_one
                # one base encoder, N prefixes and heads: N calls of the one-task program
                states = [base, *(jax.device_put(with_new_task_variables(base, t), whole)
                                  for t in range(1, n))]
                call = (lambda program=program, states=states:
                        [program(st, ids, mask) for st in states])
                out.append(Variant(name, n, args.batch, n, call,
                                   f"{n} calls of a one-task prefix program"))
                continue
            program, state = compiled_state(name, n)
            out.append(Variant(name, n, args.batch, 1,
                               lambda program=program, state=state: program(state, ids, mask),
                               "one pass" + (f" ({RECIPE_CONFIG.name}'s model)"
                                             if name == "mtop-recipe" else "")))
    return out


# ---------------------------------------------------------------------------- torch variants


def import_torch():
    """torch, or a message saying where it is installed (never in .venv, nor a dependency)."""
    try:
        import torch
    except ImportError:
        raise SystemExit("peers.py: the PyTorch variants need torch, transformers and peft, "
                         "which live in .venv-peers: run `make bench-peers`, or pick JAX "
                         "variants only with --variants jax-shared,mtop,mtop-recipe,jax-prefix,"
                         "mtop-predict") from None
    return torch


def quiet_transformers() -> None:
    """No 'newly initialized weights' warnings: the heads are random on purpose."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers

    transformers.logging.set_verbosity_error()


def torch_variants(args: argparse.Namespace, ids: np.ndarray, mask: np.ndarray
                   ) -> list[Variant]:
    """``torch-shared`` and ``peft-prefix`` per N, fp32, in inference mode."""
    torch = import_torch()
    quiet_transformers()
    from transformers import AutoModel, AutoModelForSequenceClassification

    from mtop_jax.models.pretrained import resolve_model_dir

    model_dir = str(resolve_model_dir(args.model))
    t_ids = torch.from_numpy(np.asarray(ids, np.int64))
    t_mask = torch.from_numpy(np.asarray(mask, np.int64))
    out = []
    if "torch-shared" in args.variants:
        encoder = AutoModel.from_pretrained(model_dir).float().eval()
        hidden = encoder.config.hidden_size
        for n in args.tasks:
            heads = torch.nn.Linear(hidden, n * NUM_CLASSES).eval()

            def call(heads=heads):
                with torch.inference_mode():
                    pooled = encoder(input_ids=t_ids, attention_mask=t_mask).pooler_output
                    return heads(pooled).numpy()

            out.append(Variant("torch-shared", n, args.batch, 1, call,
                               "AutoModel, one pass, N linear heads"))
    if "peft-prefix" in args.variants:
        from peft import PrefixTuningConfig, TaskType, get_peft_model

        def config():
            return PrefixTuningConfig(task_type=TaskType.SEQ_CLS,
                                      num_virtual_tokens=args.prompts)

        base = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=NUM_CLASSES).float()
        torch.manual_seed(0)
        peft_model = get_peft_model(base, config(), adapter_name="task0")
        for t in range(1, max(args.tasks)):
            peft_model.add_adapter(f"task{t}", config())
        peft_model.eval()
        for n in args.tasks:

            def call(n=n):
                logits = []
                with torch.inference_mode():
                    for t in range(n):
                        peft_model.set_adapter(f"task{t}")
                        logits.append(peft_model(input_ids=t_ids,
                                                 attention_mask=t_mask).logits.numpy())
                return logits

            out.append(Variant("peft-prefix", n, args.batch, n, call,
                               f"{n} passes, one PrefixTuningConfig adapter each"))
    return out


def pooled_difference(args: argparse.Namespace, ids: np.ndarray, mask: np.ndarray) -> float:
    """Max |PyTorch - JAX| of the pooled [CLS] output on the timed batch: evidence that both
    sides run the same weights and the same function (fp32 agrees to about 1e-5)."""
    torch = import_torch()
    from transformers import AutoModel

    from mtop_jax.models.pretrained import load_encoder, resolve_model_dir

    encoder, _ = load_encoder(args.model)
    graphdef, state = nnx.split(encoder)
    pooled = jax.jit(lambda st, i, m: nnx.merge(graphdef, st)(i, m)[1])(state, ids, mask)
    hf = AutoModel.from_pretrained(str(resolve_model_dir(args.model))).float().eval()
    with torch.inference_mode():
        ref = hf(input_ids=torch.from_numpy(np.asarray(ids, np.int64)),
                 attention_mask=torch.from_numpy(np.asarray(mask, np.int64))).pooler_output
    return float(np.abs(np.asarray(pooled) - ref.numpy()).max())


# ---------------------------------------------------------------------------- end to end


def demo_texts(n: int) -> list[str]:
    """The first ``n`` texts of the demo set's test split (repeated if it has fewer)."""
    from mtop_jax.data.demo import DEBIAN_PACKAGES_DIR

    with open(DEBIAN_PACKAGES_DIR / "test.jsonl") as f:
        texts = [json.loads(line)["text"] for line in f]
    return [texts[i % len(texts)] for i in range(n)]


def build_random_model(args: argparse.Namespace, out: Path) -> Path:
    """An ``mtop`` model of ``--predict-tasks`` tasks on the pretrained encoder, random
    prompts and heads, written as an exported model directory (what ``load`` reads)."""
    from mtop_jax.data.tasks import TaskSpec
    from mtop_jax.models.multitask import ModelConfig, MultiTaskModel, load_backbone
    from mtop_jax.models.pretrained import load_tokenizer, pretrained_params
    from mtop_jax.models.spec import ModelSpec
    from mtop_jax.serving.export import save_model_dir
    from mtop_jax.serving.predictor import Predictor

    enc, params = pretrained_params(args.model)
    labels = tuple(f"label{c}" for c in range(NUM_CLASSES))
    spec = ModelSpec(enc, ModelConfig(mode="mtop", num_prompts=args.prompts),
                     tuple(TaskSpec(f"task{t}", labels=labels)
                           for t in range(args.predict_tasks)))
    model = MultiTaskModel(enc, spec.model, spec.head_tasks, rngs=nnx.Rngs(0))
    load_backbone(model, params)
    model.eval()
    predictor = Predictor(spec, nnx.state(model, nnx.Param), load_tokenizer(args.model),
                          max_length=args.predict_length, batch_size=args.batch)
    return save_model_dir(predictor, out)


def end_to_end_variants(args: argparse.Namespace, scratch: Path,
                        devices: Sequence[jax.Device]) -> tuple[list[Variant], dict[str, Any]]:
    """``mtop-predict`` and ``hf-pipelines`` over the same texts, and what they ran on."""
    import mtop_jax

    texts = demo_texts(args.predict_texts)
    path = args.predict_model or build_random_model(args, scratch / "model")
    predictor = mtop_jax.load(path, batch_size=args.batch, devices=devices)
    n = len(predictor.task_names)
    info = {"model": str(args.predict_model) if args.predict_model else
            "built: mtop, random prompts and heads on the pretrained encoder",
            "tasks": n, "texts": len(texts), "max_length": predictor.max_length,
            "batch": args.batch, "classes": [t.num_classes for t in predictor.spec.tasks]}
    out = []
    if "mtop-predict" in args.variants:
        out.append(Variant("mtop-predict", n, len(texts), 1,
                           lambda: predictor.predict(texts),
                           f"load(...).predict, {n} tasks, one pass per batch"))
    if "hf-pipelines" in args.variants:
        torch = import_torch()
        quiet_transformers()
        from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

        from mtop_jax.models.pretrained import resolve_model_dir

        model_dir = str(resolve_model_dir(args.model))
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        torch.manual_seed(0)
        pipes = [pipeline("text-classification", tokenizer=tokenizer, device="cpu",
                          model=AutoModelForSequenceClassification.from_pretrained(
                              model_dir, num_labels=task.num_classes).float().eval())
                 for task in predictor.spec.tasks]
        length = predictor.max_length

        def call():
            return [pipe(texts, batch_size=args.batch, truncation=True, max_length=length)
                    for pipe in pipes]

        out.append(Variant("hf-pipelines", n, len(texts), n, call,
                           f"{n} text-classification pipelines, each over all texts"))
    return out, info


# ---------------------------------------------------------------------------- timing


def run_rounds(variants: list[Variant], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Warm every variant up, then ``--rounds`` rounds timing each once, rotating the order."""
    for v in tqdm(variants, desc="warm-up", unit="variant", dynamic_ncols=True):
        for _ in range(args.warmup):
            jax.block_until_ready(v.call())
    times: list[list[list[float]]] = [[] for _ in variants]
    for r in range(args.rounds):
        order = list(range(len(variants)))
        order = order[r % len(order):] + order[:r % len(order)]
        for i in tqdm(order, desc=f"round {r + 1}/{args.rounds}", unit="variant",
                      dynamic_ncols=True):
            times[i].append(time_calls(variants[i].call, repeats=args.calls, warmup=0))
    rows = []
    for v, per_round in zip(variants, times):
        medians = [statistics.median(t) for t in per_round]
        rates = [v.rows / m for m in medians]
        median = statistics.median(rates)
        rows.append({"variant": v.name, "tasks": v.tasks, "rows_per_call": v.rows,
                     "passes": v.passes, "detail": v.detail, "times_s": per_round,
                     "seq_per_s_rounds": rates, "seq_per_s": median,
                     "spread": (max(rates) - min(rates)) / median if median > 0 else 0.0})
    return rows


# ---------------------------------------------------------------------------- ratios


def find(rows: Sequence[dict[str, Any]], variant: str, tasks: int | None
         ) -> dict[str, Any] | None:
    """The row of ``variant`` at ``tasks`` tasks; the end-to-end ones at their own N."""
    for r in rows:
        if r["variant"] == variant and (tasks is None or r["tasks"] == tasks):
            return r
    return None


def paired_ratio(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """Throughput ratio a/b per round (same round's figures), and their median."""
    per_round = [x / y for x, y in zip(a["seq_per_s_rounds"], b["seq_per_s_rounds"])]
    return {"value": statistics.median(per_round), "rounds": per_round,
            "min": min(per_round), "max": max(per_round)}


def checks(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets that the measured rows can answer, then informational ratios."""
    out = []
    ns = sorted({r["tasks"] for r in rows if r["variant"] in FORWARD})
    for name, variant, against, n, threshold in TARGETS:
        for tasks in (ns if n is None else [n]):
            a, b = find(rows, variant, tasks), find(rows, against, tasks)
            if a is None or b is None:
                continue
            ratio = paired_ratio(a, b)
            out.append({"name": name, "variant": variant, "against": against,
                        "tasks": tasks, "threshold": threshold,
                        "passed": ratio["value"] >= threshold, **ratio})
    for name, variant, against in INFO_RATIOS:
        for tasks in ns:
            a, b = find(rows, variant, tasks), find(rows, against, tasks)
            if a is not None and b is not None:
                out.append({"name": name, "variant": variant, "against": against,
                            "tasks": tasks, "threshold": None, "passed": None,
                            **paired_ratio(a, b)})
    return out


# ---------------------------------------------------------------------------- report


def report(rows: Sequence[dict[str, Any]], found: Sequence[dict[str, Any]],
           args: argparse.Namespace, env: dict[str, Any]) -> str:
    """The Markdown table of every variant, then the ratios with PASS/MISS."""
    rounds = max((len(r["seq_per_s_rounds"]) for r in rows), default=0)
    lines = [f"# Peers: {env.get('cpu_model')} ({env.get('host_cpus')} CPUs), fp32, "
             f"L={args.length}, B={args.batch}, P={args.prompts}; JAX over "
             f"{args.cpu_devices} CPU device(s), rows split over them", "",
             "jax {jax_version}, torch {torch_version}, transformers {transformers_version}, "
             "peft {peft_version}; torch threads {torch_threads}.".format(
                 **{k: env.get(k, "-") for k in ("jax_version", "torch_version",
                                                 "transformers_version", "peft_version",
                                                 "torch_threads")}),
             *([f"Same weights: PyTorch and JAX pooled outputs differ by at most "
                f"{env['pooled_max_abs_diff_torch_vs_jax']:.2g} on the timed batch."]
               if "pooled_max_abs_diff_torch_vs_jax" in env else []),
             "seq/s: sequences answered for all N tasks per second (each round: the median "
             f"of {args.calls} calls); spread: (max - min) / median over the rounds.", ""]
    table = []
    for r in rows:
        table.append([r["variant"], r["tasks"], f"{r['passes']} x {r['rows_per_call']}",
                      *(fmt(x) for x in r["seq_per_s_rounds"]),
                      *([""] * (rounds - len(r["seq_per_s_rounds"]))),
                      fmt(r["seq_per_s"]), f"{100 * r['spread']:.1f}%"])
    lines.append(markdown_table(
        ["variant", "N", "passes x rows", *(f"round {i + 1}" for i in range(rounds)),
         "median seq/s", "spread"], table, align="lrr" + "r" * rounds + "rr"))
    lines += ["", "## Targets (issue 18) and ratios", "",
              "Paired ratios: one per round from that round's figures; value = their "
              "median, [min, max] over the rounds.", ""]
    if not found:
        lines.append("No pair of measured variants answers a target.")
    for c in found:
        verdict = "info" if c["passed"] is None else ("PASS" if c["passed"] else "MISS")
        need = f" (needs >= {c['threshold']:g}x)" if c["threshold"] is not None else ""
        lines.append(f"- {verdict}: {c['name']} at N={c['tasks']} ({c['variant']} / "
                     f"{c['against']}): {c['value']:.3g}x [{c['min']:.3g}, "
                     f"{c['max']:.3g}]{need}")
    note = busy_note(rows, env)
    if note:
        lines += ["", note]
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: Path, env: dict[str, Any]) -> None:
    """Bars of median seq/s with the rounds' min-max: forward variants per N, end to end."""
    plt = pyplot()
    titles = {FORWARD: ("forward, B rows answered for N tasks", "sequences / s"),
              END_TO_END: ("end to end: texts -> N tasks' labels", "texts / s")}
    panels = [names for names in titles if any(r["variant"] in names for r in rows)]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 + 4.25 * len(panels), 4.5),
                             squeeze=False, gridspec_kw={"width_ratios": [
                                 3 if names == FORWARD else 1 for names in panels]})
    colors = dict(zip(VARIANTS, ("tab:gray", "tab:purple", "tab:green", "tab:blue",
                                 "tab:cyan", "tab:orange", "tab:blue", "tab:purple")))
    for ax, names in zip(axes[0], panels):  # no empty panel: only what was measured
        mine = [r for r in rows if r["variant"] in names]
        ns = sorted({r["tasks"] for r in mine})
        present = [v for v in names if any(r["variant"] == v for r in mine)]
        width = 0.8 / max(1, len(present))
        for j, v in enumerate(present):
            xs, ys, lo, hi = [], [], [], []
            for i, n in enumerate(ns):
                r = find(mine, v, n)
                if r is None:
                    continue
                xs.append(i + (j - (len(present) - 1) / 2) * width)
                ys.append(r["seq_per_s"])
                lo.append(r["seq_per_s"] - min(r["seq_per_s_rounds"]))
                hi.append(max(r["seq_per_s_rounds"]) - r["seq_per_s"])
            ax.bar(xs, ys, width, yerr=[lo, hi], color=colors[v], label=v, capsize=3)
        ax.set_xticks(range(len(ns)), [f"N={n}" for n in ns])
        ax.set_yscale("log")
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8)
        ax.set(title=titles[names][0], ylabel=titles[names][1])
    fig.suptitle(f"{env.get('cpu_model')}, jax {env.get('jax_version')}, torch "
                 f"{env.get('torch_version', '-')}, fp32")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


# ---------------------------------------------------------------------------- main


def versions(args: argparse.Namespace) -> dict[str, Any]:
    """torch, transformers and peft versions (when the run used them) and torch's threads."""
    import transformers

    out: dict[str, Any] = {"transformers_version": transformers.__version__}
    if any(v in TORCH_VARIANTS for v in args.variants):
        torch = import_torch()
        torch.set_num_threads(args.threads)
        out.update(torch_version=torch.__version__, torch_threads=torch.get_num_threads())
        if "peft-prefix" in args.variants:
            import peft

            out["peft_version"] = peft.__version__
    return out


def load_average() -> float | None:
    """The 1-minute load average: other jobs on the CPU skew torch's OpenMP threads
    (which wait on each other at every operator) far more than XLA's."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def busy_note(rows: Sequence[dict[str, Any]], env: dict[str, Any]) -> str | None:
    """A warning when the machine was busy or the rounds disagree: numbers not to report."""
    notes = []
    cpus = env.get("host_cpus") or 1
    # Before the run the load is other jobs' alone; at its end it holds this run's own
    # threads too (up to one per CPU), so only a load above that counts there.
    start, end = env.get("load_average_start"), env.get("load_average_end")
    busy = [x for x, limit in ((start, 0.5 * cpus), (end, cpus + 0.5))
            if x is not None and x > limit]
    if busy:
        notes.append(f"the load average reached {max(busy):.2f} on {cpus} CPUs (other jobs "
                     "ran beside this one)")
    noisy = [r for r in rows if len(r["seq_per_s_rounds"]) > 1 and r["spread"] > 0.10]
    if noisy:
        worst = max(noisy, key=lambda r: r["spread"])
        notes.append(f"{len(noisy)} of {len(rows)} variants spread more than 10% over the "
                     f"rounds (worst {100 * worst['spread']:.0f}%, {worst['variant']} "
                     f"N={worst['tasks']})")
    if not notes:
        return None
    return "Noise: " + "; ".join(notes) + ". On a busy machine these are not the figures to report."


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    # Before anything starts JAX's backend; the JAX variants run on these devices.
    devices = use_host_cpu_devices(args.cpu_devices)
    env = {**environment(argv if argv is not None else sys.argv[1:]), **versions(args),
           "load_average_start": load_average()}
    from mtop_jax.models.pretrained import load_config, resolve_model_dir

    vocab = load_config(resolve_model_dir(args.model)).vocab_size
    ids, mask = (np.asarray(a) for a in padded_batch(args.batch, args.length, vocab))
    t0 = time.perf_counter()
    variants: list[Variant] = []
    predict_info = None
    if {"torch-shared", "jax-shared"} <= set(args.variants):
        env["pooled_max_abs_diff_torch_vs_jax"] = pooled_difference(args, ids, mask)
    with tempfile.TemporaryDirectory(prefix="peers-") as scratch:
        if any(v in TORCH_VARIANTS[:2] for v in args.variants):
            variants += torch_variants(args, ids, mask)
        variants += jax_variants(args, ids, mask, devices)
        if any(v in END_TO_END for v in args.variants):
            e2e, predict_info = end_to_end_variants(args, Path(scratch), devices)
            variants += e2e
        order = {v: i for i, v in enumerate(VARIANTS)}
        variants.sort(key=lambda v: (v.name in END_TO_END, v.tasks, order[v.name]))
        build_s = time.perf_counter() - t0
        rows = run_rounds(variants, args)
    env["load_average_end"] = load_average()
    found = checks(rows)
    result = {**env, "benchmark": "peers",
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "build_s": build_s, "wall_s": time.perf_counter() - t0,
              "end_to_end": predict_info, "results": rows, "checks": found}
    print(report(rows, found, args, env))
    if args.out is not None:
        write_json(args.out / "peers.json", result)
        if not args.no_plot:
            plot(rows, args.out / "peers.png", env)
        print(f"\nwrote {args.out / 'peers.json'}"
              + ("" if args.no_plot else f" and {args.out / 'peers.png'}"))
    return result


if __name__ == "__main__":
    main()

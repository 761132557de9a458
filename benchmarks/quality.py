"""Quality (DESIGN.md section 11): modes and recipes trained with one budget on one
data directory, several seeds, scored on the test split beside a TF-IDF reference.

    python benchmarks/quality.py --config configs/debian_packages.py \
        --modes mtop,shared --seeds 0,1,2 --out benchmarks/results/quality-demo
    python benchmarks/quality.py --quick --out /tmp/quality   # tiny, for the tests

Every run goes through the real trainer (``mtop_jax.training.loop.train``), in its
own workdir under ``--out/runs`` (so a rerun resumes or reuses finished runs), with
``train.seed`` and ``data.seed`` both set to the seed. The reference is TF-IDF over
word 1-2 grams with a logistic regression per classification task and a ridge
regression per regression task (scikit-learn, the ``bench`` extra), fitted on the
same training texts, its C / alpha chosen on the validation split. Prints Markdown
tables (accuracy and macro-F1 per task, R^2 and Spearman for regression; mean and
spread over seeds), the targets of issue 15 for every recipe's ``mtop`` as
``TARGET ... PASS|MISS`` lines (``target_checks``), and writes ``quality.json`` and
``quality.png`` (with ``--split validation`` also ``quality-test.png``). For every
``mtop`` run it also measures how far apart the tasks' prompt states are after each
layer on the first 64 validation texts
(``mtop_jax.models.task_spread``: 0 means every task reads the same vector, i.e. the
run is ``shared`` with N heads), printed, stored and drawn in ``task_spread.png``.
Where a recipe has ``mtop`` and ``shared`` runs of the same seeds, it prints their
difference per seed and, from the runs' test predictions, a 95% interval of the
difference over the test split's texts (a paired bootstrap): on small splits one text
of a small task moves a mean of four by half a point.

A recipe is a name and config overrides: ``--recipe lr1e-4:optim.learning_rate=1e-4``
(repeatable; overrides joined by ``;``). Without one, the config as it is. Overrides
prefixed ``first.`` make it two runs (DESIGN.md section 5): a first run with those
overrides (e.g. ``first.train.stage=prompts;first.train.steps=100``), then the run
itself starting from it (``init.params_from``); the table's wall time is both.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    environment,
    markdown_table,
    pyplot,
    save_figure,
    str_list,
    write_json,
)

ROOT = Path(__file__).resolve().parents[1]
MODES = ("mtop", "shared", "prefix", "single")
QUICK = dict(config=str(ROOT / "configs" / "tiny.py"), modes="mtop,shared", seeds="0",
             steps=4, max_train=128)
FULL = dict(config=str(ROOT / "configs" / "debian_packages.py"), modes="mtop,shared",
            seeds="0,1,2", steps=None, max_train=None)


@dataclasses.dataclass(frozen=True)
class Run:
    recipe: str
    overrides: tuple[str, ...]
    mode: str
    seed: int
    first: tuple[str, ...] = ()  # the overrides of a first stage, if any

    @property
    def name(self) -> str:
        return f"{self.recipe}-{self.mode}-seed{self.seed}"


# ---------------------------------------------------------------------------- arguments


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a config file whose arg takes mode= and seed= "
                   f"(default {FULL['config']})")
    p.add_argument("--data", help="another data directory (data.path) for the same tasks")
    p.add_argument("--modes", help=f"of {list(MODES)} (default {FULL['modes']})")
    p.add_argument("--seeds", help=f"train and data seeds (default {FULL['seeds']})")
    p.add_argument("--steps", type=int, help="train.steps of every run (default: the config's)")
    p.add_argument("--max-train", type=int, help="a random subset of this many training "
                   "texts (the same for every run and the reference)")
    p.add_argument("--recipe", action="append", default=[],
                   help="NAME:key=value;key=value (config fields without --config.)")
    p.add_argument("--split", choices=("test", "validation"), default="test",
                   help="the split of the tables and the plot: validation for ablations "
                   "(recipes are chosen there, never on test); both are stored")
    p.add_argument("--no-reference", action="store_true", help="skip TF-IDF")
    p.add_argument("--out", type=Path, required=True, help="directory for runs and results")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--quick", action="store_true", help="the tiny config, 4 steps, one seed")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.modes = str_list(args.modes, MODES)
    try:
        args.seeds = sorted({int(x) for x in args.seeds.split(",") if x.strip()})
    except ValueError:
        raise SystemExit(f"--seeds {args.seeds!r}: expected comma-separated integers") from None
    args.recipes = [parse_recipe(r) for r in args.recipe] or [("config", (), ())]
    return args


def parse_recipe(text: str) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """(name, overrides, overrides of a first stage) of ``NAME:key=value;...``."""
    name, _, body = text.partition(":")
    if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise SystemExit(f"--recipe {text!r}: expected NAME:key=value;... with a plain NAME")
    overrides, first = [], []
    for item in filter(None, (x.strip() for x in body.split(";"))):
        if "=" not in item:
            raise SystemExit(f"--recipe {text!r}: {item!r} is not key=value")
        item = item.removeprefix("--config.")
        if item.startswith("first."):
            first.append(f"--config.{item.removeprefix('first.')}")
        else:
            overrides.append(f"--config.{item}")
    return name, tuple(overrides), tuple(first)


# ---------------------------------------------------------------------------- data


def run_config(args, run: Run, train_file: Path | None, first: bool = False):
    """The trainer's config of one run: the config file with the run's mode, seed and
    recipe, the same budget and data for all, evaluated on the test split. ``first``:
    the config of its first stage (not tested; the run starts from it)."""
    from mtop_jax.config.loading import load_config

    flags = [f"--config.train.seed={run.seed}", f"--config.data.seed={run.seed}",
             "--config.train.test_split=test", "--config.predict_examples=0"]
    if args.steps:
        flags.append(f"--config.train.steps={args.steps}")
    if args.data:
        flags.append(f"--config.data.path={args.data}")
    if first:
        flags += [*run.first, "--config.train.test_split="]
    else:
        flags += run.overrides
        if run.first:
            flags.append(f"--config.init.params_from={first_workdir(args, run)}")
    config = load_config(f"{args.config}:mode={run.mode},seed={run.seed}", flags)
    if train_file is not None:
        config.data.splits = {**dict(config.data.get("splits") or {}), "train": str(train_file)}
    return config


def train_or_stop(train, config, workdir: Path) -> dict[str, float]:
    """``train`` in ``workdir``; on SIGTERM the trainer saves and returns {}: so do we."""
    metrics = train(config, workdir)
    if not metrics:
        raise SystemExit(f"quality: run {workdir.name} was interrupted (saved); run the same "
                         "command again to resume it")
    return metrics


def first_workdir(args, run: Run) -> Path:
    return args.out / "runs" / f"{run.name}-first"


def subsample_train(config, n: int | None, out: Path) -> Path | None:
    """A file of ``n`` random training texts (seed 0), or None for all of them."""
    from mtop_jax.data.local_files import split_file

    if n is None:
        return None
    if config.data.get("source", "jsonl") != "jsonl":
        raise SystemExit("--max-train: only for a jsonl data directory")
    lines = split_file(config.data.to_dict(), "train").read_text().splitlines()
    keep = sorted(random.Random(0).sample(range(len(lines)), min(n, len(lines))))
    # absolute: a relative path would be read relative to data.path
    path = (out / "data" / f"train-{len(keep)}.jsonl").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines[i] + "\n" for i in keep))
    return path


#: Validation texts the task spread of an mtop run is measured on.
SPREAD_TEXTS = 64


def run_task_spread(workdir: Path, texts: Sequence[str]) -> dict[str, Any]:
    """The task spread (per layer, and of the pooled h_t) of the model in ``workdir``."""
    from flax import nnx

    from mtop_jax.models.task_spread import task_spread
    from mtop_jax.serving.predictor import load

    predictor = load(workdir, batch_size=len(texts))
    batch = predictor.tokenize(texts)
    model = nnx.merge(predictor.graphdef, predictor.params, predictor.rest)
    return task_spread(model, batch["input_ids"], batch["attention_mask"],
                       batch["token_type_ids"])


def format_spreads(results: Sequence[dict[str, Any]]) -> str:
    lines = [f"{r['recipe']}/mtop/{r['seed']}: after layers "
             + " ".join(f"{x:.2g}" for x in r["task_spread"]["layers"])
             + f"; pooled h_t {r['task_spread']['features']:.2g}"
             for r in results if r.get("task_spread")]
    if not lines:
        return ""
    return (f"Task spread of mtop's prompt states (std across tasks / std across texts, "
            f"{SPREAD_TEXTS} validation texts; 0: every task reads the same vector):\n"
            + "\n".join(lines))


def split_examples(config, split: str, tasks=None):
    from mtop_jax.data.examples import ExampleSet
    from mtop_jax.data.pipeline import load_examples

    specs, sets = load_examples(config.data, split, tasks)
    return specs, ExampleSet.concatenate(sets, name=split)


# ---------------------------------------------------------------------------- TF-IDF


def tfidf_reference(config) -> dict[str, dict[str, float]]:
    """The TF-IDF + logistic regression / ridge reference: the trainer's metrics on the
    test and the validation split (where C / alpha was chosen, so optimistic there)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    from mtop_jax.training.metrics import task_metrics

    tasks, train = split_examples(config, "train")
    _, valid = split_examples(config, config.train.eval_split or "validation", tasks)
    _, test = split_examples(config, "test", tasks)
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
    x_train = vectorizer.fit_transform(train.texts)
    x_valid, x_test = vectorizer.transform(valid.texts), vectorizer.transform(test.texts)
    split_sets = {"test": (test, x_test), "validation": (valid, x_valid)}
    predictions = {split: {} for split in split_sets}
    labels = {split: {} for split in split_sets}
    for t, spec in enumerate(tasks):
        y, yv = train.labels[:, t], valid.labels[:, t]
        best = fit_best(spec.is_regression, x_train, y, x_valid, yv)
        for split, (examples, x) in split_sets.items():
            predictions[split][spec.name] = best.predict(x)
            labels[split][spec.name] = (
                examples.labels[:, t] if spec.is_regression else
                np.nan_to_num(examples.labels[:, t], nan=-1).astype(int))
    return {split: task_metrics(tasks, predictions[split], labels[split])
            for split in split_sets}


def fit_best(regression: bool, x, y, x_valid, y_valid):
    """Ridge (alpha) or logistic regression (C) on the labelled rows, the value best on
    the labelled validation rows."""
    from sklearn.linear_model import LogisticRegression, Ridge

    keep, keep_v = ~np.isnan(y), ~np.isnan(y_valid)
    if regression:
        grid = [Ridge(alpha=a) for a in (0.3, 1.0, 3.0)]
        fitted = [m.fit(x[keep], y[keep]) for m in grid]
        errors = [np.mean((m.predict(x_valid[keep_v]) - y_valid[keep_v]) ** 2) for m in fitted]
        return fitted[int(np.argmin(errors))] if keep_v.any() else fitted[1]
    classes = np.unique(y[keep]).astype(int)
    if len(classes) < 2:  # one class among the training labels: predict it
        return _Constant(int(classes[0]) if len(classes) else 0)
    grid = [LogisticRegression(C=c, max_iter=1000) for c in (1.0, 10.0)]
    fitted = [m.fit(x[keep], y[keep].astype(int)) for m in grid]
    accuracy = [np.mean(m.predict(x_valid[keep_v]) == y_valid[keep_v]) for m in fitted]
    return fitted[int(np.argmax(accuracy))] if keep_v.any() else fitted[1]


@dataclasses.dataclass(frozen=True)
class _Constant:
    value: int

    def predict(self, x) -> np.ndarray:
        return np.full(x.shape[0], self.value)


# ---------------------------------------------------------------------------- report


def task_rows(tasks) -> list[tuple[str, str, str]]:
    """(task, metric key, shown name) of the tables."""
    rows = []
    for spec in tasks:
        if spec.is_regression:
            rows += [(spec.name, "r2", "R^2"), (spec.name, "spearman", "Spearman")]
        else:
            rows.append((spec.name, "accuracy", "acc"))
    return rows


def f3(x: float | None) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{x:.3f}"


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f3(mean)
    return f"{f3(mean)} ± {f3(statistics.stdev(values))}"


def columns(results: list[dict[str, Any]], split: str) -> dict[str, list[dict[str, float]]]:
    out: dict[str, list[dict[str, float]]] = {}
    for r in results:
        out.setdefault(f"{r['recipe']}/{r['mode']}", []).append(r[split])
    return out


def mean_accuracy(metrics: dict[str, float], tasks) -> float:
    values = [metrics[f"{t.name}/accuracy"] for t in tasks
              if not t.is_regression and f"{t.name}/accuracy" in metrics]
    return float(np.mean(values)) if values else float("nan")


def sampling_se(metrics: dict[str, float], tasks) -> float:
    """The standard error of ``mean_accuracy`` that comes from the split's finite texts
    alone (binomial: sqrt(sum_t p_t (1 - p_t) / n_t) / T): what a rerun on another
    sample of the same size would move it by, whatever the seed. A difference between
    two rows much below it is not one the split can show (one text of a 43-text task
    is 2.3 points of that task and 0.6 of a mean of four)."""
    terms = [(metrics[f"{t.name}/accuracy"], metrics.get(f"{t.name}/count", 0.0))
             for t in tasks if not t.is_regression and f"{t.name}/accuracy" in metrics]
    if not terms or any(n <= 0 for _, n in terms):
        return float("nan")
    return float(np.sqrt(sum(p * (1 - p) / n for p, n in terms)) / len(terms))


def report(tasks, results, reference, key: str = "accuracy", split: str = "test") -> str:
    cols = columns(results, split)
    headers = ["task", f"{split} n", *cols, *(["TF-IDF"] if reference else [])]
    first = next(iter(cols.values()))[0] if cols else (reference or {})
    rows = []
    for task, metric, shown in task_rows(tasks):
        if metric != "accuracy" and key != "accuracy":
            continue  # regression rows: in the accuracy table only
        metric = metric if metric != "accuracy" else key
        row = [f"{task} ({shown if metric != 'macro_f1' else 'macro-F1'})",
               int(first.get(f"{task}/count", 0))]
        row += [spread([m[f"{task}/{metric}"] for m in runs if f"{task}/{metric}" in m])
                for runs in cols.values()]
        if reference:
            row.append(f3(reference.get(f"{task}/{metric}")))
        rows.append(row)
    if key == "accuracy":
        row = ["mean accuracy (classification)", ""]
        row += [spread([mean_accuracy(m, tasks) for m in runs]) for runs in cols.values()]
        if reference:
            row.append(f3(mean_accuracy(reference, tasks)))
        rows.append(row)
        row = ["its sampling SE (split size)", ""]
        row += [f3(float(np.mean([sampling_se(m, tasks) for m in runs])))
                for runs in cols.values()]
        if reference:
            row.append(f3(sampling_se(reference, tasks)))
        rows.append(row)
    return markdown_table(headers, rows)


def target_checks(tasks, results, reference, split: str) -> list[dict[str, Any]]:
    """Issue 15's targets for every recipe's ``mtop`` (means over seeds): against its
    ``shared`` and ``single`` runs, the TF-IDF mean, each task with >= 200 labelled
    texts, and each regression task's Spearman. Lines print PASS or MISS."""
    cols = columns(results, split)
    mean_of = lambda runs: float(np.mean([mean_accuracy(m, tasks) for m in runs]))
    task_mean = lambda runs, key: float(np.mean([m[key] for m in runs if key in m]))
    checks = []

    def check(recipe, what, got, threshold, se=None):
        checks.append({"recipe": recipe, "target": what, "value": got, "threshold": threshold,
                       "pass": bool(got >= threshold), "sampling_se": se})

    for label, runs in cols.items():
        recipe, mode = label.rsplit("/", 1)
        if mode != "mtop":
            continue
        mtop = mean_of(runs)
        se = float(np.mean([sampling_se(m, tasks) for m in runs]))
        for other, margin, what in (("shared", 0.005, "mean acc >= shared + 0.5"),
                                    ("single", -0.005, "mean acc >= single - 0.5")):
            if f"{recipe}/{other}" in cols:
                check(recipe, what, mtop, mean_of(cols[f"{recipe}/{other}"]) + margin, se)
        if not reference:
            continue
        check(recipe, "mean acc >= TF-IDF + 2", mtop, mean_accuracy(reference, tasks) + 0.02, se)
        for t in tasks:
            if t.is_regression:
                key = f"{t.name}/spearman"
                if key in reference:
                    check(recipe, f"{t.name} Spearman > TF-IDF ridge's", task_mean(runs, key),
                          reference[key] + 1e-9)
            elif reference.get(f"{t.name}/count", 0) >= 200:
                key = f"{t.name}/accuracy"
                check(recipe, f"{t.name} acc >= TF-IDF - 0.5", task_mean(runs, key),
                      reference[key] - 0.005)
    return checks


def paired_seeds(results) -> dict[str, list[int]]:
    """Per recipe, the seeds that have both an ``mtop`` and a ``shared`` run: the same
    seed means the same data order and sample, so the two runs compare as a pair."""
    have = {(r["recipe"], r["mode"], r["seed"]) for r in results}
    out: dict[str, list[int]] = {}
    for recipe, mode, seed in sorted(have):
        if mode == "mtop" and (recipe, "shared", seed) in have:
            out.setdefault(recipe, []).append(seed)
    return out


def paired_differences(tasks, results, split: str) -> dict[str, list[float]]:
    """Per recipe, ``mtop``'s mean accuracy minus ``shared``'s for each paired seed: what
    the spread over seeds of the two columns hides."""
    by = {(r["recipe"], r["mode"], r["seed"]): r[split] for r in results}
    return {recipe: [mean_accuracy(by[recipe, "mtop", s], tasks)
                     - mean_accuracy(by[recipe, "shared", s], tasks) for s in seeds]
            for recipe, seeds in paired_seeds(results).items()}


def format_differences(diffs: dict[str, list[float]]) -> str:
    return "\n".join(
        f"{recipe}: mtop - shared per seed, points: "
        + ", ".join(f"{100 * d:+.1f}" for d in values)
        + (f" (mean {100 * statistics.fmean(values):+.2f}"
           + (f" ± {100 * statistics.stdev(values):.2f})" if len(values) > 1 else ")"))
        for recipe, values in diffs.items())


def paired_bootstrap(tasks, pairs: Sequence[tuple[Path, Path]], draws: int = 2000,
                     seed: int = 0) -> dict[str, Any] | None:
    """``mtop`` - ``shared`` mean accuracy over the classification tasks, averaged over
    the seeds' pairs of test predictions (``predictions-test.npz`` of the two runs), with
    a 95% interval from resampling the split's texts (the same draw for every pair and
    task): how much of the difference the split's finite texts could have made. None
    when a run has no predictions file (trained before the trainer wrote one)."""
    if not pairs or not all(a.exists() and b.exists() for a, b in pairs):
        return None
    names = [t.name for t in tasks if not t.is_regression]
    scored = []  # per pair: (mtop right - shared right) [texts, tasks], labelled mask
    for a_path, b_path in pairs:
        a, b = np.load(a_path), np.load(b_path)
        if not np.array_equal(a["labels"], b["labels"], equal_nan=True):
            raise SystemExit(f"quality: {a_path} and {b_path} hold different labels")
        cols = [list(a["tasks"]).index(n) for n in names]
        labels = a["labels"][:, cols]
        mask = labels >= 0
        diff = ((a["predictions"][:, cols] == labels).astype(np.float64)
                - (b["predictions"][:, cols] == labels)) * mask
        scored.append((diff, mask.astype(np.float64)))
    n = scored[0][0].shape[0]
    rng = np.random.default_rng(seed)

    def mean_diff(weights):  # weights [draws, texts] -> [draws]
        per_pair = [((weights @ d) / np.maximum(weights @ m, 1e-12)).mean(axis=1)
                    for d, m in scored]
        return np.mean(per_pair, axis=0)

    observed = float(mean_diff(np.ones((1, n)))[0])
    boot = np.concatenate([mean_diff(rng.multinomial(n, np.full(n, 1 / n), size=chunk)
                                     .astype(np.float64))
                           for chunk in [min(200, draws - i) for i in range(0, draws, 200)]])
    low, high = np.percentile(boot, [2.5, 97.5])
    return {"diff": observed, "ci95": [float(low), float(high)], "draws": len(boot),
            "pairs": len(pairs), "share_le_0": float(np.mean(boot <= 0))}


def paired_tests(tasks, results, runs_dir: Path) -> dict[str, dict[str, Any]]:
    """``paired_bootstrap`` per recipe over its paired seeds."""
    out = {}
    for recipe, seeds in paired_seeds(results).items():
        pairs = [(runs_dir / f"{recipe}-mtop-seed{s}" / "predictions-test.npz",
                  runs_dir / f"{recipe}-shared-seed{s}" / "predictions-test.npz") for s in seeds]
        if (test := paired_bootstrap(tasks, pairs)) is not None:
            out[recipe] = test
    return out


def format_tests(tests: dict[str, dict[str, Any]]) -> str:
    return "\n".join(
        f"{recipe}: mtop - shared on the test split, paired by seed and text over "
        f"{t['pairs']} seed(s): {100 * t['diff']:+.2f} points, 95% interval over the "
        f"split's texts [{100 * t['ci95'][0]:+.2f}, {100 * t['ci95'][1]:+.2f}] "
        f"({t['draws']} bootstrap draws)" for recipe, t in tests.items())


def format_checks(checks: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"TARGET {c['recipe']}/mtop {c['target']}: {c['value']:.4f} vs {c['threshold']:.4f}"
        f" -> {'PASS' if c['pass'] else 'MISS'}"
        + (f" (the split's sampling SE of the mean: {c['sampling_se']:.4f})"
           if c.get("sampling_se") is not None and np.isfinite(c["sampling_se"]) else "")
        for c in checks)


def plot(tasks, results, reference, path: Path, split: str = "test") -> None:
    plt = pyplot()
    cols = columns(results, split)
    names = [t.name for t in tasks if not t.is_regression] + ["mean"]
    series = {label: [[m.get(f"{n}/accuracy", np.nan) if n != "mean" else
                       mean_accuracy(m, tasks) for m in runs] for n in names]
              for label, runs in cols.items()}
    if reference:
        series["TF-IDF"] = [[reference.get(f"{n}/accuracy", np.nan) if n != "mean" else
                             mean_accuracy(reference, tasks)] for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names)), 4))
    width = 0.8 / max(len(series), 1)
    for i, (label, per_task) in enumerate(series.items()):
        means = [np.nanmean(v) for v in per_task]
        errs = [np.nanstd(v) if len(v) > 1 else 0 for v in per_task]
        ax.bar(np.arange(len(names)) + i * width, means, width, yerr=errs, label=label,
               capsize=2)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=30, ha="right")
    ax.set_ylabel(f"{split} accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(f"{split} accuracy, mean and spread over seeds")
    save_figure(fig, path)


def plot_spreads(series: dict[str, Sequence[float]], path: Path) -> None:
    """One line per model: its task spread after each layer, log scale."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, layers in series.items():
        ax.semilogy(range(1, len(layers) + 1), layers, marker="o", label=label)
    ax.set_xlabel("after layer")
    ax.set_ylabel("std across tasks / std across texts")
    ax.set_title("How far apart the tasks' prompt states are")
    ax.legend(fontsize=8)
    save_figure(fig, path)


# ---------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from tqdm import tqdm

    from mtop_jax.training.loop import train

    args.out.mkdir(parents=True, exist_ok=True)
    runs = [Run(name, overrides, mode, seed, first) for name, overrides, first in args.recipes
            for mode in args.modes for seed in args.seeds]
    base = run_config(args, runs[0], None)
    train_file = subsample_train(base, args.max_train, args.out)
    # Every config checked before anything trains.
    configs = {run: run_config(args, run, train_file) for run in runs}
    firsts = {run: run_config(args, run, train_file, first=True) for run in runs if run.first}
    tasks, _ = split_examples(configs[runs[0]], "train")
    spread_texts = list(split_examples(configs[runs[0]], "validation", tasks)[1]
                        .texts[:SPREAD_TEXTS])

    results = []
    for run in tqdm(runs, desc="quality runs", dynamic_ncols=True):
        # A run trained by an earlier call is only re-evaluated: its training wall time
        # is the one stored when it was trained.
        timing = args.out / "runs" / f"{run.name}.wall.json"
        trained = json.loads(timing.read_text()) if timing.exists() else None
        t0 = time.perf_counter()
        if run.first:
            train_or_stop(train, firsts[run], first_workdir(args, run))
        metrics = train_or_stop(train, configs[run], args.out / "runs" / run.name)
        test = {k.removeprefix("test/"): v for k, v in metrics.items() if k.startswith("test/")}
        # The last evaluation: the validation split at the final step.
        valid = {k: v for k, v in metrics.items() if not k.startswith("test/")}
        wall_s = time.perf_counter() - t0
        if trained is None:
            write_json(timing, {"wall_s": wall_s})
        spread = (run_task_spread(args.out / "runs" / run.name, spread_texts)
                  if run.mode == "mtop" and len(tasks) > 1 else None)
        results.append({"recipe": run.recipe, "overrides": list(run.overrides),
                        "first": list(run.first), "mode": run.mode, "seed": run.seed,
                        "wall_s": trained["wall_s"] if trained else wall_s,
                        "steps": int(configs[run].train.steps), "test": test,
                        "validation": valid, "task_spread": spread})
    references = None if args.no_reference else tfidf_reference(configs[runs[0]])
    reference = references[args.split] if references else None

    text = "\n\n".join([
        f"{args.split} split, {len(args.seeds)} seed(s), {results[0]['steps']} steps each; "
        "mean ± standard deviation over seeds; wall time per run "
        + ", ".join(f"{r['recipe']}/{r['mode']}/{r['seed']} {r['wall_s'] / 60:.1f} min"
                    for r in results),
        report(tasks, results, reference, "accuracy", args.split),
        report(tasks, results, reference, "macro_f1", args.split)])
    diffs = paired_differences(tasks, results, args.split)
    if diffs:
        text += "\n\n" + format_differences(diffs)
    tests = paired_tests(tasks, results, args.out / "runs")
    if tests:
        text += "\n\n" + format_tests(tests)
    checks = target_checks(tasks, results, reference, args.split)
    if checks:
        text += "\n\n" + format_checks(checks)
    if spreads := format_spreads(results):
        text += "\n\n" + spreads
    print(text)
    out = {**environment(argv), "config": args.config, "data": args.data,
           "max_train": args.max_train, "tasks": [t.name for t in tasks],
           "split": args.split, "results": results, "tfidf": references, "table": text,
           "targets": checks, "mtop_minus_shared": diffs, "paired_test": tests}
    write_json(args.out / "quality.json", out)
    if not args.no_plot:
        plot(tasks, results, reference, args.out / "quality.png", args.split)
        if args.split != "test":  # the split that tables quote, drawn beside the chosen one
            plot(tasks, results, references["test"] if references else None,
                 args.out / "quality-test.png", "test")
        if spreads:
            plot_spreads({f"{r['recipe']}/mtop/{r['seed']}": r["task_spread"]["layers"]
                          for r in results if r["task_spread"]}, args.out / "task_spread.png")
    return out


if __name__ == "__main__":
    main()

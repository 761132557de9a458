"""Fixed text representations that transfer (DESIGN.md section 6, issue 21): features
learned on source tasks, judged by lightweight models on target tasks the features
never saw, beside the alternatives, and what adding a source task costs.

    python benchmarks/transfer.py --out benchmarks/results/transfer-demo
    python benchmarks/transfer.py --config configs/debian_packages_dev.py \\
        --out benchmarks/results/transfer-dev
    python benchmarks/transfer.py --quick --out /tmp/transfer   # tiny, for the tests

Representations, each fed to the same downstream models (a logistic regression, C
chosen on the validation split, and a one-hidden-layer MLP early-stopped on it; ridge
and an MLP regressor for a regression target) on standardised frozen features:

- ``pretrained-cls`` / ``pretrained-mean``: the encoder as pretrained, untrained here:
  its pooler over [CLS], and the mean of the last layer's token states. Read from the
  ``prompts`` run's frozen backbone (the very weights of the checkpoint) in the same
  pass as ``prefixes`` (its input states are the plain encoder's: I1).
- ``prefixes``: ``embed`` ([h_1; ..; h_N], N x H wide) of the config in mode ``mtop``
  trained on the source tasks with ``train.stage=prompts``: the backbone and the pooler
  frozen, one prompt, head and pooler query per task: N independent prompt-tuning
  runs done as one (DESIGN.md section 5; the tasks only share the global-norm clip).
  Each prefix is read by the conditional pooler (``--prefix-overrides`` default
  ``model.pooler=conditional``: a task query that starts at mean pooling).
- ``shared``: the config in mode ``shared`` fine-tuned (``train.stage=full``)
  multi-task on the source tasks, then frozen: its pooled [CLS] (H wide; ``embed``
  repeats it once per task, the copies are checked equal and dropped).
- ``TF-IDF``: word 1-2 grams + logistic regression / ridge, ``benchmarks/quality.py``'s
  reference, fitted on the same training texts.

Default splits (``--sources`` / ``--targets`` override; any tasks of the config):

- the demo set (``configs/debian_packages.py``, ``configs/tiny.py``): sources ``role``,
  ``implemented_in``, ``interface``; target ``section``, the one task with many
  labelled test texts (983 of 1,000, 40 classes): the other three have 350, 129 and
  43, so a target mean over them would be mostly noise;
- ``debian-packages-dev``: sources ``section``, ``architecture``, ``x11``, ``suite``,
  ``made_of``, ``admin``; targets ``role`` (1,650 test labels), ``multi_arch`` (3,000),
  ``network`` (66), ``security`` (32) and the regression ``log2_installed_kb`` (3,000):
  the two dense classification targets carry the mean, the sparse ones are shown.

Every run goes through the real trainer (``mtop_jax.training.loop.train``) in its own
workdir under ``--out/runs`` (a rerun reuses finished runs and their stored wall
time). A run trains on the training texts (``--max-train``: a random subset, seed 0)
that are labelled for at least one of its tasks; ``--steps`` (default: the config's)
is the source runs' budget, ``--train-seeds`` their seeds (``train.seed`` and
``data.seed``), ``--seeds`` the downstream models' seeds (the MLP's initialisation and
batches; the logistic regression is deterministic). The tables give mean ± standard
deviation over all (training seed, downstream seed) pairs, on the test split.

Update cost: each task of ``--add-tasks`` (default: every source) is added in turn as
one more prefix, a one-task ``prompts`` run on the texts labelled for it, for as many
epochs of those texts as the source runs had of theirs (steps = ceil(steps x n_task /
n_sources)). Its cost, in wall time and in compiled FLOPs per train step (at the
longest length, ``benchmarks/common.py``'s ``compiled_flops``) x steps, is set against
retraining ``shared`` on the sources (the ``shared`` run itself: the multi-task encoder
with that task among the N). Bit-identity: the ``prefixes`` model without that task
and the same model with that task's new prefix appended embed the same texts; the old
columns must be exactly equal (``np.array_equal``). They are from two old tasks up; from
one task to two, XLA on CPU differs in the last bit (3e-8 to 6e-8, tiny model,
2026-12-03; ``tests/test_transfer.py``), so with N = 2 sources the check can MISS.

Prints Markdown tables and ``TARGET ... PASS|MISS`` lines for issue 21's targets
(``prefixes`` mean accuracy over the classification targets above ``pretrained-*``
and TF-IDF, within 1 point of ``shared`` or better, per downstream model; adding a
source task below 1/N of retraining ``shared``; bit-identity), and writes
``transfer.json`` and ``transfer.png``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    compiled_flops,
    environment,
    fill_defaults,
    fmt,
    markdown_table,
    pyplot,
    save_figure,
    str_list,
    write_json,
)
from benchmarks.quality import (  # noqa: E402
    SPREAD_TEXTS,
    f3,
    format_spreads,
    run_task_spread,
    split_examples,
    subsample_train,
    tfidf_reference,
)

ROOT = Path(__file__).resolve().parents[1]
QUICK = dict(config=str(ROOT / "configs" / "tiny.py"), train_seeds="0", seeds="0",
             steps=4, max_train=256)
FULL = dict(config=str(ROOT / "configs" / "debian_packages.py"), train_seeds="0",
            seeds="0,1,2", steps=None, max_train=None)
#: Default (sources, targets) by the config's task set.
DEFAULT_SPLITS = {
    frozenset({"section", "role", "implemented_in", "interface"}):
        (("role", "implemented_in", "interface"), ("section",)),
    frozenset({"section", "role", "x11", "suite", "made_of", "admin", "network", "security",
               "multi_arch", "architecture", "log2_installed_kb"}):
        (("section", "architecture", "x11", "suite", "made_of", "admin"),
         ("role", "multi_arch", "network", "security", "log2_installed_kb")),
}
#: The prefixes' reading of the text: DESIGN.md section 4's conditional pooler, a task
#: query over the last-layer states that starts at mean pooling (all-MiniLM-L6-v2's own
#: reading). The config's `prompt` pooler starts each prefix at a copy of [CLS], the
#: frozen encoder's weakest reading: 3.0 points lower on the dev set's targets, 0.4 on
#: the demo's (benchmarks/README.md, "deep prefixes read by the conditional pooler").
PREFIX_OVERRIDES = "model.pooler=conditional"
REPRESENTATIONS = ("pretrained-cls", "pretrained-mean", "prefixes", "shared")
MODELS = ("lr", "mlp")
TFIDF = "tfidf"
#: Texts the bit-identity check embeds.
IDENTITY_TEXTS = 128
LR_C = (0.01, 0.1, 1.0)
RIDGE_ALPHA = (1.0, 10.0, 100.0)
MLP_HIDDEN = 256
MLP_MAX_EPOCHS = 60
MLP_PATIENCE = 6


# ---------------------------------------------------------------------------- arguments


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a config file whose arg takes mode= and seed= "
                   f"(default {FULL['config']})")
    p.add_argument("--data", help="another data directory (data.path) for the same tasks")
    p.add_argument("--sources", help="comma-separated source tasks (default: by task set)")
    p.add_argument("--targets", help="comma-separated target tasks (default: by task set)")
    p.add_argument("--add-tasks", help="source tasks to add one at a time for the update "
                   "cost (default: every source; --quick: the last)")
    p.add_argument("--prefix-overrides", default=PREFIX_OVERRIDES,
                   help="key=value;... config fields for the prefixes runs and the added "
                   "prefixes (default %(default)r; '' for the config's own pooler; e.g. "
                   "model.num_prompts=4); runs with other overrides than the default are "
                   "named after them")
    p.add_argument("--train-seeds", help="seeds of the prefixes and shared runs "
                   f"(default {FULL['train_seeds']})")
    p.add_argument("--seeds", help=f"downstream model seeds (default {FULL['seeds']})")
    p.add_argument("--steps", type=int, help="train.steps of the source runs "
                   "(default: the config's)")
    p.add_argument("--max-train", type=int, help="a random subset of this many training "
                   "texts (the same for every run, representation and the reference)")
    p.add_argument("--models", default=",".join(MODELS), help=f"downstream models of {MODELS}")
    p.add_argument("--out", type=Path, required=True, help="directory for runs and results")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--quick", action="store_true", help="the tiny config, 4 steps")
    args = p.parse_args(argv)
    fill_defaults(args, QUICK if args.quick else FULL)
    args.models = str_list(args.models, MODELS)
    args.train_seeds, args.seeds = (_ints(args.train_seeds, "--train-seeds"),
                                    _ints(args.seeds, "--seeds"))
    args.out = args.out.resolve()
    args.prefix_flags = _flags(args.prefix_overrides)
    if any("=" not in f for f in args.prefix_flags):
        raise SystemExit(f"--prefix-overrides {args.prefix_overrides!r}: expected key=value;...")
    # a short stable tag of other overrides than the default, so that they train other runs
    args.prefix_tag = ("-" + hashlib.sha1(";".join(args.prefix_flags).encode()).hexdigest()[:8]
                       if args.prefix_flags != _flags(PREFIX_OVERRIDES) else "")
    return args


def _flags(overrides: str) -> tuple[str, ...]:
    """``key=value;...`` -> the trainer's ``--config.key=value`` flags."""
    return tuple(f"--config.{x.strip().removeprefix('--config.')}"
                 for x in overrides.split(";") if x.strip())


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise SystemExit(f"{flag} {text!r}: expected comma-separated integers") from None
    if not values:
        raise SystemExit(f"{flag}: at least one seed")
    return values


def task_split(args, names: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """(sources, targets, tasks to add) from the flags or the task set's defaults."""
    default = DEFAULT_SPLITS.get(frozenset(names))
    if (args.sources is None or args.targets is None) and default is None:
        raise SystemExit(f"no default split for tasks {sorted(names)}: give --sources and "
                         "--targets")
    sources = str_list(args.sources, names) if args.sources else list(default[0])
    targets = str_list(args.targets, names) if args.targets else list(default[1])
    if set(sources) & set(targets):
        raise SystemExit(f"tasks {sorted(set(sources) & set(targets))} are both sources and "
                         "targets")
    if args.add_tasks:
        add = str_list(args.add_tasks, sources)
    else:  # --quick: the last source only
        add = sources[-1:] if args.quick else list(sources)
    return sources, targets, add


# ---------------------------------------------------------------------------- runs


def base_config(args, mode: str = "mtop", seed: int = 0, flags: Sequence[str] = ()):
    from mtop_jax.config.loading import load_config

    flags = [f"--config.train.seed={seed}", f"--config.data.seed={seed}", *flags]
    if args.data:
        flags.append(f"--config.data.path={args.data}")
    return load_config(f"{args.config}:mode={mode},seed={seed}", flags)


def restricted(config, tasks: Sequence[str], train_file: Path | None):
    """``config`` with only ``tasks`` (in the config's order) and ``train_file``."""
    config = copy.deepcopy(config)
    config.data.tasks = {name: config.data.tasks[name] for name in config.data.tasks
                         if name in tasks}
    if train_file is not None:
        config.data.splits = {**dict(config.data.get("splits") or {}),
                              "train": str(train_file)}
    return config


def run_config(args, mode: str, seed: int, tasks: Sequence[str], train_file: Path,
               steps: int, stage: str):
    """The trainer's config of one run: no evaluation (the downstream models are what is
    scored), one checkpoint, at the end; ``--prefix-overrides`` on the ``prompts`` runs."""
    flags = [f"--config.train.steps={steps}", f"--config.train.stage={stage}",
             "--config.train.eval_split=", "--config.train.test_split=",
             "--config.train.best_metric=", "--config.predict_examples=0",
             f"--config.train.checkpoint_every={steps}"]
    if stage == "prompts":
        flags += args.prefix_flags
    return restricted(base_config(args, mode, seed, flags), tasks, train_file)


def labelled_file(config, tasks: Sequence[str], train_file: Path | None, out: Path,
                  name: str) -> tuple[Path, int]:
    """A file of the training texts labelled for at least one of ``tasks`` (and how
    many), in file order."""
    from mtop_jax.data.local_files import split_file

    source = train_file or split_file(config.data.to_dict(), "train")
    lines = Path(source).read_text().splitlines()
    _, examples = split_examples(restricted(config, tasks, train_file), "train")
    if len(examples) > len(lines):
        raise SystemExit(f"{source}: {len(examples)} examples from {len(lines)} lines?")
    keep = np.flatnonzero(~np.isnan(examples.labels).all(axis=1))
    path = out / "data" / f"train-{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines[i] + "\n" for i in keep))
    return path, len(keep)


def trained(train, name: str, config, out: Path) -> dict[str, Any]:
    """Train the run ``name``; its workdir, steps and training wall time. A run that
    finished in an earlier call (its last checkpoint and its stored wall time present) is
    reused as it is."""
    workdir = out / "runs" / name
    steps = int(config.train.steps)
    timing = out / "runs" / f"{name}.wall.json"
    done = lambda: (workdir / "checkpoints" / str(steps)).is_dir()
    stored = json.loads(timing.read_text()) if timing.exists() else None
    if stored is None or not done():
        t0 = time.perf_counter()
        train(config, workdir)  # no evaluation: it returns {}
        if not done():  # SIGTERM: the trainer saved where it was
            raise SystemExit(f"transfer: run {name} was interrupted (saved); run the same "
                             "command again to resume it")
        stored = {"wall_s": time.perf_counter() - t0}
        write_json(timing, stored)
    return {"name": name, "workdir": str(workdir), "steps": steps, "wall_s": stored["wall_s"]}


def step_flops(config, out: Path, name: str) -> float | None:
    """Compiled FLOPs of one train step of ``config`` at its longest length, on one
    device (stored beside the run)."""
    import jax

    from mtop_jax.data.pipeline import build_dataset
    from mtop_jax.parallel.sharding import to_global
    from mtop_jax.training.setup import load_tokenizer, setup
    from mtop_jax.training.steps import BATCH_KEYS

    cache = out / "runs" / f"{name}.flops.json"
    if cache.exists():
        return json.loads(cache.read_text())["flops_per_step"]
    tokenizer = load_tokenizer(config)
    dataset = build_dataset(config.data, tokenizer, "train")
    # one device: the whole step's FLOPs (on a mesh XLA counts one device's share)
    run = setup(config, dataset.tasks, tokenizer, devices=jax.devices()[:1])
    host = next(dataset.train_iterator(seed=0))
    length = int(config.data.max_length)
    host = {k: np.pad(v, ((0, 0), (0, length - v.shape[1])))
            if k in ("input_ids", "attention_mask", "token_type_ids") else v
            for k, v in host.items() if k in BATCH_KEYS}
    batch = to_global(host, run.data_sharding, BATCH_KEYS)
    flops = compiled_flops(run.train_step.lower(run.state, batch).compile())
    write_json(cache, {"flops_per_step": flops, "batch": list(host["input_ids"].shape)})
    del run
    jax.clear_caches()
    return flops


# ---------------------------------------------------------------------------- features


def mtop_features(predictor, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """``prefixes`` ([h_1; ..; h_N]), ``pretrained-cls`` and ``pretrained-mean`` of a
    ``prompts``-stage mtop model, one pass per batch: its backbone is the pretrained one,
    and its input states are the plain encoder's (I1)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mtop_jax.models.pooling import pool_tasks

    graphdef = predictor.graphdef

    @jax.jit
    def run(params, rest, ids, mask, types):
        model = nnx.merge(graphdef, params, rest)
        x, p = model.mtop_states(ids, mask, types)
        feats = pool_tasks(model.cfg.pooler, model.encoder.pooler, model.queries, x, p, mask)
        cls = model.encoder.pooler(model.encoder.pool_input(x, mask))
        m = mask[..., None].astype(x.dtype)
        mean = (x * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1)
        return feats.reshape(feats.shape[0], -1), cls, mean

    parts: list[tuple[np.ndarray, ...]] = []
    for n, batch in predictor.batches(texts):
        out = run(predictor.params, predictor.rest, *predictor.place(batch))
        parts.append(tuple(np.asarray(a)[:n] for a in out))
    names = ("prefixes", "pretrained-cls", "pretrained-mean")
    return {k: np.concatenate([p[i] for p in parts]) for i, k in enumerate(names)}


def shared_features(predictor, texts: Sequence[str]) -> np.ndarray:
    """The pooled [CLS] of a ``shared`` model: ``embed`` repeats it per task; one copy."""
    feats = predictor.embed(texts)
    hidden = predictor.spec.encoder.hidden_size
    copies = feats.reshape(len(feats), -1, hidden)
    if not np.array_equal(copies, np.broadcast_to(copies[:, :1], copies.shape)):
        raise SystemExit("shared: embed's per-task copies differ")
    return copies[:, 0]


# ---------------------------------------------------------------------------- downstream


def standardise(x_train, *others):
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_train)
    return [scaler.transform(x).astype(np.float32) for x in (x_train, *others)]


def fit_linear(regression: bool, x, y, xv, yv):
    """Logistic regression (C) or ridge (alpha), the value best on validation."""
    from sklearn.linear_model import LogisticRegression, Ridge

    if regression:
        fitted = [Ridge(alpha=a).fit(x, y) for a in RIDGE_ALPHA]
        errors = [np.mean((m.predict(xv) - yv) ** 2) for m in fitted]
        return fitted[int(np.argmin(errors))]
    fitted = [LogisticRegression(C=c, max_iter=500).fit(x, y) for c in LR_C]
    accuracy = [np.mean(m.predict(xv) == yv) for m in fitted]
    return fitted[int(np.argmax(accuracy))]


def fit_mlp(regression: bool, x, y, xv, yv, seed: int):
    """One hidden layer of 256 (ReLU, Adam), early-stopped on the validation split: the
    epoch best there (accuracy, or squared error), patience 6 epochs."""
    from sklearn.neural_network import MLPClassifier, MLPRegressor

    if regression:
        mean, std = float(np.mean(y)), float(np.std(y)) or 1.0
        model = MLPRegressor(hidden_layer_sizes=(MLP_HIDDEN,), alpha=1e-3, random_state=seed,
                             learning_rate_init=1e-3, batch_size=64)
        fit = lambda: model.partial_fit(x, (y - mean) / std)
        score = lambda m: -np.mean((m.predict(xv) * std + mean - yv) ** 2)
    else:
        classes = np.unique(y)
        model = MLPClassifier(hidden_layer_sizes=(MLP_HIDDEN,), alpha=1e-3, random_state=seed,
                              learning_rate_init=1e-3, batch_size=64)
        fit = lambda: model.partial_fit(x, y, classes=classes)
        score = lambda m: np.mean(m.predict(xv) == yv)
    best, best_score, since = None, -np.inf, 0
    for _ in range(MLP_MAX_EPOCHS):
        fit()
        s = score(model)
        if s > best_score:
            best, best_score, since = copy.deepcopy(model), s, 0
        else:
            since += 1
            if since >= MLP_PATIENCE:
                break
    if regression:
        return _Scaled(best, mean, std)
    return best


class _Scaled:
    def __init__(self, model, mean: float, std: float):
        self.model, self.mean, self.std = model, mean, std

    def predict(self, x):
        return self.model.predict(x) * self.std + self.mean


def downstream(tasks, sets, feats: dict[str, np.ndarray], model: str, seed: int
               ) -> dict[str, dict[str, float]]:
    """One downstream ``model`` per target task on features ``feats[split]`` of the rows
    of ``sets[split]`` (ExampleSets of the target tasks): the trainer's metrics per split."""
    from mtop_jax.training.metrics import task_metrics

    x_train, x_valid, x_test = standardise(feats["train"], feats["validation"], feats["test"])
    xs = {"validation": x_valid, "test": x_test}
    predictions = {split: {} for split in xs}
    labels = {split: {} for split in xs}
    for t, spec in enumerate(tasks):
        y, yv = sets["train"].labels[:, t], sets["validation"].labels[:, t]
        keep, keep_v = ~np.isnan(y), ~np.isnan(yv)
        ys, yvs = (y[keep], yv[keep_v]) if spec.is_regression else (
            y[keep].astype(int), yv[keep_v].astype(int))
        if not spec.is_regression and len(np.unique(ys)) < 2:
            fitted = _Constant(int(ys[0]) if len(ys) else 0)
        elif model == "lr":
            fitted = fit_linear(spec.is_regression, x_train[keep], ys, x_valid[keep_v], yvs)
        else:
            fitted = fit_mlp(spec.is_regression, x_train[keep], ys, x_valid[keep_v], yvs,
                             seed)
        for split, x in xs.items():
            target = sets[split].labels[:, t]
            predictions[split][spec.name] = fitted.predict(x)
            labels[split][spec.name] = (target if spec.is_regression else
                                        np.nan_to_num(target, nan=-1).astype(int))
    return {split: task_metrics(tasks, predictions[split], labels[split]) for split in xs}


class _Constant:
    def __init__(self, value: int):
        self.value = value

    def predict(self, x):
        return np.full(x.shape[0], self.value)


# ---------------------------------------------------------------------------- update cost


def with_task(old, new):
    """A predictor of ``old``'s tasks followed by ``new``'s: ``old``'s parameters, plus
    ``new``'s per-task rows (classes padded to the wider head). Both must share every other
    parameter bit for bit (the same frozen backbone), else SystemExit."""
    import jax.numpy as jnp
    from flax import nnx

    from mtop_jax.models.axes import is_per_task, logical_axes
    from mtop_jax.models.spec import ModelSpec, abstract_model
    from mtop_jax.serving.predictor import Predictor

    spec = ModelSpec(old.spec.encoder, old.spec.model, (*old.spec.tasks, *new.spec.tasks))
    _, abstract, _ = nnx.split(abstract_model(spec, eval_mode=True), nnx.Param, ...)
    a = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(old.params)}
    b = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(new.params)}
    flat = []
    for path, var in nnx.to_flat_state(abstract):
        path = tuple(path)
        x, y = np.asarray(a[path]), np.asarray(b[path])
        if is_per_task(var):
            if logical_axes(var)[-1] == "classes":
                width = var.get_value().shape[-1]
                x, y = (np.pad(z, [(0, 0)] * (z.ndim - 1) + [(0, width - z.shape[-1])])
                        for z in (x, y))
            value = np.concatenate([x, y])
        elif np.array_equal(x, y):
            value = x
        else:
            raise SystemExit(f"{'/'.join(map(str, path))}: differs between the two models "
                             "(not the same frozen backbone)")
        flat.append((path, var.replace(jnp.asarray(value))))
    return Predictor(spec, nnx.from_flat_state(flat), old.tokenizer,
                     max_length=old.max_length, batch_size=old.batch_size)


def identity_check(prefixes, added, task: str, texts: Sequence[str]) -> dict[str, Any]:
    """``prefixes`` without ``task``, then with ``added``'s prefix for it appended: are the
    other tasks' columns of ``embed`` bit-identical?"""
    from mtop_jax.serving.task_edit import remove_tasks

    old = remove_tasks(prefixes, [task])
    grown = with_task(old, added)
    before, after = old.embed(texts), grown.embed(texts)
    width = before.shape[1]
    new_alone = added.embed(texts)
    return {"task": task, "texts": len(texts), "old_tasks": list(old.task_names),
            "old_columns_identical": bool(np.array_equal(before, after[:, :width])),
            "max_abs_diff": float(np.max(np.abs(before - after[:, :width]))),
            "new_column_identical_to_its_own_run": bool(
                np.array_equal(new_alone, after[:, width:])),
            "new_column_max_abs_diff": float(np.max(np.abs(new_alone - after[:, width:])))}


# ---------------------------------------------------------------------------- report


def column(rep: str, model: str) -> str:
    return f"{rep}/{model}"


def mean_accuracy(metrics: dict[str, float], tasks) -> float:
    values = [metrics[f"{t.name}/accuracy"] for t in tasks
              if not t.is_regression and f"{t.name}/accuracy" in metrics]
    return float(np.mean(values)) if values else float("nan")


def spread(values: Sequence[float]) -> str:
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f3(values[0])
    return f"{f3(statistics.fmean(values))} ± {f3(statistics.stdev(values))}"


def grouped(results: list[dict[str, Any]], split: str) -> dict[str, list[dict[str, float]]]:
    out: dict[str, list[dict[str, float]]] = {}
    for r in results:
        out.setdefault(column(r["representation"], r["model"]), []).append(r[split])
    return out


def metric_columns(tasks) -> list[tuple[str, str, str]]:
    cols = []
    for t in tasks:
        if t.is_regression:
            cols += [(t.name, "r2", f"{t.name} R^2"), (t.name, "spearman", f"{t.name} Spearman")]
        else:
            cols.append((t.name, "accuracy", f"{t.name} acc"))
    return cols


def report(tasks, results, widths: dict[str, int], split: str = "test") -> str:
    groups = grouped(results, split)
    cols = metric_columns(tasks)
    headers = ["representation/model", "width", *(c[2] for c in cols)]
    if any(not t.is_regression for t in tasks):
        headers.append("mean acc")
    first = next(iter(groups.values()))[0]
    rows = [["labelled texts", "", *(int(first.get(f"{t}/count", 0)) for t, _, _ in cols)]
            + ([""] if len(headers) > len(cols) + 2 else [])]
    for label, runs in groups.items():
        row = [label, widths.get(label.split("/")[0], "-")]
        row += [spread([m.get(f"{t}/{k}", np.nan) for m in runs]) for t, k, _ in cols]
        if len(headers) > len(cols) + 2:
            row.append(spread([mean_accuracy(m, tasks) for m in runs]))
        rows.append(row)
    return markdown_table(headers, rows)


def mean_of(runs: list[dict[str, float]], tasks) -> float:
    return float(np.mean([mean_accuracy(m, tasks) for m in runs]))


def target_checks(tasks, results, update: dict[str, Any], split: str = "test"
                  ) -> list[dict[str, Any]]:
    """Issue 21's targets: per downstream model, ``prefixes``' mean accuracy (over seeds and
    classification targets) above each ``pretrained-*`` and TF-IDF's, and at least
    ``shared``'s - 1 point; the mean cost of adding a source task (FLOPs and wall time)
    below 1/N of retraining ``shared``; the old columns bit-identical."""
    groups = grouped(results, split)
    checks = []

    def check(what, value, threshold, passed):
        checks.append({"target": what, "value": value, "threshold": threshold,
                       "pass": bool(passed)})

    if any(not t.is_regression for t in tasks):
        tfidf = groups.get(column(TFIDF, "lr"))
        for model in MODELS:
            ours = groups.get(column("prefixes", model))
            if not ours:
                continue
            mine = mean_of(ours, tasks)
            for rep in ("pretrained-cls", "pretrained-mean"):
                if column(rep, model) in groups:
                    other = mean_of(groups[column(rep, model)], tasks)
                    check(f"prefixes/{model} mean acc > {rep}/{model}", mine, other,
                          mine > other)
            if tfidf:
                other = mean_of(tfidf, tasks)
                check(f"prefixes/{model} mean acc > TF-IDF", mine, other, mine > other)
            if column("shared", model) in groups:
                other = mean_of(groups[column("shared", model)], tasks) - 0.01
                check(f"prefixes/{model} mean acc >= shared/{model} - 1", mine, other,
                      mine >= other)
    adds = update.get("added", [])
    n = update.get("num_sources", 0)
    for key, what in (("flops_ratio", "FLOPs"), ("wall_ratio", "wall time")):
        values = [a[key] for a in adds if a.get(key) is not None]
        if values and n:
            mean = float(np.mean(values))
            check(f"adding a source task: {what} / retraining shared < 1/N (mean of "
                  f"{len(values)})", mean, 1 / n, mean < 1 / n)
    identity = update.get("identity", [])
    if identity:
        ok = all(i["old_columns_identical"] for i in identity)
        check(f"existing representations bit-identical after adding a task "
              f"({len(identity)} tasks)", float(ok), 1.0, ok)
    return checks


def format_checks(checks: list[dict[str, Any]]) -> str:
    return "\n".join(f"TARGET {c['target']}: {c['value']:.4f} vs {c['threshold']:.4f} -> "
                     f"{'PASS' if c['pass'] else 'MISS'}" for c in checks)


def update_table(update: dict[str, Any]) -> str:
    shared = update["shared"]
    rows = [["retrain shared (N tasks)", shared["steps"], fmt(shared["flops_per_step"]),
             fmt(shared["flops"]), f"{shared['wall_s']:.1f}", "1", "1", "-"]]
    identity = {i["task"]: i for i in update.get("identity", [])}
    for a in update["added"]:
        same = identity.get(a["task"], {}).get("old_columns_identical")
        rows.append([f"add prefix: {a['task']} ({a['texts']} texts)", a["steps"],
                     fmt(a["flops_per_step"]), fmt(a["flops"]), f"{a['wall_s']:.1f}",
                     fmt(a["flops_ratio"]), fmt(a["wall_ratio"]),
                     "-" if same is None else ("yes" if same else "NO")])
    table = markdown_table(["update", "steps", "FLOPs/step", "FLOPs", "wall s",
                            "FLOPs ratio", "wall ratio", "old columns bit-identical"], rows)
    return (f"{table}\n\nN = {update['num_sources']} source tasks: 1/N = "
            f"{1 / update['num_sources']:.3f}")


def plot(tasks, results, update, path: Path, split: str = "test") -> None:
    plt = pyplot()
    groups = grouped(results, split)
    reps = [*REPRESENTATIONS, TFIDF]
    classification = any(not t.is_regression for t in tasks)
    fig, (ax, ax_cost) = plt.subplots(1, 2, figsize=(12, 4),
                                      gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(MODELS)
    for i, model in enumerate(MODELS):
        means, errs = [], []
        for rep in reps:
            runs = groups.get(column(rep, model), [])
            if classification:
                values = [mean_accuracy(m, tasks) for m in runs]
            else:
                values = [float(np.mean([m.get(f"{t.name}/spearman", np.nan) for t in tasks]))
                          for m in runs]
            means.append(np.mean(values) if values else np.nan)
            errs.append(np.std(values) if len(values) > 1 else 0)
        ax.bar(np.arange(len(reps)) + i * width, means, width, yerr=errs, capsize=2,
               label=model)
    ax.set_xticks(np.arange(len(reps)) + width / 2, reps, rotation=20, ha="right")
    ax.set_ylabel(f"{split} mean accuracy" if classification else f"{split} Spearman")
    ax.set_title(f"target tasks {', '.join(t.name for t in tasks)}", fontsize=9)
    ax.legend(fontsize=8)
    added = update.get("added", [])
    if added:
        names = [a["task"] for a in added]
        x = np.arange(len(names))
        ax_cost.bar(x - 0.2, [a["flops_ratio"] or 0 for a in added], 0.4, label="FLOPs")
        ax_cost.bar(x + 0.2, [a["wall_ratio"] or 0 for a in added], 0.4, label="wall time")
        ax_cost.axhline(1 / update["num_sources"], color="k", ls="--", lw=1, label="1/N")
        ax_cost.set_xticks(x, names, rotation=20, ha="right")
        ax_cost.set_ylabel("cost / retraining shared")
        ax_cost.set_title("adding one source task as a prefix", fontsize=9)
        ax_cost.legend(fontsize=8)
    save_figure(fig, path)


# ---------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from tqdm import tqdm

    from mtop_jax import load
    from mtop_jax.training.loop import train

    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    config = base_config(args)
    names = list(config.data.tasks)
    sources, targets, add = task_split(args, names)
    steps = int(args.steps or config.train.steps)
    subset = subsample_train(config, args.max_train, args.out)
    source_file, n_sources_texts = labelled_file(config, sources, subset, args.out, "sources")

    # ------------------------------------------------------------------ training runs
    plan = []
    for seed in args.train_seeds:
        for rep, mode, stage in (("prefixes", "mtop", "prompts"), ("shared", "shared", "full")):
            tag = args.prefix_tag if rep == "prefixes" else ""
            plan.append((f"{rep}{tag}-seed{seed}", run_config(args, mode, seed, sources,
                                                         source_file, steps, stage)))
    seed0 = args.train_seeds[0]
    add_info = {}
    for task in add:
        path, n = labelled_file(config, [task], subset, args.out, task)
        task_steps = max(1, math.ceil(steps * n / n_sources_texts))
        add_info[task] = {"task": task, "texts": n, "steps": task_steps}
        plan.append((f"add-{task}{args.prefix_tag}-seed{seed0}",
                     run_config(args, "mtop", seed0, [task], path, task_steps, "prompts")))
    runs = {}
    for name, run_cfg in tqdm(plan, desc="transfer runs", dynamic_ncols=True):
        runs[name] = {**trained(train, name, run_cfg, args.out), "config": run_cfg}

    # ------------------------------------------------------------------ target data
    target_config = restricted(config, targets, subset)
    tasks, train_set = split_examples(target_config, "train")
    sets = {"train": train_set}
    for split in ("validation", "test"):
        sets[split] = split_examples(target_config, split, tasks)[1]
    rows = {split: np.flatnonzero(~np.isnan(s.labels).all(axis=1)) for split, s in sets.items()}
    sets = {split: _take(s, rows[split]) for split, s in sets.items()}
    texts = {split: s.texts for split, s in sets.items()}

    # ------------------------------------------------------------------ features + models
    results: list[dict[str, Any]] = []
    widths: dict[str, int] = {}
    embed_s: dict[str, float] = {}
    jobs = [(seed, rep) for seed in args.train_seeds for rep in ("prefixes", "shared")]
    for seed, rep in tqdm(jobs, desc="embed + downstream", dynamic_ncols=True):
        t0 = time.perf_counter()
        tag = args.prefix_tag if rep == "prefixes" else ""
        predictor = load(runs[f"{rep}{tag}-seed{seed}"]["workdir"], batch_size=64)
        if rep == "prefixes":
            feats = {s: mtop_features(predictor, texts[s]) for s in texts}
            by_rep = {r: {s: feats[s][r] for s in texts} for r in feats["train"]}
            if seed != seed0:  # the pretrained encoder is the same for every seed
                by_rep = {"prefixes": by_rep["prefixes"]}
        else:
            by_rep = {"shared": {s: shared_features(predictor, texts[s]) for s in texts}}
        embed_s[f"{rep}{tag}-seed{seed}"] = time.perf_counter() - t0
        for r, feats in by_rep.items():
            widths[r] = int(feats["train"].shape[1])
            for model in args.models:
                for ds_seed in (args.seeds if model == "mlp" else args.seeds[:1]):
                    scores = downstream(tasks, sets, feats, model, ds_seed)
                    results.append({"representation": r, "model": model, "train_seed": seed,
                                    "seed": ds_seed, **scores})
    reference = tfidf_reference(restricted(config, targets, subset))
    results.append({"representation": TFIDF, "model": "lr", "train_seed": None, "seed": None,
                    **reference})
    results.sort(key=lambda r: ([*REPRESENTATIONS, TFIDF].index(r["representation"]),
                                MODELS.index(r["model"])))

    # How far apart the source prefixes' states are (0: N copies of one vector), on the
    # target tasks' validation texts.
    spreads = [{"recipe": f"prefixes{args.prefix_tag}", "seed": seed,
                "task_spread": run_task_spread(runs[f"prefixes{args.prefix_tag}-seed{seed}"]
                                               ["workdir"], texts["validation"][:SPREAD_TEXTS])}
               for seed in args.train_seeds if len(sources) > 1]

    # ------------------------------------------------------------------ update cost
    shared0 = runs[f"shared-seed{seed0}"]
    shared_flops = step_flops(shared0["config"], args.out, shared0["name"])
    update: dict[str, Any] = {
        "num_sources": len(sources),
        "shared": {"run": shared0["name"], "steps": shared0["steps"], "wall_s": shared0["wall_s"],
                   "flops_per_step": shared_flops,
                   "flops": shared_flops * shared0["steps"] if shared_flops else None},
        "added": [], "identity": []}
    prefixes0 = load(runs[f"prefixes{args.prefix_tag}-seed{seed0}"]["workdir"])
    probe = texts["test"][:IDENTITY_TEXTS]
    for task in add:
        run = runs[f"add-{task}{args.prefix_tag}-seed{seed0}"]
        flops = step_flops(run["config"], args.out, run["name"])
        total = flops * run["steps"] if flops else None
        update["added"].append({
            **add_info[task], "run": run["name"], "wall_s": run["wall_s"],
            "flops_per_step": flops, "flops": total,
            "flops_ratio": total / update["shared"]["flops"] if total and shared_flops else None,
            "wall_ratio": run["wall_s"] / shared0["wall_s"]})
        if len(sources) > 1:
            update["identity"].append(identity_check(prefixes0, load(run["workdir"]), task,
                                                     probe))

    # ------------------------------------------------------------------ report
    train_walls = ", ".join(f"{name} {r['wall_s'] / 60:.1f} min ({r['steps']} steps)"
                            for name, r in runs.items())
    text = "\n\n".join([
        f"Sources {', '.join(sources)} (N = {len(sources)}, {n_sources_texts} training "
        f"texts labelled for one at least); targets {', '.join(targets)}. Test split; mean "
        f"± standard deviation over training seeds {args.train_seeds} x downstream seeds "
        f"{args.seeds} (lr: deterministic, one per training seed). Training: "
        + train_walls,
        report(tasks, results, widths),
        update_table(update)])
    if spreads:
        text += "\n\n" + format_spreads(spreads)
    checks = target_checks(tasks, results, update)
    if checks:
        text += "\n\n" + format_checks(checks)
    print(text)
    out = {**environment(argv), "config": args.config, "data": args.data,
           "max_train": args.max_train, "steps": steps,
           "prefix_overrides": list(args.prefix_flags), "sources": sources, "targets": targets,
           "add_tasks": add, "train_seeds": args.train_seeds, "seeds": args.seeds,
           "tasks": [t.name for t in tasks],
           "texts": {split: len(t) for split, t in texts.items()},
           "runs": {name: {k: v for k, v in r.items() if k != "config"}
                    for name, r in runs.items()},
           "widths": widths, "embed_and_fit_s": embed_s, "results": results, "update": update,
           "table": text, "targets_checked": checks, "task_spread": spreads,
           "wall_s": time.perf_counter() - t_start}
    write_json(args.out / "transfer.json", out)
    if not args.no_plot:
        plot(tasks, results, update, args.out / "transfer.png")
    return out


def _take(examples, rows: np.ndarray):
    from mtop_jax.data.examples import ExampleSet

    return ExampleSet(examples.tasks, [examples.texts[i] for i in rows],
                      examples.labels[rows], name=examples.name)


if __name__ == "__main__":
    main()

"""Training: one readable loop, in the order it runs.

    mtop-jax train --config configs/debian_packages.py --workdir workdirs/demo

Sections: config and mesh -> data -> model, optimizer and state (created
sharded) -> resume -> jitted steps -> the loop (log, evaluate, checkpoint,
stop on SIGTERM) -> final evaluation and a one-pass prediction demo.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from mtop_jax import optim
from mtop_jax.checkpointing import Checkpoints
from mtop_jax.data.pipeline import Dataset, build_dataset
from mtop_jax.defaults import check_config
from mtop_jax.errors import ConfigError, MtopError
from mtop_jax.files import as_path
from mtop_jax.metric_writers import MetricWriter
from mtop_jax.metrics import task_metrics
from mtop_jax.models.multitask import ModelConfig
from mtop_jax.sharding import make_mesh
from mtop_jax.state import (
    ModelSpec,
    TrainState,
    create_model,
    create_state,
    load_tokenizer,
    read_model_spec,
    resolve_encoder,
    split_model,
    write_model_files,
)
from mtop_jax.steps import BATCH_KEYS, make_eval_step, make_train_step, weighting_optimizer
from mtop_jax.weighting import make_weighting

log = logging.getLogger("mtop_jax.train")


# ---------------------------------------------------------------------------- helpers


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    batch_axes = dict((k, v) for k, v in rules).get("batch")
    batch_axes = tuple(batch_axes) if isinstance(batch_axes, list) else batch_axes
    return NamedSharding(mesh, PartitionSpec(batch_axes))


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding,
              keys: Iterable[str] = BATCH_KEYS) -> dict[str, jax.Array]:
    """This process's rows -> global arrays over the mesh (multi-host ready)."""
    return {k: jax.make_array_from_process_local_data(sharding, batch[k]) for k in keys}


def check_batch_fits_mesh(config: Any, mesh: Mesh, sharding: NamedSharding) -> None:
    spec = sharding.spec[0]
    axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
    ways = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    for key in ("batch_size", "eval_batch_size"):
        size = config.data.get(key) or config.data.batch_size
        if size % ways:
            raise ConfigError(f"data.{key}={size} does not divide over the {ways} data-parallel "
                              f"devices of mesh {dict(mesh.shape)}")


def checked_mesh(config: Any, devices=None) -> tuple[Mesh, list, NamedSharding]:
    """(mesh, logical axis rules, batch sharding), once the mesh fits the devices and the
    batch divides over it: cheap, so ``train`` runs it before any data or compile."""
    mesh = make_mesh(dict(config.mesh), devices)
    rules = [(k, tuple(v) if isinstance(v, list) else v) for k, v in config.rules]
    data_sharding = batch_sharding(mesh, rules)
    check_batch_fits_mesh(config, mesh, data_sharding)
    return mesh, rules, data_sharding


def evaluate(eval_step, params, rest, dataset: Dataset, sharding: NamedSharding,
             desc: str = "eval") -> tuple[dict[str, float], dict[str, float]]:
    """(metrics {task/metric: value, score}, mean loss per task) over a whole split."""
    n_tasks = len(dataset.tasks)
    preds = np.zeros((len(dataset), n_tasks), np.float32)
    loss_sums, counts = np.zeros(n_tasks), np.zeros(n_tasks)
    for batch in tqdm(dataset.eval_batches(), total=dataset.num_eval_batches, desc=desc,
                      leave=False, disable=jax.process_index() != 0):
        # Outputs are replicated: every process sees the whole global batch.
        out = jax.device_get(eval_step(params, rest, to_global(batch, sharding,
                                                               (*BATCH_KEYS, "index"))))
        rows = out["index"] >= 0
        preds[out["index"][rows]] = out["predictions"][rows]
        loss_sums += out["loss_sums"]
        counts += out["counts"]
    labels, values = {}, {}
    for t, spec in enumerate(dataset.tasks):
        y = dataset.examples.labels[:, t]
        labels[spec.name] = y if spec.is_regression else np.where(np.isnan(y), -1, y)
        values[spec.name] = preds[:, t]
    metrics = task_metrics(dataset.tasks, values, labels)
    mean_loss = {spec.name: float(loss_sums[t] / max(counts[t], 1))
                 for t, spec in enumerate(dataset.tasks)}
    return metrics, mean_loss


def weighting_scalars(metrics: dict, tasks) -> dict[str, float]:
    """The weighting method's diagnostics; per-task vectors become one scalar per task."""
    out = {}
    for key, value in metrics.items():
        if not key.startswith("weighting/"):
            continue
        value = np.asarray(value)
        if value.ndim == 1 and len(value) == len(tasks):
            out.update({f"{key}/{t.name}": float(v) for t, v in zip(tasks, value)})
        elif value.ndim == 0:
            out[key] = float(value)
    return out


class Preemption:
    """SIGTERM (a preempted TPU VM, a cluster's kill) -> save and exit cleanly.

    One process: a Python SIGTERM handler raises a flag. Several processes: JAX's
    preemption service (started by ``jax.distributed.initialize``) catches SIGTERM on
    any of them, and ``reached_preemption_sync_point`` turns true at the same step on
    all, so they save together; a Python handler would hide the signal from it.
    """

    def __init__(self):
        self.requested = False
        self.multihost = jax.process_count() > 1
        self._previous = (None if self.multihost
                          else signal.signal(signal.SIGTERM, self._handle))

    def _handle(self, signum, frame):
        self.requested = True

    def check(self, step: int) -> bool:
        if self.multihost and not self.requested:
            from jax.experimental import multihost_utils

            self.requested = multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class NonFiniteGuard:
    """Watches each step's ``finite`` flag (the step itself already skipped the update).

    Every non-finite step is logged with its batch: the data iterator position before
    it and the example rows, to a warning and a ``nonfinite`` record of metrics.jsonl.
    After ``limit`` in a row, training stops with :class:`MtopError`. Flags are read one
    step late, so checking does not stall the device queue.
    """

    def __init__(self, limit: int, writer: MetricWriter, run: int = 0):
        self.limit, self.writer = int(limit), writer
        self.run = int(run)  # non-finite steps in a row, as of the last step checked
        self.pending: tuple | None = None

    def push(self, step: int, position: dict, rows: np.ndarray, metrics: dict) -> None:
        self.pending = (step, position, rows, metrics["nonfinite_run"], metrics["loss"])

    def check_pending(self, last_checkpoint) -> None:
        if self.pending is None:
            return
        step, position, rows, run, loss = self.pending
        self.pending = None
        self.run = int(jax.device_get(run))  # the step's own count (state.nonfinite_run)
        if self.run == 0:
            return
        rows = [int(r) for r in np.asarray(rows) if r >= 0]
        where = (f"batch {position.get('step')} of the data iterator (epochs "
                 f"{position.get('epochs')}, cursors {position.get('cursors')})")
        log.warning("step %d: loss %s is not finite; update skipped; %s, train rows %s%s",
                    step, float(jax.device_get(loss)), where, rows[:16],
                    " ..." if len(rows) > 16 else "")
        self.writer.write_event(step, "nonfinite", {
            "loss": repr(float(jax.device_get(loss))), "in_a_row": self.run,
            "data_position": position, "train_rows": rows})
        if self.run >= self.limit:
            raise MtopError(
                f"step {step}: the loss was not finite for {self.run} steps in a row "
                f"(steps {step - self.run + 1}-{step}; those updates were skipped, "
                f"train.max_nonfinite_steps={self.limit}); stopping. The last good "
                f"checkpoint is step {last_checkpoint()}; the batches are in metrics.jsonl "
                "('nonfinite' records)")


def _wait_quietly(checkpoints: Checkpoints) -> None:
    try:
        checkpoints.wait()
    except MtopError as e:
        log.error("%s", e)


def count_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float((cost or {}).get("flops", 0.0))


# ---------------------------------------------------------------------------- setup


@dataclasses.dataclass
class Run:
    """Everything ``train`` and ``evaluate_workdir`` build from a config."""

    config: ml_collections.ConfigDict
    mesh: Mesh
    data_sharding: NamedSharding
    tokenizer: Any
    spec: ModelSpec
    state: TrainState
    state_shardings: TrainState
    train_graphdef: Any
    eval_graphdef: Any
    tx: Any
    schedules: dict
    weighting: Any
    weighting_tx: Any
    eval_step: Any


def setup(config: ml_collections.ConfigDict, tasks, *, init: bool = True,
          devices=None) -> Run:
    """Mesh (over ``devices``, default all), tokenizer, model (created sharded),
    optimizer and train state."""
    check_config(config)
    tcfg = config.train
    mesh, rules, data_sharding = checked_mesh(config, devices)
    weighting = build_weighting(config.weighting, len(tasks))  # its config errors: before init
    tokenizer = load_tokenizer(config)
    encoder_cfg, backbone = resolve_encoder(config, tokenizer)
    spec = ModelSpec(encoder=encoder_cfg, model=ModelConfig.from_dict(dict(config.model)),
                     tasks=tuple(tasks))
    model = create_model(spec, mesh, rules, seed=tcfg.seed, backbone=backbone)
    if init:
        _init_from(config, spec, model)
    model.train()
    train_graphdef, params, _ = split_model(model)
    model.eval()
    eval_graphdef, _, _ = split_model(model)
    tx, schedules = optim.make_optimizer(config.optim, tcfg.steps, params, tcfg.stage)
    weighting_tx = weighting_optimizer(config.weighting.learning_rate)
    wparams = weighting.init_params() if weighting.kind == "loss" else {}
    weighting_state = {"state": weighting.init(), "params": wparams,
                       "opt": weighting_tx.init(wparams)}
    state, state_shardings = create_state(model, tx, weighting_state, mesh, rules)
    eval_step = jax.jit(make_eval_step(eval_graphdef, spec.regression),
                        in_shardings=(state_shardings.params, state_shardings.rest,
                                      data_sharding),
                        out_shardings=NamedSharding(mesh, PartitionSpec()))
    return Run(config, mesh, data_sharding, tokenizer, spec, state, state_shardings,
               train_graphdef, eval_graphdef, tx, schedules, weighting, weighting_tx, eval_step)


def build_weighting(cfg: ml_collections.ConfigDict, num_tasks: int):
    """``config.weighting`` -> a method of ``mtop_jax.weighting``."""
    kwargs = dict(cfg.kwargs)
    if cfg.weights is not None:
        if cfg.method != "static":
            raise ConfigError(f"weighting.weights: only for method 'static', not {cfg.method!r}")
        if len(cfg.weights) != num_tasks:
            raise ConfigError(f"weighting.weights: {len(cfg.weights)} weights for "
                              f"{num_tasks} tasks")
        kwargs["weights"] = tuple(float(w) for w in cfg.weights)
    return make_weighting(cfg.method, num_tasks, **kwargs)


# ---------------------------------------------------------------------------- train


def train(config: ml_collections.ConfigDict, workdir: str | Path, *, devices=None,
          stop_at: int | None = None) -> dict[str, float]:
    """Train (or resume) in ``workdir``; returns the final evaluation metrics.

    ``stop_at``: behave as if preempted after that step (save, return {}).
    """
    workdir = as_path(workdir)  # gs:// stays gs:// (pathlib would make it gs:/)
    check_config(config)
    checked_mesh(config, devices)  # config mistakes fail here, before data and any compile
    preemption = Preemption()  # from the start: a SIGTERM during set-up still exits 0
    try:
        return _train(config, workdir, devices, stop_at, preemption)
    finally:
        preemption.restore()


def _train(config, workdir, devices, stop_at, preemption: Preemption) -> dict[str, float]:
    tcfg = config.train
    is_main = jax.process_index() == 0

    # ------------------------------------------------------------------ data
    tokenizer = load_tokenizer(config)
    train_set = build_dataset(config.data, tokenizer, "train")
    tasks = train_set.tasks
    eval_set = (build_dataset(config.data, tokenizer, tcfg.eval_split, tasks=tasks)
                if tcfg.eval_split else None)

    # ------------------------------------------------------------------ model and state
    run = setup(config, tasks, devices=devices)
    state, spec = run.state, run.spec
    if is_main:
        write_model_files(workdir, spec, run.tokenizer, config.to_json_best_effort(indent=2))
        trainable = optim.trainable_count(state.params, tcfg.stage, dict(config.optim.lr_mult))
        log.info("model: %s, %d tasks, %d trainable parameters", spec.model.mode, len(tasks),
                 trainable)

    # ------------------------------------------------------------------ resume
    checkpoints = Checkpoints(workdir, keep=tcfg.keep_checkpoints,
                              best_metric=f"eval/{tcfg.best_metric}" if tcfg.best_metric
                              else None, async_save=tcfg.async_checkpointing)
    train_iter = train_set.train_iterator(seed=tcfg.seed)
    # The newest readable step; unreadable newer ones are skipped (warned) and moved aside.
    restored = checkpoints.restore_latest(lambda s: checkpoints.restore(s, state),
                                          quarantine=workdir / "unreadable_checkpoints")
    start = 0
    if restored is not None:
        start, (state, data_state) = restored
        train_iter.load_state_dict(data_state)
        if is_main:
            log.info("resumed from step %d", start)

    # ------------------------------------------------------------------ jitted train step
    train_step = jax.jit(
        make_train_step(run.train_graphdef, run.tx, run.weighting, spec.regression,
                        run.weighting_tx),
        in_shardings=(run.state_shardings, run.data_sharding),
        out_shardings=(run.state_shardings, None), donate_argnums=0)

    writer = MetricWriter(workdir)

    def run_eval(dataset: Dataset, step: int, kind: str) -> dict[str, float]:
        metrics, losses = evaluate(run.eval_step, state.params, state.rest, dataset,
                                   run.data_sharding, desc=kind)
        writer.write(step, {**metrics, **{f"{k}/loss": v for k, v in losses.items()}}, kind)
        if kind == "eval":
            train_iter.update_losses(losses)  # drives `dynamic` mixing
        return metrics

    # ------------------------------------------------------------------ the loop
    compiled: dict[tuple, Any] = {}
    flops: dict[tuple, float] = {}
    window = Window()
    last_eval: dict[str, float] | None = None
    step = start
    guard = NonFiniteGuard(tcfg.max_nonfinite_steps, writer, int(state.nonfinite_run))
    save_due = False
    if preemption.check(step):  # SIGTERM during set-up: nothing new to save
        log.warning("preempted before the first step: exiting")
        writer.close()
        checkpoints.close()
        return {}
    progress = tqdm(total=tcfg.steps, initial=start, desc="train", disable=not is_main,
                    dynamic_ncols=True)
    try:
        while step < tcfg.steps:
            position = train_iter.state_dict()
            host_batch = next(train_iter)
            batch = to_global(host_batch, run.data_sharding)
            shape = tuple(batch["input_ids"].shape)
            if shape not in compiled:  # compiling is not counted in the throughput
                t0 = time.perf_counter()
                compiled[shape] = train_step.lower(state, batch).compile()
                flops[shape] = count_flops(compiled[shape])
                window.exclude(time.perf_counter() - t0)
            state, metrics = compiled[shape](state, batch)
            window.add(shape, flops[shape])
            step += 1
            progress.update(1)
            # Read one step late (the previous step is done by now: no stall), or now
            # before anything that must know: a log, a checkpoint, the end.
            guard.check_pending(checkpoints.latest_step)
            guard.push(step, position, host_batch["index"], metrics)

            if step % tcfg.log_every == 0 or step == tcfg.steps:
                guard.check_pending(checkpoints.latest_step)
                metrics = jax.device_get(metrics)  # waits for the step: closes the window
                record = {"loss": metrics["loss"],
                          **{f"{t.name}/loss": metrics["task_losses"][i]
                             for i, t in enumerate(tasks) if metrics["present"][i]},
                          **weighting_scalars(metrics, tasks),
                          **{f"lr/{g}": s(step) for g, s in run.schedules.items()},
                          **window.rates()}
                writer.write(step, record, "train")
                progress.set_postfix(loss=f"{float(metrics['loss']):.4f}")
                window = Window()

            eval_metrics = None
            if eval_set is not None and (step % tcfg.eval_every == 0 or step == tcfg.steps):
                t0 = time.perf_counter()
                eval_metrics = last_eval = run_eval(eval_set, step, "eval")
                window.exclude(time.perf_counter() - t0)
            if stop_at is not None and step >= stop_at:
                preemption.requested = True
            preempted = preemption.check(step)
            save_due |= step % tcfg.checkpoint_every == 0 or step == tcfg.steps
            if save_due or preempted:
                guard.check_pending(checkpoints.latest_step)
                # In a run of non-finite steps, periodic saves wait for a finite one, so
                # the rotation never drops the last good checkpoint. (The parameters are
                # unchanged by skipped steps, so a preemption save is safe.)
                if preempted or guard.run == 0:
                    checkpoints.save(step, state, train_iter.state_dict(),
                                     metrics={f"eval/{k}": v for k, v in eval_metrics.items()}
                                     if eval_metrics else None, force=True)
                    save_due = False
            if preempted:
                checkpoints.wait()
                if is_main:
                    log.warning("preempted: saved step %d, exiting", step)
                writer.close()
                checkpoints.close()
                return {}
    except BaseException:
        progress.close()
        _wait_quietly(checkpoints)  # an in-flight save completes; the error stays the news
        writer.close()
        raise
    progress.close()
    checkpoints.wait()

    # ------------------------------------------------------------------ final
    results = dict(last_eval or {})
    test_set = None
    if tcfg.test_split:
        test_set = build_dataset(config.data, tokenizer, tcfg.test_split, tasks=tasks)
        test = run_eval(test_set, step, "test")
        results.update({f"test/{k}": v for k, v in test.items()})
        if is_main:
            print(format_metrics(tasks, test, title=f"{tcfg.test_split} split, step {step}"))
    writer.close()
    checkpoints.close()
    if config.predict_examples and test_set is not None:
        params, rest = state.params, state.rest
        if jax.process_count() > 1:  # sharded over hosts: every process joins the gather
            replicated = NamedSharding(run.mesh, PartitionSpec())
            params, rest = jax.jit(lambda tree: tree, out_shardings=replicated)((params, rest))
        if is_main:
            demo_predictions(run.eval_graphdef, params, rest, spec, run.tokenizer, test_set,
                             int(config.predict_examples), config.data.max_length)
    return results


class Window:
    """Throughput over the steps since the last log, compile and eval time excluded."""

    def __init__(self):
        self.start = time.perf_counter()
        self.excluded = 0.0
        self.examples = self.tokens = 0
        self.flops = 0.0

    def exclude(self, seconds: float) -> None:
        self.excluded += seconds

    def add(self, shape: tuple, flops: float) -> None:
        self.examples += shape[0]
        self.tokens += shape[0] * shape[1]
        self.flops += flops

    def rates(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start - self.excluded
        if elapsed <= 0 or not self.examples:
            return {}
        return {"examples_per_s": self.examples / elapsed, "tokens_per_s": self.tokens / elapsed,
                "tflops_per_s": self.flops / elapsed / 1e12}


def _init_from(config, spec: ModelSpec, model) -> None:
    """``init.params_from`` (all params) and ``init.tasks_from`` (per-task params)."""
    from mtop_jax.transfer import copy_params_from, copy_task_params_from

    if config.init.params_from:
        copy_params_from(model, as_path(config.init.params_from))
    for task, source in dict(config.init.tasks_from).items():
        copy_task_params_from(model, spec, task, as_path(source))


def format_metrics(tasks, metrics: dict[str, float], title: str) -> str:
    lines = [f"== {title}"]
    for t in tasks:
        keys = [k for k in metrics if k.startswith(f"{t.name}/") and not k.endswith("/count")]
        parts = ", ".join(f"{k.split('/', 1)[1]} {metrics[k]:.4f}" for k in keys)
        lines.append(f"  {t.name:<16} n={int(metrics.get(f'{t.name}/count', 0)):<5} {parts}")
    lines.append(f"  {'score':<16} {metrics['score']:.4f} (mean of each task's primary metric)")
    return "\n".join(lines)


def demo_predictions(graphdef, params, rest, spec: ModelSpec, tokenizer, dataset: Dataset,
                     n: int, max_length: int) -> None:
    """Predict every task for a few texts in one forward pass, and print them."""
    from flax import nnx

    texts = dataset.examples.texts[:n]
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                    return_tensors="np")
    model = nnx.merge(graphdef, jax.device_get(params), jax.device_get(rest))
    types = enc.get("token_type_ids")
    logits = jax.jit(lambda m, i, k, t: m.logits(i, k, t))(
        model, jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"]),
        None if types is None else jnp.asarray(types))
    logits = np.asarray(logits)
    print(f"== predictions of all {len(spec.tasks)} tasks, one forward pass per batch")
    for i, text in enumerate(texts):
        first = text.strip().splitlines()[0] if text.strip() else ""
        print(f"  {first[:70]!r}")
        for t, task in enumerate(spec.tasks):
            if task.is_regression:
                print(f"    {task.name:<16} {logits[i, t, 0]:.3f}")
                continue
            row = logits[i, t, :task.num_classes]
            p = np.exp(row - row.max())
            p /= p.sum()
            k = int(p.argmax())
            truth = dataset.examples.labels[i, t]
            gold = "-" if np.isnan(truth) else task.labels[int(truth)]
            print(f"    {task.name:<16} {task.labels[k]:<14} p={p[k]:.2f}  (label: {gold})")


def evaluate_workdir(workdir: str | Path, split: str = "validation",
                     step: int | None = None) -> dict[str, float]:
    """Evaluate a workdir's checkpoint (latest by default) on ``split``: ``mtop-jax eval``."""
    workdir = as_path(workdir)
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise MtopError(f"{workdir}: not a training workdir (no config.json)")
    config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    spec = read_model_spec(workdir)
    checkpoints = Checkpoints(workdir, read_only=True)
    run = setup(config, spec.tasks, init=False)
    if step is not None:
        params = checkpoints.restore_state(step, run.state)
    else:  # the newest readable step (an unreadable newer one is skipped with a warning)
        restored = checkpoints.restore_latest(lambda s: checkpoints.restore_state(s, run.state))
        if restored is None:
            raise MtopError(f"{workdir}: has no checkpoint to evaluate")
        step, params = restored
    dataset = build_dataset(config.data, run.tokenizer, split, tasks=spec.tasks)
    metrics, _ = evaluate(run.eval_step, params.params, params.rest, dataset,
                          run.data_sharding, desc=split)
    checkpoints.close()
    if jax.process_index() == 0:
        print(format_metrics(spec.tasks, metrics, title=f"{split} split, step {step}"))
    return metrics

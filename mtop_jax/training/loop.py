"""Training: one readable loop, in the order it runs.

    mtop-jax train --config configs/debian_packages.py --workdir workdirs/demo

Sections: config checks (before any data) -> data -> model, optimizer and
state (created sharded, ``training.setup``) -> resume -> the loop (log,
evaluate, checkpoint, stop on SIGTERM) -> final evaluation and a one-pass
prediction demo.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from mtop_jax.data.pipeline import Dataset, build_dataset, require_every_task
from mtop_jax.errors import MtopError
from mtop_jax.files import as_path
from mtop_jax.parallel.sharding import to_global
from mtop_jax.training import optim
from mtop_jax.training.checkpoints import Checkpoints
from mtop_jax.training.evaluation import demo_predictions, evaluate, format_metrics
from mtop_jax.training.guards import NonFiniteGuard, Preemption
from mtop_jax.training.metric_writers import MetricWriter
from mtop_jax.training.setup import check_before_data, load_tokenizer, setup
from mtop_jax.training.steps import BATCH_KEYS
from mtop_jax.training.workdir import write_model_files

log = logging.getLogger("mtop_jax.train")


# ---------------------------------------------------------------------------- helpers


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


def _wait_quietly(checkpoints: Checkpoints) -> None:
    try:
        checkpoints.wait()
    except MtopError as e:
        log.error("%s", e)


def count_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float((cost or {}).get("flops", 0.0))


# ---------------------------------------------------------------------------- train


def train(config: ml_collections.ConfigDict, workdir: str | Path, *, devices=None,
          stop_at: int | None = None) -> dict[str, float]:
    """Train (or resume) in ``workdir``; returns the final evaluation metrics.

    ``stop_at``: behave as if preempted after that step (save, return {}).
    """
    workdir = as_path(workdir)  # gs:// stays gs:// (pathlib would make it gs:/)
    check_before_data(config, devices)  # config mistakes fail here: before data or compiles
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
    # Every split the run reads, checked now: a bad label in the test file must not
    # surface after the training it ends.
    eval_set, test_set = (build_dataset(config.data, tokenizer, split, tasks=tasks)
                          if split else None for split in (tcfg.eval_split, tcfg.test_split))
    for dataset in (train_set, eval_set, test_set):
        if dataset is not None:
            require_every_task(dataset, config.data)

    # ------------------------------------------------------------------ model and state
    run = setup(config, tasks, tokenizer, devices=devices)
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

    writer = MetricWriter(workdir)

    def run_eval(dataset: Dataset, step: int, kind: str, predictions_to=None) -> dict[str, float]:
        metrics, losses = evaluate(run.eval_step, state.params, state.rest, dataset,
                                   run.data_sharding, desc=kind, predictions_to=predictions_to)
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
            batch = to_global(host_batch, run.data_sharding, BATCH_KEYS)
            shape = tuple(batch["input_ids"].shape)
            if shape not in compiled:  # compiling is not counted in the throughput
                t0 = time.perf_counter()
                compiled[shape] = run.train_step.lower(state, batch).compile()
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
                    writer.flush()  # gs:// metrics up to this checkpoint, uploaded
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
    if last_eval is None and eval_set is not None:
        # A finished workdir run again: its final validation metrics, as a run returns
        # them (already on record in metrics.jsonl, so not written again).
        last_eval, _ = evaluate(run.eval_step, state.params, state.rest, eval_set,
                                run.data_sharding, desc="eval")
    results = dict(last_eval or {})
    if test_set is not None:
        # Its predictions too, text by text: comparisons of runs paired by text.
        test = run_eval(test_set, step, "test", workdir / f"predictions-{tcfg.test_split}.npz")
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

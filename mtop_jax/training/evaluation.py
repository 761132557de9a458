"""Evaluation: a split through the jitted eval step, per-task metrics, the printed
summary, and ``mtop-jax eval`` of a workdir's checkpoint.

``evaluate_workdir`` restores only the parameters of the saved state (no
optimizer state is built, no pretrained weights are loaded) onto the mesh of
the run's config.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from tqdm import tqdm

from mtop_jax.data.pipeline import Dataset, build_dataset
from mtop_jax.errors import MtopError
from mtop_jax.files import as_path, atomic_save_npz
from mtop_jax.models import pretrained
from mtop_jax.models.spec import ModelSpec, abstract_model, placeholder_rest, read_model_spec
from mtop_jax.parallel.sharding import placed, state_shardings, to_global
from mtop_jax.training.checkpoints import Checkpoints
from mtop_jax.training.metrics import task_metrics
from mtop_jax.training.steps import BATCH_KEYS, jit_eval_step
from mtop_jax.training.workdir import TOKENIZER_DIR, read_config


def evaluate(eval_step, params, rest, dataset: Dataset, sharding: NamedSharding,
             desc: str = "eval", predictions_to: str | Path | None = None,
             ) -> tuple[dict[str, float], dict[str, float]]:
    """(metrics {task/metric: value, score}, mean loss per task) over a whole split.
    ``predictions_to``: also an .npz of the split's ``predictions`` and ``labels``
    ([texts, tasks]: class index or value; label -1 / NaN where a text has none) and
    ``tasks``, for comparisons paired by text (``benchmarks/quality.py``)."""
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
    if predictions_to is not None and jax.process_index() == 0:
        atomic_save_npz(predictions_to, predictions=preds,
                        labels=np.stack([labels[s.name] for s in dataset.tasks], axis=1),
                        tasks=np.array([s.name for s in dataset.tasks]))
    mean_loss = {spec.name: float(loss_sums[t] / max(counts[t], 1))
                 for t, spec in enumerate(dataset.tasks)}
    return metrics, mean_loss


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
                print(f"    {task.name:<16} {task.value(logits[i, t, 0]):.3f}")
                continue
            row = logits[i, t, :task.num_classes]
            p = np.exp(row - row.max())
            p /= p.sum()
            k = int(p.argmax())
            truth = dataset.examples.labels[i, t]
            gold = "-" if np.isnan(truth) else task.labels[int(truth)]
            print(f"    {task.name:<16} {task.labels[k]:<14} p={p[k]:.2f}  (label: {gold})")


def evaluate_workdir(workdir: str | Path, split: str = "validation",
                     step: int | None = None, *, devices=None,
                     predictions_to: str | Path | None = None) -> dict[str, float]:
    """Evaluate a workdir's checkpoint (latest by default) on ``split``: ``mtop-jax eval``."""
    from mtop_jax.training.setup import checked_mesh

    workdir = as_path(workdir)
    config = read_config(workdir)
    spec = read_model_spec(workdir)
    mesh, rules, data_sharding = checked_mesh(config, devices)
    tokenizer = pretrained.load_tokenizer(workdir / TOKENIZER_DIR)
    graphdef, abstract_params, abstract_rest = nnx.split(abstract_model(spec, eval_mode=True),
                                                         nnx.Param, ...)
    param_sh = state_shardings(abstract_params, mesh, rules)
    rest_sh = state_shardings(abstract_rest, mesh, rules)
    target = placed(abstract_params, param_sh)
    checkpoints = Checkpoints(workdir, read_only=True)
    try:
        if step is not None:
            params = checkpoints.restore_params(step, target)
        else:  # the newest readable step (an unreadable newer one is skipped with a warning)
            restored = checkpoints.restore_latest(lambda s: checkpoints.restore_params(s, target))
            if restored is None:
                raise MtopError(f"{workdir}: has no checkpoint to evaluate")
            step, params = restored
    finally:
        checkpoints.close()
    rest = jax.device_put(placeholder_rest(abstract_rest), rest_sh)
    eval_step = jit_eval_step(graphdef, spec.regression, param_shardings=param_sh,
                              rest_shardings=rest_sh, data_sharding=data_sharding,
                              output_scales=spec.output_scales)
    dataset = build_dataset(config.data, tokenizer, split, tasks=spec.tasks)
    metrics, _ = evaluate(eval_step, params, rest, dataset, data_sharding, desc=split,
                          predictions_to=predictions_to)
    if jax.process_index() == 0:
        print(format_metrics(spec.tasks, metrics, title=f"{split} split, step {step}"))
    return metrics

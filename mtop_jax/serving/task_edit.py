"""Add or remove a task on a trained model without touching the other tasks.

Because of I1 (DESIGN.md section 3) the input tokens never see a task's
prompts, so a new task is trained alone: its prompts, pooler query and head are
learned on a frozen model, and every existing task's outputs stay
bit-identical. Removing a task slices it out of every per-task parameter.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from mtop_jax.data.local_files import read_examples
from mtop_jax.errors import ConfigError, MtopError
from mtop_jax.models.axes import is_per_task
from mtop_jax.models.multitask import MultiTaskModel
from mtop_jax.models.spec import ModelSpec, placeholder_rest
from mtop_jax.serving.predictor import Predictor


def _model(predictor: Predictor) -> MultiTaskModel:
    model = nnx.merge(predictor.graphdef, predictor.params, predictor.rest)
    model.eval()
    return model


def _predictor(predictor: Predictor, spec: ModelSpec, model: MultiTaskModel) -> Predictor:
    return Predictor(spec, nnx.state(model, nnx.Param), predictor.tokenizer,
                     max_length=predictor.max_length, batch_size=predictor.batch_size)


def remove_tasks(predictor: Predictor, names: list[str]) -> Predictor:
    """The predictor without the tasks ``names``."""
    unknown = [n for n in names if n not in predictor.task_names]
    if unknown:
        raise MtopError(f"unknown tasks {unknown}; the model has {list(predictor.task_names)}")
    keep = [t for t in predictor.spec.tasks if t.name not in names]
    if not keep:
        raise MtopError("cannot remove every task")
    model = _model(predictor).select_tasks([t.name for t in keep])
    spec = ModelSpec(predictor.spec.encoder, predictor.spec.model, tuple(keep))
    return _predictor(predictor, spec, model)


def add_task(predictor: Predictor, data_file: str | Path, task: str, field: str | None = None,
             *, text_field: str = "text", steps: int = 200, batch_size: int = 32,
             learning_rate: float = 1e-3, seed: int = 0) -> Predictor:
    """Train one new task on the frozen model from a JSONL/CSV file; a new predictor."""
    spec = predictor.spec
    if task in predictor.task_names:
        raise MtopError(f"task {task!r} exists already; remove it first")
    if spec.model.mode == "single":
        raise MtopError("add-task needs a shared encoder; mode 'single' trains one per task")
    examples = read_examples(data_file, {task: field or task}, text_field=text_field)
    new_spec = examples.tasks[0]
    if new_spec.is_regression:
        raise ConfigError("add-task trains classification tasks")
    labelled = np.flatnonzero(~np.isnan(examples.labels[:, 0]))
    if len(labelled) == 0:
        raise MtopError(f"{data_file}: no example has a {task!r} label")

    # ---------------------------------------------------------------- the N+1 task model
    spec_plus = ModelSpec(spec.encoder, spec.model, (*spec.tasks, new_spec))
    fresh = MultiTaskModel(spec.encoder, spec.model, [(new_spec.name, new_spec.num_classes)],
                           rngs=nnx.Rngs(seed))  # the new task's initial per-task params
    grown = nnx.eval_shape(lambda: MultiTaskModel(spec.encoder, spec.model,
                                                  spec_plus.head_tasks, rngs=nnx.Rngs(0)))
    old = {tuple(p): v for p, v in nnx.to_flat_state(predictor.params)}
    new = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(fresh, nnx.Param))}
    flat = []
    for path, var in nnx.to_flat_state(nnx.state(grown, nnx.Param)):
        path = tuple(path)
        value = old[path].get_value()
        if is_per_task(var):
            rows = [value, new[path].get_value()]
            if var.get_metadata()["out_sharding"][-1] == "classes":  # pad to the new width
                width = var.get_value().shape[-1]
                rows = [jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])
                        for x in rows]
            value = jnp.concatenate(rows, axis=0)
        flat.append((path, var.replace(jnp.asarray(value))))
    params = nnx.from_flat_state(flat)
    _, _, rest = nnx.split(grown, nnx.Param, ...)
    rest = placeholder_rest(rest)
    grown.eval()
    graphdef = nnx.split(grown, nnx.Param, ...)[0]

    # Only the new task's row of the per-task parameters trains.
    t = len(spec.tasks)
    trainable = nnx.from_flat_state([
        (p, v.replace(jnp.zeros(v.get_value().shape, bool).at[t].set(True) if is_per_task(v)
                      else jnp.zeros(v.get_value().shape, bool)))
        for p, v in nnx.to_flat_state(params)])
    tx = optax.adam(learning_rate)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, ids, mask, types, labels):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p, rest).logits(ids, mask, types)[:, t]
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        grads = jax.tree.map(lambda g, m: jnp.where(m, g, 0.0), grads, trainable)
        updates, opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        new_params = jax.tree.map(lambda a, b, m: jnp.where(m, a, b), new_params, params,
                                  trainable)
        return new_params, opt_state, loss

    rng = np.random.default_rng(seed)
    texts = examples.texts
    labels = examples.labels[:, 0]
    tmp = Predictor(spec_plus, params, predictor.tokenizer, max_length=predictor.max_length,
                    batch_size=batch_size)
    progress = tqdm(range(steps), desc=f"add-task {task}", dynamic_ncols=True)
    for _ in progress:
        rows = rng.choice(labelled, size=min(batch_size, len(labelled)), replace=False)
        batch = tmp.tokenize([texts[i] for i in rows])
        n = len(rows)
        params, opt_state, loss = step(params, opt_state, batch["input_ids"][:n],
                                       batch["attention_mask"][:n],
                                       batch["token_type_ids"][:n],
                                       jnp.asarray(labels[rows].astype(np.int32)))
        progress.set_postfix(loss=f"{float(loss):.4f}")
    return Predictor(spec_plus, params, predictor.tokenizer, max_length=predictor.max_length,
                     batch_size=predictor.batch_size)

"""Start a model from earlier runs (DESIGN.md section 5).

- ``init.params_from = WORKDIR``: every parameter from that run's latest
  checkpoint (e.g. the ``full`` stage starting from the ``prompts`` stage).
- ``init.tasks_from = {task: WORKDIR}``: task t's prompts, pooler query and
  head from a run that trained task t (alone or among others).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from mtop_jax.errors import MtopError
from mtop_jax.models.axes import is_per_task, logical_axes


def read_params(workdir: Path, step: int | None = None) -> dict[tuple[str, ...], np.ndarray]:
    """Flat {path: array} of the parameters in a workdir's checkpoint (latest by default),
    whatever mesh and number of processes wrote it."""
    from mtop_jax.training.checkpoints import Checkpoints

    checkpoints = Checkpoints(workdir, read_only=True)
    if step is not None:
        tree = checkpoints.restore_on_one_device(step)
    else:  # the newest readable step (an unreadable newer one: skipped with a warning)
        restored = checkpoints.restore_latest(checkpoints.restore_on_one_device)
        if restored is None:
            raise MtopError(f"{workdir}: has no checkpoint to initialise from")
        tree = restored[1]
    checkpoints.close()
    params = tree["params"] if isinstance(tree, dict) else tree.params
    flat: dict[tuple[str, ...], np.ndarray] = {}

    def walk(node: Any, prefix: tuple[str, ...]) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*prefix, str(k)))
        else:  # an nnx Variable is saved as {"value": array}
            flat[prefix[:-1] if prefix and prefix[-1] == "value" else prefix] = np.asarray(node)

    walk(params, ())
    return flat


def _model_params(model: nnx.Module):
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return flat, {tuple(str(p) for p in path): (path, var) for path, var in flat}


def _set(var: nnx.Variable, value: np.ndarray) -> None:
    current = var.get_value()
    var.set_value(jax.device_put(np.asarray(value, current.dtype), current.sharding))


def copy_params_from(model: nnx.Module, workdir: Path) -> None:
    """Every parameter of ``model`` from ``workdir``'s latest checkpoint."""
    source = read_params(workdir)
    flat, by_key = _model_params(model)
    missing = sorted("/".join(k) for k in by_key if k not in source)
    misshaped = sorted(f"{'/'.join(k)} {source[k].shape} (expected {var.get_value().shape})"
                       for k, (_, var) in by_key.items()
                       if k in source and source[k].shape != var.get_value().shape)
    if missing or misshaped:
        raise MtopError(f"init.params_from={workdir}: does not match this model: "
                        f"missing {missing[:10]}, mis-shaped {misshaped[:10]}")
    for k, (_, var) in by_key.items():
        _set(var, source[k])
    nnx.update(model, nnx.from_flat_state(flat))


def copy_task_params_from(model: nnx.Module, spec, task: str, workdir: Path) -> None:
    """Task ``task``'s per-task parameters from a run in ``workdir`` that trained it."""
    from mtop_jax.models.spec import read_model_spec

    names = [t.name for t in spec.tasks]
    if task not in names:
        raise MtopError(f"init.tasks_from: {task!r} is not a task of this model {names}")
    other = read_model_spec(workdir)
    other_names = [t.name for t in other.tasks]
    if task not in other_names:
        raise MtopError(f"init.tasks_from.{task}={workdir}: that run has no task {task!r} "
                        f"(it has {other_names})")
    ours, theirs = spec.tasks[names.index(task)], other.tasks[other_names.index(task)]
    if ours.num_classes != theirs.num_classes:
        raise MtopError(f"init.tasks_from.{task}: {theirs.num_classes} classes there, "
                        f"{ours.num_classes} here")
    t, u = names.index(task), other_names.index(task)
    source = read_params(workdir)
    flat, by_key = _model_params(model)
    for k, (_, var) in by_key.items():
        if not is_per_task(var):
            continue
        axes = logical_axes(var)
        if k not in source:
            raise MtopError(f"init.tasks_from.{task}={workdir}: has no parameter "
                            f"{'/'.join(k)} (a different mode?)")
        value = np.array(var.get_value())
        row = source[k][u]
        if axes[-1] == "classes":
            row = row[..., :ours.num_classes]
            value[t] = 0
            value[t, ..., :ours.num_classes] = row
        else:
            if row.shape != value[t].shape:
                raise MtopError(f"init.tasks_from.{task}: {'/'.join(k)} is {row.shape} there, "
                                f"{value[t].shape} here")
            value[t] = row
        _set(var, value)
    nnx.update(model, nnx.from_flat_state(flat))

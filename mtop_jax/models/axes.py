"""Logical axis names of the model code (DESIGN.md section 8).

Model code names the axes of every parameter with the names below and never a
mesh axis; ``mtop_jax.parallel.sharding`` maps them onto the device mesh with
rules that a config can change (the maxtext pattern). Kept here, beside the
models, so that ``models/`` needs nothing from the parallel layer.
"""

from __future__ import annotations

from flax import nnx

BATCH = "batch"  # examples of a batch
EMBED = "embed"  # hidden width H
HEADS = "heads"  # attention heads (the fused heads * head_dim width of q/k/v)
MLP = "mlp"  # feed-forward width
VOCAB = "vocab"  # vocabulary rows of the word embedding
TASKS = "tasks"  # the leading task axis of prompts, heads, per-task encoders
PROMPTS = "prompts"  # prompt slots P of one task
CLASSES = "classes"  # (padded) classes of a head
LAYERS = "layers"  # encoder layers (deep prompts, prefixes)


def param_init(init: nnx.Initializer, *names: str | None) -> nnx.Initializer:
    """Wrap an initializer so that the parameter carries logical axis ``names``.

    Eager sharding is off: models are built unsharded (or abstractly) and then
    placed with ``jax.jit(..., out_shardings=...)`` from these names.
    """
    return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


def logical_axes(var: nnx.Variable) -> tuple[str | None, ...]:
    """The logical axis names a variable was created with (empty if none)."""
    return tuple(var.get_metadata().get("out_sharding") or ())


def is_per_task(var: nnx.Variable) -> bool:
    """True for a variable that belongs to the tasks one by one (leading ``tasks`` axis)."""
    axes = logical_axes(var)
    return bool(axes) and axes[0] == TASKS

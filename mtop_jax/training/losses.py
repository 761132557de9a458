"""Per-task losses over the examples that carry a label for the task.

Batches label every task of every row, -1 where the label is missing
(``mtop_jax.data``): classification tasks use ``labels``, regression tasks
``targets``. A task's loss (cross-entropy or squared error) is, by
``normalize`` (``train.task_loss``):
- ``labelled``: the mean over its labelled rows. Every present task weighs the
  same, however few of its rows carry a label: a sparse task's few rows weigh as
  much as a dense task's whole batch, a noisy gradient at full weight;
- ``batch``: the sum over its labelled rows divided by the batch's rows: a task
  weighs by its share of the batch's labels, every labelled example the same.
A task with no labelled row in the batch is absent: loss 0, ``present`` False,
and no gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

NORMALIZE = ("labelled", "batch")


def task_losses(logits: jax.Array, labels: jax.Array, targets: jax.Array, weights: jax.Array,
                regression: jax.Array, normalize: str = "labelled",
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(losses [N], present [N] bool, counts [N]) from padded logits [B, N, C].

    ``weights`` [B] zero out padding rows; ``regression`` [N] marks regression tasks.
    """
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize {normalize!r} not in {NORMALIZE}")
    labelled = (labels >= 0) & (weights[:, None] > 0)  # [B, N]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
    sq = jnp.square(logits[..., 0] - targets)
    per_example = jnp.where(regression[None, :], sq, ce)  # [B, N]
    counts = labelled.sum(axis=0)
    total = jnp.where(labelled, per_example, 0.0).sum(axis=0)
    rows = (weights > 0).sum() if normalize == "batch" else counts
    losses = total / jnp.maximum(rows, 1)
    return losses, counts > 0, counts

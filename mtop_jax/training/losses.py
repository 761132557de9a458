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
  A task with 2% of the labels gets 2% of the weight, and may never be learnt;
- ``sqrt``: between the two, the sum over the labelled rows divided by
  sqrt(labelled rows x batch rows), i.e. the labelled mean times
  sqrt(share of labelled rows): a task labelled on 1/16 of the rows weighs 1/4.
A task with no labelled row in the batch is absent: loss 0, ``present`` False,
and no gradient. A regression task's squared error is in standardised units,
``(output - (target - mean) / std)^2`` with the task's training mean and sd
(``TaskSpec.target_mean``/``target_std``), so that it weighs like a
cross-entropy whatever the target's scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

NORMALIZE = ("labelled", "batch", "sqrt")


def task_losses(logits: jax.Array, labels: jax.Array, targets: jax.Array, weights: jax.Array,
                regression: jax.Array, normalize: str = "labelled",
                target_mean: jax.Array | float = 0.0, target_std: jax.Array | float = 1.0,
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(losses [N], present [N] bool, counts [N]) from padded logits [B, N, C].

    ``weights`` [B] zero out padding rows; ``regression`` [N] marks regression tasks;
    ``target_mean``/``target_std`` [N] standardise their targets (default 0 and 1).
    """
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize {normalize!r} not in {NORMALIZE}")
    labelled = (labels >= 0) & (weights[:, None] > 0)  # [B, N]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
    sq = jnp.square(logits[..., 0] - (targets - target_mean) / target_std)
    per_example = jnp.where(regression[None, :], sq, ce)  # [B, N]
    counts = labelled.sum(axis=0)
    total = jnp.where(labelled, per_example, 0.0).sum(axis=0)
    rows = (weights > 0).sum()
    divisor = {"labelled": counts, "batch": rows,
               "sqrt": jnp.sqrt(counts * rows)}[normalize]
    losses = total / jnp.maximum(divisor, 1)
    return losses, counts > 0, counts

"""N task heads stacked on a leading task axis and applied with ``nnx.vmap``.

Every head has as many outputs as the largest task; the padded logits of the
smaller tasks are masked to a large negative number, so a softmax or a
cross-entropy over the padded row equals the one over the task's own classes.
A regression task is a head with one output.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtop_jax.models.axes import CLASSES, EMBED, TASKS, param_init

#: Value of masked (padded) logits: exp() underflows to 0, still finite in bf16.
MASKED_LOGIT = -1e9


class TaskHeads(nnx.Module):
    """``logits_t = U_t h_t + c_t`` for every task t at once."""

    def __init__(self, hidden_size: int, num_outputs: Sequence[int], *, rngs: nnx.Rngs,
                 dtype=jnp.float32):
        self.num_outputs = tuple(int(c) for c in num_outputs)
        width = max(self.num_outputs)

        @nnx.split_rngs(splits=len(self.num_outputs))
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: TASKS})
        def make(r: nnx.Rngs) -> nnx.Linear:
            return nnx.Linear(
                hidden_size, width, dtype=dtype, param_dtype=jnp.float32, rngs=r,
                kernel_init=param_init(nnx.initializers.normal(0.02), EMBED, CLASSES),
                bias_init=param_init(nnx.initializers.zeros_init(), CLASSES))

        self.linear = make(rngs)

    @property
    def class_mask(self) -> np.ndarray:
        """[N, C] True where the class exists for the task."""
        width = max(self.num_outputs)
        return np.arange(width)[None, :] < np.asarray(self.num_outputs)[:, None]

    def __call__(self, pooled: jax.Array) -> jax.Array:
        """pooled: [B, N, H] -> padded logits [B, N, C] (fp32, padding masked)."""

        @nnx.vmap(in_axes=(0, 1), out_axes=1)
        def apply(linear: nnx.Linear, h: jax.Array) -> jax.Array:
            return linear(h)

        logits = apply(self.linear, pooled).astype(jnp.float32)
        return jnp.where(self.class_mask[None], logits, MASKED_LOGIT)

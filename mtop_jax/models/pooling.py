"""Task-conditioned pooling (DESIGN.md section 4).

For task t, ``h_t = pooler(z_t)``, the encoder family's pooler shared by all
tasks (BERT's ``tanh(W_p z_t + b_p)`` from the checkpoint, ModernBERT's head),
and ``z_t`` one of
- ``prompt``: the last-layer state of task t's first prompt token;
- ``conditional``: attention pooling with a learned task query ``q_t`` over the
  last-layer states of the input tokens (padding masked) and task t's prompts.
  ``q_t`` starts at zero, i.e. at mean pooling.
Both only read the input and task t's own prompts, so I1/I2 hold here too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mtop_jax.models.attention import mask_bias
from mtop_jax.models.axes import EMBED, TASKS, param_init

POOLERS = ("prompt", "conditional")


class TaskQueries(nnx.Module):
    """One learned query per task for conditional attention pooling."""

    def __init__(self, hidden_size: int, num_tasks: int, *, rngs: nnx.Rngs):
        self.query = nnx.Param(param_init(nnx.initializers.zeros_init(), TASKS, EMBED)(
            rngs.params(), (num_tasks, hidden_size)))

    def __call__(self, x: jax.Array, p: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """x: [B, L, H] input states, p: [B, N, P, H] prompt states -> z [B, N, H]."""
        q = self.query[...].astype(x.dtype)
        scale = x.shape[-1] ** -0.5
        to_input = jnp.einsum("nh,blh->bnl", q, x).astype(jnp.float32) * scale
        to_input = to_input + mask_bias(attention_mask.astype(bool))[:, None, :]
        to_own = jnp.einsum("nh,bnph->bnp", q, p).astype(jnp.float32) * scale
        w = jax.nn.softmax(jnp.concatenate([to_input, to_own], axis=-1), axis=-1).astype(x.dtype)
        length = x.shape[1]
        return (jnp.einsum("bnl,blh->bnh", w[..., :length], x)
                + jnp.einsum("bnp,bnph->bnh", w[..., length:], p))


def pool_tasks(kind: str, pooler: nnx.Module, queries: TaskQueries | None, x: jax.Array,
               p: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """[B, N, H] pooled representation h_t of every task."""
    if kind == "prompt":
        z = p[:, :, 0]
    elif kind == "conditional":
        z = queries(x, p, attention_mask)
    else:
        raise ValueError(f"pooler {kind!r} not in {POOLERS}")
    return pooler(z)

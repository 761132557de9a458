"""The MTOP layer stack: input tokens and N tasks' prompts in one pass.

Attention structure (DESIGN.md section 3), query -> key:
  input token      -> input tokens (padding-masked)
  prompt of task t -> input tokens, and task t's own prompts

Two implementations with the same parameters and the same result:

- :func:`run_fast`, the one to use. The input tokens run the plain encoder
  layer ([L x L] attention), untouched by the prompts. The prompts of all tasks,
  batched over a task axis, attend to the input's keys/values (computed once,
  shared) and to their own task's prompt keys/values: [N, P, L + P] scores.
  Nothing of size (L + N P)^2 is ever built.
- :func:`run_dense`, the reference: one sequence of length L + N P through the
  unmodified encoder layers with the dense block mask. Tests hold the fast
  path to it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mtop_jax.models.attention import mask_bias, padding_bias
from mtop_jax.models.encoder import Encoder, TransformerLayer
from mtop_jax.models.prompts import TaskPrompts


def _prompt_layer(layer: TransformerLayer, p: jax.Array, k_x: jax.Array, v_x: jax.Array,
                  input_bias: jax.Array) -> jax.Array:
    """One layer for the prompt states p [B, N, P, H] given the input's k/v [B, L, h, d]."""
    attn = layer.attention
    q_p, k_p, v_p = attn.project(p)  # [B, N, P, h, d]
    scale = q_p.shape[-1] ** -0.5
    to_input = jnp.einsum("bnqhd,bkhd->bnhqk", q_p, k_x).astype(jnp.float32) * scale
    to_input = to_input + input_bias[:, None]  # [B, 1, 1, 1, L]: padding
    to_own = jnp.einsum("bnqhd,bnkhd->bnhqk", q_p, k_p).astype(jnp.float32) * scale
    probs = jax.nn.softmax(jnp.concatenate([to_input, to_own], axis=-1), axis=-1)
    probs = attn.attention_dropout(probs).astype(v_x.dtype)
    length = k_x.shape[1]
    context = (jnp.einsum("bnhqk,bkhd->bnqhd", probs[..., :length], v_x)
               + jnp.einsum("bnhqk,bnkhd->bnqhd", probs[..., length:], v_p))
    return layer.ffn(attn.finish(p, context))


def run_fast(encoder: Encoder, prompts: TaskPrompts, input_ids: jax.Array,
             attention_mask: jax.Array, token_type_ids: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array]:
    """(input states [B, L, H], prompt states [B, N, P, H]) after the last layer."""
    x = encoder.embeddings(input_ids, token_type_ids)
    p = prompts.initial_states(encoder.embeddings, x.shape[0]).astype(x.dtype)
    bias = padding_bias(attention_mask)  # [B, 1, 1, L]
    for i, layer in enumerate(encoder.layers):
        offset = prompts.offset(i)
        if offset is not None:
            p = p + offset.astype(p.dtype)
        attn = layer.attention
        q_x, k_x, v_x = attn.project(x)
        p = _prompt_layer(layer, p, k_x, v_x, bias)  # reads the layer's input x, not its output
        x = layer.ffn(attn.finish(x, attn.attend(q_x, k_x, v_x, bias)))
    return x, p


def block_mask(attention_mask: jax.Array, num_tasks: int, num_prompts: int) -> jax.Array:
    """[B, T, T] boolean query->key mask of the MTOP sequence, T = L + N P."""
    length = attention_mask.shape[1]
    total = length + num_tasks * num_prompts
    # owner[j]: -1 for input positions, else the task that position j's prompt belongs to.
    owner = np.concatenate([np.full(length, -1), np.repeat(np.arange(num_tasks), num_prompts)])
    is_input_key = jnp.concatenate(
        [attention_mask.astype(bool), jnp.zeros((attention_mask.shape[0], total - length), bool)],
        axis=1)[:, None, :]  # [B, 1, T]
    same_task = (owner[:, None] == owner[None, :]) & (owner[:, None] >= 0)  # [T, T]
    return is_input_key | same_task[None]


def run_dense(encoder: Encoder, prompts: TaskPrompts, input_ids: jax.Array,
              attention_mask: jax.Array, token_type_ids: jax.Array | None = None
              ) -> tuple[jax.Array, jax.Array]:
    """The reference: same outputs as :func:`run_fast` through a dense (L+NP)^2 mask."""
    x = encoder.embeddings(input_ids, token_type_ids)
    batch, length = input_ids.shape
    p0 = prompts.initial_states(encoder.embeddings, batch)
    _, n, np_, h = p0.shape
    seq = jnp.concatenate([x, p0.reshape(batch, n * np_, h).astype(x.dtype)], 1)
    bias = mask_bias(block_mask(attention_mask, n, np_))[:, None]  # [B, 1, T, T]
    for i, layer in enumerate(encoder.layers):
        offset = prompts.offset(i)
        if offset is not None:
            seq = seq.at[:, length:].add(offset.reshape(n * np_, h).astype(seq.dtype))
        seq = layer(seq, bias)
    return seq[:, :length], seq[:, length:].reshape(batch, n, np_, h)

"""The MTOP layer stack: input tokens and N tasks' prompts in one pass.

Attention structure (DESIGN.md section 3), query -> key:
  input token      -> input tokens (padding-masked)
  prompt of task t -> input tokens, and task t's own prompts

Positions (DESIGN.md section 9): prompt slot j of every task sits at
``len(row) + j``, as a token appended after the row's real tokens would. Rotary
layers rotate it there; a local layer's window applies to it as to a token
there. (Families with learned absolute positions ignore these positions: their
prompts carry a learned per-slot position embedding instead.)

Two implementations with the same parameters and the same result, for every
encoder family (through the ``encoders.base`` interface):

- :func:`run_fast`, the one to use. The input tokens run the plain encoder
  layer ([L x L] attention), untouched by the prompts. The prompts of all tasks,
  batched over a task axis, attend to the input's keys/values (computed once,
  shared) and to their own task's prompt keys/values: [N, P, L + P] scores.
  Nothing of size (L + N P)^2 is ever built.
- :func:`run_dense`, the reference: one sequence of length L + N P through the
  unmodified encoder layers with the dense block mask and the positions above.
  Tests hold the fast path to it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtop_jax.models.attention import mask_bias, split_softmax, within_window
from mtop_jax.models.encoders.base import Encoder, EncoderLayer, token_positions
from mtop_jax.models.prompts import TaskPrompts


def prompt_positions(attention_mask: jax.Array, num_prompts: int) -> jax.Array:
    """[B, P] position ``len(row) + j`` of prompt slot j in each row."""
    length = attention_mask.astype(jnp.int32).sum(-1, keepdims=True)
    return length + jnp.arange(num_prompts)


def _prompt_layer(layer: EncoderLayer, ctx: Any, p: jax.Array, pos_p: jax.Array,
                  pos_x: jax.Array, k_x: jax.Array, v_x: jax.Array, input_bias: jax.Array,
                  own_bias: jax.Array) -> jax.Array:
    """One layer for the prompt states p [B, N, P, H] at ``pos_p`` [B, P] given the
    input's k/v [B, L, h, d] at ``pos_x`` [B, L]; biases [B, 1, 1, P, L] and [P, P].

    The N P prompt queries meet the input's keys as one [B, h, N P, L] product, in
    the heads-first layout of the input's own attention, and the softmax over input
    and own keys is taken in two parts with a common max instead of over their
    concatenation: on CPU the concatenation and the transposes between the two
    layouts were copies (benchmarks/README.md, issue 18).
    """
    batch, tasks, slots = p.shape[:3]
    q_p, k_p, v_p = layer.project(p, pos_p[:, None])  # [B, N, P, h, d]
    heads, head_dim = q_p.shape[-2:]
    pos_all = jnp.tile(pos_p, (1, tasks))  # [B, N P]: every task's slot j at pos_p[:, j]
    to_input = layer.scores(q_p.reshape(batch, tasks * slots, heads, head_dim), k_x,
                            pos_all, pos_x, ctx)  # [B, h, N P, L]
    to_input = to_input.reshape(batch, heads, tasks, slots, -1) + input_bias
    to_own = layer.scores(q_p, k_p, pos_p[:, None], pos_p[:, None], ctx)  # [B, N, h, P, P]
    to_own = to_own.swapaxes(1, 2) + own_bias  # [B, h, N, P, P]
    probs_input, probs_own = split_softmax(to_input, to_own)
    probs_input = layer.drop_probs(probs_input).astype(v_x.dtype)
    probs_own = layer.drop_probs(probs_own).astype(v_x.dtype)
    # v_x heads-first as the input's attention has it ([B, h, L, d]: one transpose for both)
    context_input = jnp.einsum("bhqk,bhkd->bhqd",
                               probs_input.reshape(batch, heads, tasks * slots, -1),
                               v_x.swapaxes(1, 2)).reshape(batch, heads, tasks, slots, head_dim)
    context = (context_input + jnp.einsum("bhnqk,bnkhd->bhnqd", probs_own, v_p)
               ).transpose(0, 2, 3, 1, 4)  # [B, N, P, h, d]
    return layer.finish(p, context)


def run_fast(encoder: Encoder, prompts: TaskPrompts, input_ids: jax.Array,
             attention_mask: jax.Array, token_type_ids: jax.Array | None = None, *,
             trace: list[jax.Array] | None = None) -> tuple[jax.Array, jax.Array]:
    """(input states [B, L, H], prompt states [B, N, P, H]) after the encoder.

    ``trace``: if a list, the prompt states after every layer are appended to it
    (``mtop_jax.models.task_spread`` reads how the tasks differ there).
    """
    x = encoder.embeddings(input_ids, token_type_ids)
    p = prompts.initial_states(encoder.embeddings, x.shape[0]).astype(x.dtype)
    pos_x = token_positions(input_ids)
    pos_p = prompt_positions(attention_mask, p.shape[2])
    biases = encoder.layer_biases(attention_mask, pos_x)
    padding = attention_mask.astype(bool)[:, None, :]  # [B, 1, L]
    # Prompt -> input and prompt -> own prompt biases, per window: [B, 1, 1, P, L], [P, P].
    slots = jnp.arange(p.shape[2])  # prompt j and j' are j - j' positions apart
    prompt_biases = {w: (mask_bias(padding & within_window(pos_p, pos_x, w))[:, None, None],
                         mask_bias(within_window(slots, slots, w))) for w in biases}
    shared = encoder.position_context()
    for i, layer in enumerate(encoder.layers):
        offset = prompts.offset(i)
        if offset is not None:
            p = p + offset.astype(p.dtype)
        ctx = layer.layer_context(shared)
        q_x, k_x, v_x = layer.project(x, pos_x)
        # reads the layer's input x, not its output
        p = _prompt_layer(layer, ctx, p, pos_p, pos_x, k_x, v_x, *prompt_biases[layer.window])
        x = layer.finish(x, layer.attend(q_x, k_x, v_x, biases[layer.window], pos_x, ctx))
        if trace is not None:
            trace.append(p)
    return encoder.final(x), encoder.final(p)


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
    positions = jnp.concatenate([token_positions(input_ids),
                                 jnp.tile(prompt_positions(attention_mask, np_), (1, n))], 1)
    allowed = block_mask(attention_mask, n, np_)
    biases = {w: mask_bias(allowed & within_window(positions, positions, w))[:, None]
              for w in {layer.window for layer in encoder.layers}}  # [B, 1, T, T]
    shared = encoder.position_context()
    for i, layer in enumerate(encoder.layers):
        offset = prompts.offset(i)
        if offset is not None:
            seq = seq.at[:, length:].add(offset.reshape(n * np_, h).astype(seq.dtype))
        seq = layer(seq, positions, biases[layer.window], shared=shared)
    seq = encoder.final(seq)
    return seq[:, :length], seq[:, length:].reshape(batch, n, np_, h)

"""Scaled dot-product attention with additive masks.

Kept apart from the layers so that the plain encoder, the MTOP prompt
attention and the dense masked reference all share one softmax.
:func:`input_attention` is the input tokens' self-attention (DESIGN.md section
9): ``jax.nn.dot_product_attention`` on accelerators, so that backends can use
their fused kernels, and on CPU our heads-first einsums, which XLA:CPU runs
faster; the prompts' small [N, P, L+P] attention stays a batched einsum.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx


def mask_bias(mask: jax.Array, dtype=jnp.float32) -> jax.Array:
    """0 where ``mask`` is true, a large negative number where it is false."""
    return jnp.where(mask, jnp.asarray(0, dtype), jnp.asarray(jnp.finfo(dtype).min, dtype))


def padding_bias(attention_mask: jax.Array) -> jax.Array:
    """[B, L] 0/1 padding mask -> [B, 1, 1, L] additive bias over keys."""
    return mask_bias(attention_mask.astype(bool))[:, None, None, :]


def within_window(pos_q: jax.Array, pos_k: jax.Array, window: int | None) -> jax.Array:
    """[..., Tq, Tk] true where a query at ``pos_q`` [..., Tq] may see a key at ``pos_k``
    [..., Tk] under a local ``window`` (|distance| <= window; None: everywhere)."""
    distance = pos_q[..., :, None] - pos_k[..., None, :]
    if window is None:
        return jnp.ones(distance.shape, bool)
    return jnp.abs(distance) <= window


def attention_bias(attention_mask: jax.Array, positions: jax.Array,
                   window: int | None) -> jax.Array:
    """Input tokens' additive bias: padding, and for a local layer its window.

    [B, 1, 1, L] without a window, [B, 1, L, L] with one."""
    if window is None:
        return padding_bias(attention_mask)
    allowed = attention_mask.astype(bool)[:, None, :] & within_window(positions, positions,
                                                                      window)
    return mask_bias(allowed)[:, None]


def input_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None = None,
                    *, dropout: nnx.Dropout | None = None, scale: float | None = None
                    ) -> jax.Array:
    """softmax(q k^T scale + bias) v, the input tokens' self-attention.

    q, k, v: [B, T, h, d] in one dtype; bias (fp32) broadcastable to [B, h, Tq, Tk];
    ``scale`` defaults to 1/sqrt(d). On accelerators ``jax.nn.dot_product_attention``
    (DESIGN.md section 9: their fused kernels); on CPU, or while ``dropout`` is live
    (training with a nonzero rate; that call has no attention dropout),
    :func:`dot_product_attention`, heads-first.
    """
    live = dropout is not None and dropout.rate > 0 and not dropout.deterministic
    if live or jax.default_backend() == "cpu":
        return dot_product_attention(q, k, v, bias, dropout=dropout if live else None,
                                     scale=scale)
    if bias is not None:
        bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale)


def split_softmax(scores_a: jax.Array, scores_b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """softmax over the last axes of ``scores_a`` and ``scores_b`` together, in two parts.

    The same numbers as ``jax.nn.softmax(concatenate([a, b], -1))`` split back apart,
    without building the concatenation (a copy on CPU): the MTOP prompts' attention to
    the input's keys and to their own task's prompt keys (issue 18).
    """
    top = jax.lax.stop_gradient(jnp.maximum(scores_a.max(-1, keepdims=True),
                                            scores_b.max(-1, keepdims=True)))
    e_a, e_b = jnp.exp(scores_a - top), jnp.exp(scores_b - top)
    total = e_a.sum(-1, keepdims=True) + e_b.sum(-1, keepdims=True)
    return e_a / total, e_b / total


def softmax_context(scores: jax.Array, v: jax.Array,
                    dropout: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    """softmax(scores) v: scores [..., h, Tq, Tk] (fp32), v [..., Tk, h, d]."""
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout is not None:
        probs = dropout(probs)
    return jnp.einsum("...hqk,...khd->...qhd", probs.astype(v.dtype), v)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array | None = None,
    *,
    dropout: Callable[[jax.Array], jax.Array] | None = None,
    scale: float | None = None,
) -> jax.Array:
    """softmax(q k^T scale + bias) v, ``scale`` 1/sqrt(d) by default.

    q: [B, Tq, h, d]; k, v: [B, Tk, h, d]; bias broadcastable to [B, h, Tq, Tk].
    The softmax runs in fp32 whatever the compute dtype; ``dropout`` (e.g. an
    ``nnx.Dropout``) is applied to the attention probabilities.

    Both batched products run heads-first ([B, h, T, d], one transpose of each
    operand): XLA:CPU computes them about 2-3x faster than over the [B, T, h, d]
    layout that ``jax.nn.dot_product_attention``'s XLA path uses, which made attention
    half of MiniLM's forward time on CPU in a microbenchmark (benchmarks/README.md,
    issue 18).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    # The scale goes on q ([B, T, h, d], as flax's attention does), not on the
    # [B, h, Tq, Tk] scores, where XLA:CPU materialised it as a full-size constant.
    q = q * jnp.asarray(scale, q.dtype)
    q, k, v = (x.swapaxes(1, 2) for x in (q, k, v))  # [B, h, T, d]
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32)
    if bias is not None:
        scores = scores + bias
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout is not None:
        probs = dropout(probs)
    return jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v).swapaxes(1, 2)

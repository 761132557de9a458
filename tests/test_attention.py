"""The input tokens' attention (DESIGN.md section 9), computed heads-first, against a
NumPy softmax reference and ``jax.nn.dot_product_attention`` (its XLA path): fp32
equal, bf16 close; a live dropout drops probabilities, an idle one changes nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtop_jax.models.attention import (
    attention_bias,
    dot_product_attention,
    input_attention,
    split_softmax,
)

#: bf16 compute against fp32, on unit-normal q/k/v (measured 0.012)
BF16_ATOL = 0.03


def batch():
    q, k, v = (jax.random.normal(key, (3, 9, 4, 8)) for key in jax.random.split(
        jax.random.key(0), 3))
    mask = jnp.asarray([[1] * 9, [1] * 6 + [0] * 3, [1] * 3 + [0] * 6])
    return q, k, v, mask, jnp.broadcast_to(jnp.arange(9), (3, 9))


def numpy_attention(q, k, v, bias, scale):
    """softmax(q k^T scale + bias) v in float64, [B, T, h, d] in and out."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) * scale + np.asarray(bias, np.float64)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", probs, v)


@pytest.mark.parametrize("window", [None, 2])
def test_equals_references_in_fp32_and_is_close_in_bf16(window):
    q, k, v, mask, positions = batch()
    bias = attention_bias(mask, positions, window)
    want = numpy_attention(q, k, v, bias, 8 ** -0.5)
    got = input_attention(q, k, v, bias)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    np.testing.assert_allclose(got, jax.nn.dot_product_attention(q, k, v, bias=bias),
                               atol=1e-6, rtol=0)
    half = input_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), bias)
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half, np.float32), want, atol=BF16_ATOL, rtol=0)
    # a scale of its own (DeBERTa's 1/sqrt(3 d))
    scaled = input_attention(q, k, v, bias, scale=(3 * 8) ** -0.5)
    np.testing.assert_allclose(scaled, numpy_attention(q, k, v, bias, (3 * 8) ** -0.5),
                               atol=1e-6, rtol=0)


def test_live_dropout_drops_probabilities_and_an_idle_one_does_nothing():
    q, k, v, mask, positions = batch()
    bias = attention_bias(mask, positions, None)
    drop = lambda: nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=7))
    got = input_attention(q, k, v, bias, dropout=drop())
    np.testing.assert_array_equal(got, dot_product_attention(q, k, v, bias, dropout=drop()))
    assert np.abs(np.asarray(got) - numpy_attention(q, k, v, bias, 8 ** -0.5)).max() > 0.1
    off = drop()
    off.eval()
    np.testing.assert_allclose(input_attention(q, k, v, bias, dropout=off),
                               numpy_attention(q, k, v, bias, 8 ** -0.5), atol=1e-6, rtol=0)


def test_split_softmax_is_the_softmax_of_the_concatenation_values_and_gradients():
    a = jax.random.normal(jax.random.key(0), (2, 3, 5, 7)) * 4
    b = jax.random.normal(jax.random.key(1), (2, 3, 5, 2)) * 4
    a = a.at[..., 0].set(jnp.finfo(jnp.float32).min)  # a masked key, as the biases make
    pa, pb = split_softmax(a, b)
    want = jax.nn.softmax(jnp.concatenate([a, b], -1), -1)
    np.testing.assert_allclose(jnp.concatenate([pa, pb], -1), want, atol=1e-6)
    w = jax.random.normal(jax.random.key(2), (9,))

    def split_loss(a, b):
        pa, pb = split_softmax(a, b)
        return (jnp.concatenate([pa, pb], -1) * w).sum()

    def concat_loss(a, b):
        return (jax.nn.softmax(jnp.concatenate([a, b], -1), -1) * w).sum()

    for got, ref in zip(jax.grad(split_loss, (0, 1))(a, b), jax.grad(concat_loss, (0, 1))(a, b)):
        np.testing.assert_allclose(got, ref, atol=1e-5)

"""The input tokens' attention through ``jax.nn.dot_product_attention`` (DESIGN.md
section 9) against the einsum reference: fp32 equal, bf16 close, dropout live falls
back to the einsum path (the fused call has no dropout)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtop_jax.models.attention import attention_bias, dot_product_attention, input_attention

#: bf16 compute against fp32, on unit-normal q/k/v (measured 0.012)
BF16_ATOL = 0.03


def batch():
    q, k, v = (jax.random.normal(key, (3, 9, 4, 8)) for key in jax.random.split(
        jax.random.key(0), 3))
    mask = jnp.asarray([[1] * 9, [1] * 6 + [0] * 3, [1] * 3 + [0] * 6])
    return q, k, v, mask, jnp.broadcast_to(jnp.arange(9), (3, 9))


@pytest.mark.parametrize("window", [None, 2])
def test_fused_equals_einsum_in_fp32_and_is_close_in_bf16(window):
    q, k, v, mask, positions = batch()
    bias = attention_bias(mask, positions, window)
    want = dot_product_attention(q, k, v, bias)
    np.testing.assert_allclose(input_attention(q, k, v, bias), want, atol=1e-6, rtol=0)
    half = input_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), bias)
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half, np.float32), want, atol=BF16_ATOL, rtol=0)
    # a scale of its own (DeBERTa's 1/sqrt(3 d))
    scaled = input_attention(q, k, v, bias, scale=(3 * 8) ** -0.5)
    want_scaled = dot_product_attention(q / np.sqrt(3), k, v, bias)
    np.testing.assert_allclose(scaled, want_scaled, atol=1e-6, rtol=0)


def test_live_dropout_takes_the_einsum_path():
    q, k, v, mask, positions = batch()
    bias = attention_bias(mask, positions, None)
    drop = lambda: nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=7))
    got = input_attention(q, k, v, bias, dropout=drop())
    np.testing.assert_array_equal(got, dot_product_attention(q, k, v, bias, dropout=drop()))
    assert np.abs(np.asarray(got - dot_product_attention(q, k, v, bias))).max() > 0.1
    off = drop()
    off.eval()
    np.testing.assert_allclose(input_attention(q, k, v, bias, dropout=off),
                               dot_product_attention(q, k, v, bias), atol=1e-6, rtol=0)

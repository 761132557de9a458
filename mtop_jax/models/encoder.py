"""A BERT-family Transformer encoder in Flax NNX.

Post-LayerNorm blocks as in BERT, MiniLM, RoBERTa/XLM-R, ELECTRA and DistilBERT,
built from an :class:`EncoderConfig` (itself read from a Hugging Face
``config.json``; ``pretrained.hf_names`` maps each family's tensor names). The
parameter tree mirrors the Hugging Face names (``embeddings``, ``layers[i]``,
``pooler``) so that weights map one to one, and every parameter carries logical
axis names (``mtop_jax.models.axes``) so that a mesh can shard it.

The blocks expose their parts (``SelfAttention.project`` / ``.finish``,
``FeedForward``) because the MTOP model reuses them for its task prompts
without changing what they compute for the text.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mtop_jax.models.attention import dot_product_attention, padding_bias
from mtop_jax.models.axes import EMBED, HEADS, MLP, VOCAB, param_init
from mtop_jax.models.config import EncoderConfig

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def _normal(std: float = 0.02) -> nnx.Initializer:
    return nnx.initializers.normal(stddev=std)


def dense(cfg: EncoderConfig, d_in: int, d_out: int, axes: tuple[str | None, str | None],
          rngs: nnx.Rngs, dtype: Any) -> nnx.Linear:
    """A Linear with BERT's N(0, 0.02) init and logical axis names on kernel and bias."""
    return nnx.Linear(
        d_in, d_out, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
        kernel_init=param_init(_normal(), *axes),
        bias_init=param_init(nnx.initializers.zeros_init(), axes[1]),
    )


def layer_norm(cfg: EncoderConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm computed in fp32 (stable under bf16 compute)."""
    return nnx.LayerNorm(
        cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=jnp.float32,
        param_dtype=jnp.float32, rngs=rngs,
        scale_init=param_init(nnx.initializers.ones_init(), EMBED),
        bias_init=param_init(nnx.initializers.zeros_init(), EMBED),
    )


class Embeddings(nnx.Module):
    """word + position (+ token type) embeddings, LayerNorm, dropout."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.cfg = cfg
        embed = lambda n, axes: nnx.Embed(
            n, cfg.hidden_size, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
            embedding_init=param_init(_normal(), *axes))
        self.word_embeddings = embed(cfg.vocab_size, (VOCAB, EMBED))
        self.position_embeddings = embed(cfg.max_position_embeddings, (None, EMBED))
        self.token_type_embeddings = (
            embed(cfg.type_vocab_size, (None, EMBED)) if cfg.type_vocab_size else None)
        self.norm = layer_norm(cfg, rngs)
        self.dropout = nnx.Dropout(cfg.hidden_dropout, rngs=rngs)

    def position_ids(self, input_ids: jax.Array) -> jax.Array:
        """0..L-1, or RoBERTa's pad+1.. numbering that skips padding tokens."""
        if not self.cfg.offset_positions:
            return jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
        not_pad = (input_ids != self.cfg.pad_token_id).astype(jnp.int32)
        return jnp.cumsum(not_pad, axis=-1) * not_pad + self.cfg.pad_token_id

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array | None = None) -> jax.Array:
        x = self.word_embeddings(input_ids) + self.position_embeddings(self.position_ids(input_ids))
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = jnp.zeros_like(input_ids)
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.norm(x))


class SelfAttention(nnx.Module):
    """Multi-head self-attention with BERT's residual + LayerNorm output."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.cfg = cfg
        h = cfg.hidden_size
        self.query = dense(cfg, h, h, (EMBED, HEADS), rngs, dtype)
        self.key = dense(cfg, h, h, (EMBED, HEADS), rngs, dtype)
        self.value = dense(cfg, h, h, (EMBED, HEADS), rngs, dtype)
        self.output = dense(cfg, h, h, (HEADS, EMBED), rngs, dtype)
        self.norm = layer_norm(cfg, rngs)
        self.attention_dropout = nnx.Dropout(cfg.attention_dropout, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.hidden_dropout, rngs=rngs)

    def split_heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-1], self.cfg.num_heads, self.cfg.head_dim)

    def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """[..., T, H] -> q, k, v each [..., T, heads, head_dim]."""
        return (self.split_heads(self.query(x)), self.split_heads(self.key(x)),
                self.split_heads(self.value(x)))

    def finish(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """Merge heads, project, add the residual ``x`` and normalise."""
        out = self.output(context.reshape(*context.shape[:-2], self.cfg.hidden_size))
        return self.norm(x + self.dropout(out))

    def attend(self, q, k, v, bias):
        return dot_product_attention(q, k, v, bias, dropout=self.attention_dropout)

    def __call__(self, x: jax.Array, bias: jax.Array | None,
                 extra_kv: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        """x: [B, T, H]; bias: additive, broadcastable to [B, heads, T, T].

        ``extra_kv`` are keys/values [B, P, heads, head_dim] that every query
        may attend to, placed before the sequence's own (prefix tuning).
        """
        q, k, v = self.project(x)
        if extra_kv is not None:
            pk, pv = extra_kv
            k = jnp.concatenate([pk.astype(k.dtype), k], axis=1)
            v = jnp.concatenate([pv.astype(v.dtype), v], axis=1)
            if bias is not None:
                open_ = jnp.zeros((*bias.shape[:-1], pk.shape[1]), bias.dtype)
                bias = jnp.concatenate([open_, bias], axis=-1)
        return self.finish(x, self.attend(q, k, v, bias))


class FeedForward(nnx.Module):
    """dense -> activation -> dense, residual + LayerNorm."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        if cfg.hidden_act not in ACTIVATIONS:
            from mtop_jax.errors import WeightsError
            raise WeightsError(f"config: hidden_act {cfg.hidden_act!r} not in {list(ACTIVATIONS)}")
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.intermediate = dense(cfg, cfg.hidden_size, cfg.intermediate_size, (EMBED, MLP),
                                  rngs, dtype)
        self.output = dense(cfg, cfg.intermediate_size, cfg.hidden_size, (MLP, EMBED), rngs, dtype)
        self.norm = layer_norm(cfg, rngs)
        self.dropout = nnx.Dropout(cfg.hidden_dropout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(x + self.dropout(self.output(self.act(self.intermediate(x)))))


class TransformerLayer(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.attention = SelfAttention(cfg, rngs=rngs, dtype=dtype)
        self.ffn = FeedForward(cfg, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, bias: jax.Array | None,
                 extra_kv: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        return self.ffn(self.attention(x, bias, extra_kv))


class Pooler(nnx.Module):
    """tanh(W z + b): BERT's pooler, shared by all tasks in the MTOP model."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.dense = dense(cfg, cfg.hidden_size, cfg.hidden_size, (EMBED, None), rngs, dtype)

    def __call__(self, z: jax.Array) -> jax.Array:
        return jnp.tanh(self.dense(z))


class Encoder(nnx.Module):
    """Embeddings, ``num_layers`` Transformer layers and BERT's [CLS] pooler.

    Params are fp32; ``dtype`` is the compute dtype (``jnp.bfloat16`` on TPU/GPU).
    """

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.cfg = cfg
        self.embeddings = Embeddings(cfg, rngs=rngs, dtype=dtype)
        self.layers = nnx.List(
            [TransformerLayer(cfg, rngs=rngs, dtype=dtype) for _ in range(cfg.num_layers)])
        self.pooler = Pooler(cfg, rngs=rngs, dtype=dtype)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Returns (last hidden states [B, L, H], pooled [CLS] [B, H])."""
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        bias = padding_bias(attention_mask)
        for layer in self.layers:
            x = layer(x, bias)
        return x, self.pooler(x[:, 0])

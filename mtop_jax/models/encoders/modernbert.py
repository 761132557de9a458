"""ModernBERT (Warner et al. 2024) in Flax NNX, as transformers' ``ModernBertModel``.

Pre-norm blocks (the first layer's attention reads its input unnormalised),
a fused q/k/v projection, rotary positions with one base for global and one
for local layers, local layers that attend within ``local_attention // 2``
positions, a GeGLU feed-forward, no biases unless the config asks, and a
final norm. Its classification head (dense, activation, norm) is this
encoder's ``pooler``; in mode ``shared`` it reads [CLS] or the mean of the
tokens (``classifier_pooling``).

MTOP prompts sit at positions ``len(row) + j`` (DESIGN.md section 9): the
layers rotate whatever positions they are given, and a local window applies
to a prompt as to a token there.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mtop_jax.models.axes import EMBED, HEADS, MLP, VOCAB, param_init
from mtop_jax.models.config import SLIDING, EncoderConfig
from mtop_jax.models.encoders import base
from mtop_jax.models.encoders.base import activation, dense, layer_norm, normal


def norm(cfg: EncoderConfig, rngs: nnx.Rngs, axis: str | None = EMBED) -> nnx.LayerNorm:
    return layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs, use_bias=cfg.norm_bias,
                      axis=axis)


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate x [..., T, heads, d] by its ``positions`` [..., T] (GPT-NeoX halves layout),
    in fp32."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    freqs = positions[..., None].astype(jnp.float32) * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)[..., None, :]  # [..., T, 1, d]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


class Embeddings(nnx.Module):
    """Token embedding, norm, dropout: no positions (the layers rotate) and no types."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.word_embeddings = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
            embedding_init=param_init(normal(), VOCAB, EMBED))
        self.token_type_embeddings = None
        self.norm = norm(cfg, rngs)
        self.dropout = nnx.Dropout(cfg.embedding_dropout, rngs=rngs)

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array | None = None
                 ) -> jax.Array:
        return self.dropout(self.norm(self.word_embeddings(input_ids)))


class ModernBertLayer(base.EncoderLayer):
    """x + attn(attn_norm(x)), then x + GeGLU(mlp_norm(x))."""

    def __init__(self, cfg: EncoderConfig, index: int, *, rngs: nnx.Rngs,
                 dtype: Any = jnp.float32):
        self.cfg = cfg
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.window = cfg.window(index)
        local = bool(cfg.layer_types) and cfg.layer_types[index] == SLIDING
        self.theta = cfg.local_rope_theta if local else cfg.rope_theta
        self.attn_norm = None if index == 0 else norm(cfg, rngs)
        self.qkv = dense(h, 3 * h, (EMBED, HEADS), rngs, dtype, use_bias=cfg.attention_bias)
        self.attn_out = dense(h, h, (HEADS, EMBED), rngs, dtype, use_bias=cfg.attention_bias)
        self.mlp_norm = norm(cfg, rngs)
        self.mlp_in = dense(h, 2 * i, (EMBED, MLP), rngs, dtype, use_bias=cfg.mlp_bias)
        self.mlp_out = dense(i, h, (MLP, EMBED), rngs, dtype, use_bias=cfg.mlp_bias)
        self.act = activation(cfg.hidden_act)
        self.attention_dropout = nnx.Dropout(cfg.attention_dropout, rngs=rngs)
        self.attn_out_dropout = nnx.Dropout(cfg.attention_dropout, rngs=rngs)
        self.mlp_dropout = nnx.Dropout(cfg.hidden_dropout, rngs=rngs)

    def project(self, x: jax.Array, positions: jax.Array
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
        h = x if self.attn_norm is None else self.attn_norm(x)
        qkv = self.qkv(h).reshape(*x.shape[:-1], 3, self.cfg.num_heads, self.cfg.head_dim)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        return rotary(q, positions, self.theta), rotary(k, positions, self.theta), v

    def probs_dropout(self) -> nnx.Dropout:
        return self.attention_dropout

    def finish(self, x: jax.Array, context: jax.Array) -> jax.Array:
        out = self.attn_out(context.reshape(*context.shape[:-2], self.cfg.hidden_size))
        x = x + self.attn_out_dropout(out)
        gate_in, gate = jnp.split(self.mlp_in(self.mlp_norm(x)), 2, axis=-1)
        return x + self.mlp_out(self.mlp_dropout(self.act(gate_in) * gate))


class Head(nnx.Module):
    """norm(act(W z (+ b))): ModernBERT's prediction head, shared by all tasks."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        h = cfg.hidden_size
        self.dense = dense(h, h, (EMBED, None), rngs, dtype, use_bias=cfg.classifier_bias)
        self.act = activation(cfg.classifier_activation, "classifier_activation")
        self.norm = norm(cfg, rngs, axis=None)

    def __call__(self, z: jax.Array) -> jax.Array:
        return self.norm(self.act(self.dense(z)))


class Encoder(base.Encoder):
    """Embeddings, ``num_layers`` pre-norm layers, the final norm and the head."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.cfg = cfg
        self.embeddings = Embeddings(cfg, rngs=rngs, dtype=dtype)
        self.layers = nnx.List([ModernBertLayer(cfg, i, rngs=rngs, dtype=dtype)
                                for i in range(cfg.num_layers)])
        self.final_norm = norm(cfg, rngs)
        self.pooler = Head(cfg, rngs=rngs, dtype=dtype)

    def final(self, x: jax.Array) -> jax.Array:
        return self.final_norm(x)

    def pool_input(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
        if self.cfg.classifier_pooling == "cls":
            return x[:, 0]
        mask = attention_mask.astype(x.dtype)[..., None]
        return (x * mask).sum(1) / mask.sum(1)


def hf_names(cfg: EncoderConfig) -> dict[str, tuple[tuple[Any, ...], bool]]:
    """Hugging Face tensor name -> (NNX parameter path, transpose?); ``head.*`` (of the
    masked-LM and classification checkpoints) is the pooler."""
    names = base.HFNames()
    linear = names.linear

    def norm_(hf: str, path: tuple[Any, ...]):
        names.norm(hf, path, bias=cfg.norm_bias)

    names["embeddings.tok_embeddings.weight"] = (("embeddings", "word_embeddings",
                                                  "embedding"), False)
    norm_("embeddings.norm", ("embeddings", "norm"))
    for i in range(cfg.num_layers):
        hf, nx = f"layers.{i}", ("layers", i)
        if i:
            norm_(f"{hf}.attn_norm", (*nx, "attn_norm"))
        linear(f"{hf}.attn.Wqkv", (*nx, "qkv"), cfg.attention_bias)
        linear(f"{hf}.attn.Wo", (*nx, "attn_out"), cfg.attention_bias)
        norm_(f"{hf}.mlp_norm", (*nx, "mlp_norm"))
        linear(f"{hf}.mlp.Wi", (*nx, "mlp_in"), cfg.mlp_bias)
        linear(f"{hf}.mlp.Wo", (*nx, "mlp_out"), cfg.mlp_bias)
    norm_("final_norm", ("final_norm",))
    linear("head.dense", ("pooler", "dense"), cfg.classifier_bias)
    norm_("head.norm", ("pooler", "norm"))
    return names

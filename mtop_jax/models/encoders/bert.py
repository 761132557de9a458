"""The BERT layout family: BERT, MiniLM, RoBERTa/XLM-R, CamemBERT, ELECTRA, DistilBERT.

Post-LayerNorm blocks with learned absolute positions, built from an
:class:`EncoderConfig`. The parameter tree mirrors the Hugging Face names
(``embeddings``, ``layers[i]``, ``pooler``) so that weights map one to one
(:func:`hf_names`, with DistilBERT's own names), and every parameter carries
logical axis names (``mtop_jax.models.axes``) so that a mesh can shard it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mtop_jax.models.axes import EMBED, HEADS, MLP, VOCAB, param_init
from mtop_jax.models.config import EncoderConfig
from mtop_jax.models.encoders import base
from mtop_jax.models.encoders.base import activation, dense, layer_norm, normal


def norm(cfg: EncoderConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)


class Embeddings(nnx.Module):
    """word (+ position) (+ token type) embeddings, LayerNorm, dropout (DeBERTa-v3 has
    no absolute positions)."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.cfg = cfg
        embed = lambda n, axes: nnx.Embed(
            n, cfg.hidden_size, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
            embedding_init=param_init(normal(), *axes))
        self.word_embeddings = embed(cfg.vocab_size, (VOCAB, EMBED))
        self.position_embeddings = (embed(cfg.max_position_embeddings, (None, EMBED))
                                    if cfg.position_biased_input else None)
        self.token_type_embeddings = (
            embed(cfg.type_vocab_size, (None, EMBED)) if cfg.type_vocab_size else None)
        self.norm = norm(cfg, rngs)
        self.dropout = nnx.Dropout(cfg.hidden_dropout, rngs=rngs)

    def position_ids(self, input_ids: jax.Array) -> jax.Array:
        """0..L-1, or RoBERTa's pad+1.. numbering that skips padding tokens."""
        if not self.cfg.offset_positions:
            return jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
        not_pad = (input_ids != self.cfg.pad_token_id).astype(jnp.int32)
        return jnp.cumsum(not_pad, axis=-1) * not_pad + self.cfg.pad_token_id

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array | None = None) -> jax.Array:
        x = self.word_embeddings(input_ids)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(self.position_ids(input_ids))
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
        self.query = dense(h, h, (EMBED, HEADS), rngs, dtype)
        self.key = dense(h, h, (EMBED, HEADS), rngs, dtype)
        self.value = dense(h, h, (EMBED, HEADS), rngs, dtype)
        self.output = dense(h, h, (HEADS, EMBED), rngs, dtype)
        self.norm = norm(cfg, rngs)
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


class FeedForward(nnx.Module):
    """dense -> activation -> dense, residual + LayerNorm."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.act = activation(cfg.hidden_act)
        self.intermediate = dense(cfg.hidden_size, cfg.intermediate_size, (EMBED, MLP),
                                  rngs, dtype)
        self.output = dense(cfg.intermediate_size, cfg.hidden_size, (MLP, EMBED), rngs, dtype)
        self.norm = norm(cfg, rngs)
        self.dropout = nnx.Dropout(cfg.hidden_dropout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(x + self.dropout(self.output(self.act(self.intermediate(x)))))


class TransformerLayer(base.EncoderLayer):
    """Attention then feed-forward, each with residual + LayerNorm; positions are the
    embeddings' business, so ``project`` ignores them."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.attention = SelfAttention(cfg, rngs=rngs, dtype=dtype)
        self.ffn = FeedForward(cfg, rngs=rngs, dtype=dtype)

    def project(self, x: jax.Array, positions: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
        return self.attention.project(x)

    def probs_dropout(self) -> nnx.Dropout:
        return self.attention.attention_dropout

    def finish(self, x: jax.Array, context: jax.Array) -> jax.Array:
        return self.ffn(self.attention.finish(x, context))


class Pooler(nnx.Module):
    """tanh(W z + b): BERT's pooler, shared by all tasks in the MTOP model."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.dense = dense(cfg.hidden_size, cfg.hidden_size, (EMBED, None), rngs, dtype)

    def __call__(self, z: jax.Array) -> jax.Array:
        return jnp.tanh(self.dense(z))


class Encoder(base.Encoder):
    """Embeddings, ``num_layers`` post-LayerNorm layers and BERT's [CLS] pooler."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.cfg = cfg
        self.embeddings = Embeddings(cfg, rngs=rngs, dtype=dtype)
        self.layers = nnx.List(
            [TransformerLayer(cfg, rngs=rngs, dtype=dtype) for _ in range(cfg.num_layers)])
        self.pooler = Pooler(cfg, rngs=rngs, dtype=dtype)


def hf_names(cfg: EncoderConfig) -> dict[str, tuple[tuple[Any, ...], bool]]:
    """Hugging Face tensor name -> (NNX parameter path, transpose?)."""
    names = base.HFNames()
    linear, norm = names.linear, names.norm

    emb = ["word_embeddings", "position_embeddings"]
    if cfg.type_vocab_size:
        emb.append("token_type_embeddings")
    for e in emb:
        names[f"embeddings.{e}.weight"] = (("embeddings", e, "embedding"), False)
    norm("embeddings.LayerNorm", ("embeddings", "norm"))
    if cfg.model_type == "distilbert":
        # The same post-LayerNorm block under DistilBERT's names; no pooler.
        for i in range(cfg.num_layers):
            hf, nx = f"transformer.layer.{i}", ("layers", i)
            for part, ours in (("q_lin", "query"), ("k_lin", "key"), ("v_lin", "value"),
                               ("out_lin", "output")):
                linear(f"{hf}.attention.{part}", (*nx, "attention", ours))
            norm(f"{hf}.sa_layer_norm", (*nx, "attention", "norm"))
            linear(f"{hf}.ffn.lin1", (*nx, "ffn", "intermediate"))
            linear(f"{hf}.ffn.lin2", (*nx, "ffn", "output"))
            norm(f"{hf}.output_layer_norm", (*nx, "ffn", "norm"))
        return names
    for i in range(cfg.num_layers):
        hf, nx = f"encoder.layer.{i}", ("layers", i)
        for part in ("query", "key", "value"):
            linear(f"{hf}.attention.self.{part}", (*nx, "attention", part))
        linear(f"{hf}.attention.output.dense", (*nx, "attention", "output"))
        norm(f"{hf}.attention.output.LayerNorm", (*nx, "attention", "norm"))
        linear(f"{hf}.intermediate.dense", (*nx, "ffn", "intermediate"))
        linear(f"{hf}.output.dense", (*nx, "ffn", "output"))
        norm(f"{hf}.output.LayerNorm", (*nx, "ffn", "norm"))
    linear("pooler.dense", ("pooler", "dense"))
    return names

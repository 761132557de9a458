"""DeBERTa-v2/v3 (He et al. 2021) in Flax NNX, as transformers' ``DebertaV2Model``.

BERT's post-LayerNorm blocks (``bert.py``'s parts, under DeBERTa's tensor
names) whose attention logits add, for the relative distance ``delta`` of query
i and key j (log-bucketed beyond ``position_buckets / 2``), the config's terms
(``pos_att_type``): content->position ``q_i . Kr[delta]`` (c2p) and
position->content ``k_j . Qr[delta]`` (p2c), with ``Kr``/``Qr`` the layer's
projections of the shared (normalised) relative embeddings, all scaled by
``1 / sqrt(d (1 + #terms))``. v3 has no absolute positions; its
``ContextPooler`` (dense + activation on [CLS]) is this encoder's pooler.

Positions are explicit, so MTOP prompts at ``len(row) + j`` (DESIGN.md section
9) get their distances to every token the same way as tokens do.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtop_jax.models.attention import input_attention
from mtop_jax.models.axes import EMBED, HEADS, param_init
from mtop_jax.models.config import EncoderConfig
from mtop_jax.models.encoders import base, bert
from mtop_jax.models.encoders.base import activation, dense, layer_norm, normal


def log_buckets(distance: np.ndarray, buckets: int, max_position: int) -> np.ndarray:
    """transformers' ``make_log_bucket_position``: exact within +-buckets/2, then
    logarithmic up to ``max_position``. Evaluated in float64 on a static table, so the
    ceil never depends on a last-ulp difference of float32 logs."""
    mid = buckets // 2
    sign = np.sign(distance)
    abs_pos = np.where((distance < mid) & (distance > -mid), mid - 1, np.abs(distance))
    log_pos = np.ceil(np.log(abs_pos / mid) / np.log((max_position - 1) / mid) * (mid - 1)) + mid
    return np.where(abs_pos <= mid, distance, log_pos * sign).astype(np.int32)


class Attention(bert.SelfAttention):
    """BERT's q/k/v/output/norm plus, unless shared, the relative-position projections."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        super().__init__(cfg, rngs=rngs, dtype=dtype)
        h = cfg.hidden_size
        separate = cfg.relative_attention and not cfg.share_att_key
        self.pos_key = (dense(h, h, (EMBED, HEADS), rngs, dtype)
                        if separate and "c2p" in cfg.pos_att_type else None)
        self.pos_query = (dense(h, h, (EMBED, HEADS), rngs, dtype)
                          if separate and "p2c" in cfg.pos_att_type else None)
        self.pos_dropout = nnx.Dropout(cfg.hidden_dropout, rngs=rngs)


class DebertaLayer(bert.TransformerLayer):
    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.cfg = cfg
        self.attention = Attention(cfg, rngs=rngs, dtype=dtype)
        self.ffn = bert.FeedForward(cfg, rngs=rngs, dtype=dtype)

    def layer_context(self, shared: jax.Array | None
                      ) -> tuple[jax.Array | None, jax.Array | None] | None:
        """(position keys, position queries) [2 span, heads, d] of the relative embeddings
        ``shared`` (dropped out once per layer and pass, as transformers does)."""
        if shared is None:
            return None
        att, cfg = self.attention, self.cfg
        rel = att.pos_dropout(shared)
        key_proj = att.key if cfg.share_att_key else att.pos_key
        query_proj = att.query if cfg.share_att_key else att.pos_query
        keys = att.split_heads(key_proj(rel)) if "c2p" in cfg.pos_att_type else None
        queries = att.split_heads(query_proj(rel)) if "p2c" in cfg.pos_att_type else None
        return keys, queries

    def scale(self, head_dim: int) -> float:
        return (head_dim * (1 + len(self.cfg.pos_att_type))) ** -0.5

    def scores(self, q: jax.Array, k: jax.Array, pos_q: jax.Array, pos_k: jax.Array | None,
               ctx: Any = None) -> jax.Array:
        content = jnp.einsum("...qhd,...khd->...hqk", q, k).astype(jnp.float32)
        scores = content * self.scale(q.shape[-1])
        if ctx is None or pos_k is None:
            return scores
        return scores + self.relative_scores(q, k, pos_q, pos_k, ctx)

    def relative_scores(self, q: jax.Array, k: jax.Array, pos_q: jax.Array, pos_k: jax.Array,
                        ctx: tuple[jax.Array | None, jax.Array | None]) -> jax.Array:
        """fp32 [..., h, Tq, Tk]: the c2p and p2c terms of each query/key pair."""
        cfg = self.cfg
        pos_keys, pos_queries = ctx
        scale = self.scale(q.shape[-1])
        # [..., 1, Tq, Tk] index of each pair's relative embedding
        index = self.relative_index(pos_q[..., :, None] - pos_k[..., None, :],
                                    q.shape[-3] + k.shape[-3], cfg.relative_span)[..., None, :, :]
        scores = jnp.zeros((), jnp.float32)
        if pos_keys is not None:  # c2p: q_i . Kr[delta(i, j)]
            c2p = jnp.einsum("...qhd,rhd->...hqr", q, pos_keys.astype(q.dtype))
            scores = scores + jnp.take_along_axis(
                c2p.astype(jnp.float32), index, axis=-1) * scale
        if pos_queries is not None:  # p2c: k_j . Qr[delta(i, j)]
            p2c = jnp.einsum("...khd,rhd->...hkr", k, pos_queries.astype(k.dtype))
            scores = scores + jnp.swapaxes(jnp.take_along_axis(
                p2c.astype(jnp.float32), jnp.swapaxes(index, -1, -2), axis=-1), -1, -2) * scale
        return scores

    def relative_index(self, distance: jax.Array, bound: int, span: int) -> jax.Array:
        """Row of the relative embeddings for each query - key ``distance`` (|distance| <
        ``bound``, a static bound from the shapes)."""
        cfg = self.cfg
        if cfg.position_buckets > 0:
            table = log_buckets(np.arange(-bound, bound + 1), cfg.position_buckets,
                                cfg.max_relative_positions or cfg.max_position_embeddings)
            distance = jnp.asarray(table)[jnp.clip(distance + bound, 0, 2 * bound)]
        return jnp.clip(distance + span, 0, 2 * span - 1)

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None,
               positions: jax.Array | None = None, ctx: Any = None) -> jax.Array:
        """The content scores through ``attention.input_attention``, the relative
        terms joining the padding mask in its bias."""
        if ctx is not None:
            relative = self.relative_scores(q, k, positions, positions, ctx)
            bias = relative if bias is None else bias + relative
        return input_attention(q, k, v, bias, dropout=self.probs_dropout(),
                               scale=self.scale(q.shape[-1]))


class ContextPooler(nnx.Module):
    """act(W z + b) of the [CLS] state: DeBERTa's pooler, shared by all tasks."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.dense = dense(cfg.hidden_size, cfg.hidden_size, (EMBED, None), rngs, dtype)
        self.act = activation(cfg.classifier_activation, "pooler_hidden_act")

    def __call__(self, z: jax.Array) -> jax.Array:
        return self.act(self.dense(z))


class Encoder(base.Encoder):
    """Embeddings, ``num_layers`` disentangled-attention layers, the relative embeddings
    they share, and the context pooler."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.cfg = cfg
        self.embeddings = bert.Embeddings(cfg, rngs=rngs, dtype=dtype)
        self.layers = nnx.List(
            [DebertaLayer(cfg, rngs=rngs, dtype=dtype) for _ in range(cfg.num_layers)])
        self.rel_embeddings = nnx.Param(param_init(normal(), None, EMBED)(
            rngs.params(), (2 * cfg.relative_span, cfg.hidden_size))
        ) if cfg.relative_attention else None
        self.rel_norm = (layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)
                         if cfg.relative_attention and cfg.norm_rel_ebd else None)
        self.pooler = ContextPooler(cfg, rngs=rngs, dtype=dtype)

    def position_context(self) -> jax.Array | None:
        if self.rel_embeddings is None:
            return None
        rel = self.rel_embeddings[...]
        return rel if self.rel_norm is None else self.rel_norm(rel)


def hf_names(cfg: EncoderConfig) -> dict[str, tuple[tuple[Any, ...], bool]]:
    """Hugging Face tensor name -> (NNX parameter path, transpose?)."""
    names = base.HFNames()
    linear, norm = names.linear, names.norm

    emb = ["word_embeddings"]
    if cfg.position_biased_input:
        emb.append("position_embeddings")
    if cfg.type_vocab_size:
        emb.append("token_type_embeddings")
    for e in emb:
        names[f"embeddings.{e}.weight"] = (("embeddings", e, "embedding"), False)
    norm("embeddings.LayerNorm", ("embeddings", "norm"))
    for i in range(cfg.num_layers):
        hf, nx = f"encoder.layer.{i}", ("layers", i)
        parts = [("query_proj", "query"), ("key_proj", "key"), ("value_proj", "value")]
        if cfg.relative_attention and not cfg.share_att_key:
            parts += [(f"pos_{p}_proj", f"pos_{p}") for p, kind in (("key", "c2p"),
                      ("query", "p2c")) if kind in cfg.pos_att_type]
        for theirs, ours in parts:
            linear(f"{hf}.attention.self.{theirs}", (*nx, "attention", ours))
        linear(f"{hf}.attention.output.dense", (*nx, "attention", "output"))
        norm(f"{hf}.attention.output.LayerNorm", (*nx, "attention", "norm"))
        linear(f"{hf}.intermediate.dense", (*nx, "ffn", "intermediate"))
        linear(f"{hf}.output.dense", (*nx, "ffn", "output"))
        norm(f"{hf}.output.LayerNorm", (*nx, "ffn", "norm"))
    if cfg.relative_attention:
        names["encoder.rel_embeddings.weight"] = (("rel_embeddings",), False)
        if cfg.norm_rel_ebd:
            norm("encoder.LayerNorm", ("rel_norm",))
    linear("pooler.dense", ("pooler", "dense"))
    return names

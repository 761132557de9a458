"""What every encoder family provides, and the pieces the families share.

MTOP (``prompt_attention``) runs any family through this interface without
knowing its layout (DESIGN.md sections 3 and 9):

- :class:`EncoderLayer` cuts a Transformer layer where the prompts need it:
  ``project`` (q, k, v of states at given positions: rotary families rotate
  here), ``scores`` (a query's attention logits for keys at given positions:
  relative-position families add their terms here), ``attend`` (the layer's
  own softmax attention), ``finish`` (output projection, residuals, norms,
  feed-forward), ``window`` (how far a local layer attends, None for global)
  and ``layer_context`` (what the layer derives once per pass from the
  encoder's ``position_context``: DeBERTa's projected relative embeddings).
  ``__call__`` is exactly ``finish(x, attend(*project(x, positions), bias,
  positions, ctx))``, so the fast path reuses the same computation for the
  input tokens.
- :class:`Encoder`: ``embeddings`` (with ``norm``, ``dropout``,
  ``word_embeddings``, ``token_type_embeddings``), ``layers``,
  ``position_context``, ``final`` (a family's final norm, or nothing),
  ``pool_input`` (what the pooler reads in mode ``shared``) and ``pooler``
  (BERT's tanh pooler, ModernBERT's head, DeBERTa's context pooler).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mtop_jax.models.attention import attention_bias, input_attention, softmax_context
from mtop_jax.models.axes import EMBED, param_init

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str, field: str = "hidden_act"):
    if name not in ACTIVATIONS:
        from mtop_jax.errors import WeightsError
        raise WeightsError(f"config: {field} {name!r} not in {list(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def normal(std: float = 0.02) -> nnx.Initializer:
    return nnx.initializers.normal(stddev=std)


def dense(d_in: int, d_out: int, axes: tuple[str | None, str | None], rngs: nnx.Rngs,
          dtype: Any, *, use_bias: bool = True) -> nnx.Linear:
    """A Linear with BERT's N(0, 0.02) init and logical axis names on kernel and bias."""
    return nnx.Linear(
        d_in, d_out, dtype=dtype, param_dtype=jnp.float32, rngs=rngs, use_bias=use_bias,
        kernel_init=param_init(normal(), *axes),
        bias_init=param_init(nnx.initializers.zeros_init(), axes[1]),
    )


def layer_norm(size: int, eps: float, rngs: nnx.Rngs, *, use_bias: bool = True,
               axis: str | None = EMBED) -> nnx.LayerNorm:
    """LayerNorm computed in fp32 (stable under bf16 compute)."""
    return nnx.LayerNorm(
        size, epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs,
        use_bias=use_bias, scale_init=param_init(nnx.initializers.ones_init(), axis),
        bias_init=param_init(nnx.initializers.zeros_init(), axis),
    )


class HFNames(dict):
    """Hugging Face tensor name -> (NNX parameter path, transpose?): every family's
    weight-name map is built with these two rules (torch Linear weights are [out, in])."""

    def linear(self, hf: str, path: tuple[Any, ...], bias: bool = True) -> None:
        self[f"{hf}.weight"] = ((*path, "kernel"), True)
        if bias:
            self[f"{hf}.bias"] = ((*path, "bias"), False)

    def norm(self, hf: str, path: tuple[Any, ...], bias: bool = True) -> None:
        self[f"{hf}.weight"] = ((*path, "scale"), False)
        if bias:
            self[f"{hf}.bias"] = ((*path, "bias"), False)


class EncoderLayer(nnx.Module):
    """One layer of a family, in the parts MTOP reuses (see the module docstring)."""

    window: int | None = None

    def project(self, x: jax.Array, positions: jax.Array
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """[..., T, H] states at ``positions`` [..., T] -> q, k, v [..., T, heads, d]."""
        raise NotImplementedError

    def probs_dropout(self) -> nnx.Dropout:
        """The layer's dropout of attention probabilities."""
        raise NotImplementedError

    def drop_probs(self, probs: jax.Array) -> jax.Array:
        return self.probs_dropout()(probs)

    def finish(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """The layer's output for states ``x`` [..., T, H] given their attention context
        [..., T, heads, d]."""
        raise NotImplementedError

    def layer_context(self, shared: Any) -> Any:
        """What this layer derives, once per pass, from the encoder's
        ``position_context()``; nothing by default."""
        return None

    def scores(self, q: jax.Array, k: jax.Array, pos_q: jax.Array, pos_k: jax.Array | None,
               ctx: Any = None) -> jax.Array:
        """fp32 attention logits [..., heads, Tq, Tk] of q [..., Tq, h, d] at ``pos_q``
        for k [..., Tk, h, d] at ``pos_k`` (None: keys without a position, e.g.
        prefixes). By default the scaled dot product (positions enter in ``project``)."""
        # heads-first operands, as attention.dot_product_attention has them (one transpose)
        return jnp.einsum("...hqd,...hkd->...hqk", q.swapaxes(-2, -3), k.swapaxes(-2, -3)
                          ).astype(jnp.float32) * (q.shape[-1] ** -0.5)

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None,
               positions: jax.Array | None = None, ctx: Any = None) -> jax.Array:
        """The input tokens' attention context [B, T, h, d], through
        ``attention.input_attention``."""
        return input_attention(q, k, v, bias, dropout=self.probs_dropout())

    def __call__(self, x: jax.Array, positions: jax.Array, bias: jax.Array | None,
                 extra_kv: tuple[jax.Array, jax.Array] | None = None,
                 shared: Any = None) -> jax.Array:
        """x: [B, T, H] at ``positions`` [B, T]; bias: additive, broadcastable to
        [B, heads, T, T]; ``shared``: the encoder's ``position_context()``.

        ``extra_kv`` are keys/values [B, P, heads, head_dim] that every query
        may attend to, placed before the sequence's own (prefix tuning).
        """
        ctx = self.layer_context(shared)
        q, k, v = self.project(x, positions)
        if extra_kv is None:
            return self.finish(x, self.attend(q, k, v, bias, positions, ctx))
        pk, pv = (a.astype(k.dtype) for a in extra_kv)
        own = self.scores(q, k, positions, positions, ctx)
        scores = jnp.concatenate([self.scores(q, pk, positions, None, ctx),
                                  own if bias is None else own + bias], axis=-1)
        context = softmax_context(scores, jnp.concatenate([pv, v], axis=1), self.drop_probs)
        return self.finish(x, context)


class Encoder(nnx.Module):
    """Embeddings, layers, final step and pooler of a family (see the module docstring).

    Params are fp32; ``dtype`` is the compute dtype (``jnp.bfloat16`` on TPU/GPU).
    """

    embeddings: nnx.Module
    layers: nnx.List
    pooler: nnx.Module

    def position_context(self) -> Any:
        """What every layer needs beyond its own parameters for one pass (DeBERTa: the
        normalised relative embeddings); nothing by default."""
        return None

    def final(self, x: jax.Array) -> jax.Array:
        """What follows the last layer (ModernBERT's final norm); nothing by default."""
        return x

    def pool_input(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """[B, L, H] final states -> [B, H] what the pooler reads: [CLS] by default."""
        return x[:, 0]

    def layer_biases(self, attention_mask: jax.Array, positions: jax.Array
                     ) -> dict[int | None, jax.Array]:
        """Input tokens' attention bias for each window the layers use."""
        return {w: attention_bias(attention_mask, positions, w)
                for w in {layer.window for layer in self.layers}}

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Returns (last hidden states [B, L, H], pooled [B, H])."""
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        positions = token_positions(input_ids)
        biases = self.layer_biases(attention_mask, positions)
        shared = self.position_context()
        for layer in self.layers:
            x = layer(x, positions, biases[layer.window], shared=shared)
        x = self.final(x)
        return x, self.pooler(self.pool_input(x, attention_mask))


def token_positions(input_ids: jax.Array) -> jax.Array:
    """[B, L] positions 0..L-1 of the input tokens (what rotary layers rotate by)."""
    return jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)

"""Learned per-task parameters that condition the shared encoder.

- :class:`TaskPrompts` (mode ``mtop``): P prompt embeddings per task that join
  the sequence after the input tokens, for encoders with learned absolute
  positions a learned per-slot position embedding shared by the tasks (rotary
  encoders place the prompts at positions instead, DESIGN.md section 9;
  prompts get no token-type embedding), and for
  ``prompt_depth='deep'`` a per-layer, per-task offset added to the prompt
  states before every layer (DESIGN.md section 3).
- :class:`PrefixPrompts` (mode ``prefix``): prefix tuning, P key/value pairs per
  layer per task that the input attends to, optionally produced by an MLP from
  a smaller embedding (Li & Liang 2021's reparameterisation).

The task axis is the leading axis of every parameter here, so a subset of
tasks is a slice (see ``MultiTaskModel.select_tasks``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mtop_jax.models.axes import EMBED, HEADS, LAYERS, MLP, PROMPTS, TASKS, param_init
from mtop_jax.models.config import EncoderConfig

#: How mtop's prompts start (``init.prompts``): normal(0.02), or a token plus that noise.
PROMPT_INITS = ("random", "cls")


class TaskPrompts(nnx.Module):
    def __init__(self, cfg: EncoderConfig, num_tasks: int, num_prompts: int, deep: bool, *,
                 rngs: nnx.Rngs):
        h = cfg.hidden_size
        normal = nnx.initializers.normal(0.02)
        self.embedding = nnx.Param(
            param_init(normal, TASKS, PROMPTS, EMBED)(rngs.params(), (num_tasks, num_prompts, h)))
        self.slot_position = nnx.Param(param_init(normal, PROMPTS, EMBED)(
            rngs.params(), (num_prompts, h))) if cfg.learned_positions else None
        # Zero offsets: a deep model starts out computing what an input-depth one does.
        self.deep_offset = nnx.Param(param_init(nnx.initializers.zeros_init(), TASKS, LAYERS,
                                                PROMPTS, EMBED)(
            rngs.params(), (num_tasks, cfg.num_layers, num_prompts, h))) if deep else None

    def start_from_token(self, embeddings: nnx.Module, token_id: int) -> None:
        """Every prompt starts as the token ``token_id`` at position 0 (type 0) plus its
        random init (which keeps the slots and tasks apart): with the [CLS] id, each
        task's prompts begin by reading the text as the pretrained [CLS] does, where
        random vectors begin outside anything the encoder was trained on
        (``init.prompts="cls"``; Lester et al. 2021 start from vocabulary embeddings)."""
        token = embeddings.word_embeddings.embedding[token_id]
        if embeddings.token_type_embeddings is not None:
            token = token + embeddings.token_type_embeddings.embedding[0]
        updates = [(self.embedding, token)]
        if self.slot_position is not None:
            updates.append((self.slot_position, embeddings.position_embeddings.embedding[
                embeddings.position_ids(jnp.full((1, 1), token_id))[0, 0]]))
        for var, add in updates:
            old = var.get_value()
            var.set_value(jax.device_put(old + add.astype(old.dtype), old.sharding))

    def initial_states(self, embeddings: nnx.Module, batch: int) -> jax.Array:
        """[B, N, P, H] prompt states entering layer 0: the encoder's embedding LayerNorm of
        prompt (+ slot position), then its dropout, drawn for every row (as a token's is)."""
        p = self.embedding[...]
        if self.slot_position is not None:
            p = p + self.slot_position[...]
        p = embeddings.norm(p)
        return embeddings.dropout(jnp.broadcast_to(p, (batch, *p.shape)))

    def offset(self, layer: int) -> jax.Array | None:
        """[N, P, H] the deep offset of ``layer``, or None for input-depth prompts."""
        return None if self.deep_offset is None else self.deep_offset[:, layer]


class PrefixPrompts(nnx.Module):
    """Keys and values [N, layers, P, heads, head_dim] prepended at every layer."""

    def __init__(self, cfg: EncoderConfig, num_tasks: int, num_prompts: int, *,
                 mlp_hidden: int = 0, rngs: nnx.Rngs):
        self.cfg = cfg
        h, nl = cfg.hidden_size, cfg.num_layers
        normal = nnx.initializers.normal(0.02)
        self.mlp_hidden = mlp_hidden
        if mlp_hidden:
            self.embedding = nnx.Param(param_init(normal, TASKS, PROMPTS, EMBED)(
                rngs.params(), (num_tasks, num_prompts, h)))
            self.w1 = nnx.Param(param_init(normal, TASKS, EMBED, MLP)(
                rngs.params(), (num_tasks, h, mlp_hidden)))
            zeros = nnx.initializers.zeros_init()
            self.b1 = nnx.Param(param_init(zeros, TASKS, MLP)(rngs.params(),
                                                              (num_tasks, mlp_hidden)))
            self.w2 = nnx.Param(param_init(normal, TASKS, MLP, HEADS)(
                rngs.params(), (num_tasks, mlp_hidden, nl * 2 * h)))
            self.b2 = nnx.Param(param_init(zeros, TASKS, HEADS)(rngs.params(),
                                                                (num_tasks, nl * 2 * h)))
        else:
            self.kv = nnx.Param(param_init(normal, TASKS, LAYERS, None, PROMPTS, HEADS)(
                rngs.params(), (num_tasks, nl, 2, num_prompts, h)))

    def __call__(self) -> tuple[jax.Array, jax.Array]:
        """(keys, values), each [N, layers, P, heads, head_dim]."""
        cfg = self.cfg
        if self.mlp_hidden:
            e = self.embedding[...]
            hid = jnp.tanh(jnp.einsum("nph,nhm->npm", e, self.w1[...]) + self.b1[...][:, None])
            out = jnp.einsum("npm,nmo->npo", hid, self.w2[...]) + self.b2[...][:, None]
            n, p = e.shape[:2]
            kv = out.reshape(n, p, cfg.num_layers, 2, cfg.hidden_size).transpose(0, 2, 3, 1, 4)
        else:
            kv = self.kv[...]
        kv = kv.reshape(*kv.shape[:-1], cfg.num_heads, cfg.head_dim)
        return kv[:, :, 0], kv[:, :, 1]

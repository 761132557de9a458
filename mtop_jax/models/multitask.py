"""One multi-task model family, four modes (DESIGN.md section 2).

==========  ======================================================  =============
mode        what it is                                              passes/N tasks
==========  ======================================================  =============
``mtop``    shared encoder; every task's prompts in one sequence    1
``shared``  shared encoder, one pooled [CLS], N heads (MT-DNN)      1
``prefix``  prefix tuning: P key/value pairs per layer per task     N
``single``  N separately fine-tuned encoders                        N
==========  ======================================================  =============

Every mode maps a batch to padded logits [B, N, C] (:meth:`MultiTaskModel.logits`)
or to a dict task name -> logits [B, C_t] (``__call__``); a regression task's
"logits" are its one predicted value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtop_jax.errors import ConfigError
from mtop_jax.models import prompt_attention
from mtop_jax.models.axes import TASKS, is_per_task, logical_axes
from mtop_jax.models.config import EncoderConfig
from mtop_jax.models.encoders import Encoder, build_encoder
from mtop_jax.models.encoders.base import token_positions
from mtop_jax.models.heads import TaskHeads
from mtop_jax.models.pooling import POOLERS, TaskQueries, pool_tasks
from mtop_jax.models.prompts import PrefixPrompts, TaskPrompts

MODES = ("mtop", "shared", "prefix", "single")
PROMPT_DEPTHS = ("input", "deep")
ATTENTION_IMPLS = ("fast", "dense")
#: Parameter groups a trainer can freeze or give their own learning rate.
PARAM_GROUPS = ("backbone", "prompts", "pooler", "heads")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    mode: str = "mtop"
    num_prompts: int = 4  # P, prompt tokens (or prefix length) per task
    prompt_depth: str = "input"  # mtop: prompts at the embedding layer only, or deep offsets
    pooler: str = "conditional"  # mtop: "prompt" or "conditional"
    attention: str = "fast"  # mtop: "fast" path, or the "dense" masked reference
    prefix_mlp_hidden: int = 0  # prefix: 0 = direct key/values, >0 = MLP reparameterisation
    dtype: str = "float32"  # compute dtype; params stay fp32

    def __post_init__(self):
        for field, allowed in (("mode", MODES), ("prompt_depth", PROMPT_DEPTHS),
                               ("pooler", POOLERS), ("attention", ATTENTION_IMPLS),
                               ("dtype", tuple(DTYPES))):
            if getattr(self, field) not in allowed:
                raise ConfigError(
                    f"model.{field}: {getattr(self, field)!r} not in {list(allowed)}")
        if self.mode in ("mtop", "prefix") and self.num_prompts < 1:
            raise ConfigError(f"model.num_prompts: must be >= 1 for mode {self.mode!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"model: unknown keys {unknown}; known {sorted(known)}")
        return cls(**d)


Task = tuple[str, int]  # (name, number of outputs: classes, or 1 for regression)


class MultiTaskModel(nnx.Module):
    def __init__(self, encoder_cfg: EncoderConfig, cfg: ModelConfig, tasks: Sequence[Task], *,
                 rngs: nnx.Rngs):
        if not tasks:
            raise ConfigError("model: at least one task is needed")
        names = [t[0] for t in tasks]
        if len(set(names)) != len(names):
            raise ConfigError(f"model: duplicate task names in {names}")
        self.encoder_cfg = encoder_cfg
        self.cfg = cfg
        self.tasks = tuple((str(n), int(c)) for n, c in tasks)
        n = len(self.tasks)
        dtype = DTYPES[cfg.dtype]
        h = encoder_cfg.hidden_size

        if cfg.mode == "single":

            @nnx.split_rngs(splits=n)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: TASKS})
            def make(r: nnx.Rngs) -> Encoder:
                return build_encoder(encoder_cfg, rngs=r, dtype=dtype)

            self.encoders = make(rngs)
        else:
            self.encoder = build_encoder(encoder_cfg, rngs=rngs, dtype=dtype)
        if cfg.mode == "mtop":
            self.prompts = TaskPrompts(encoder_cfg, n, cfg.num_prompts,
                                       deep=cfg.prompt_depth == "deep", rngs=rngs)
            self.queries = (TaskQueries(h, n, rngs=rngs) if cfg.pooler == "conditional"
                            else None)
        if cfg.mode == "prefix":
            self.prefix = PrefixPrompts(encoder_cfg, n, cfg.num_prompts,
                                        mlp_hidden=cfg.prefix_mlp_hidden, rngs=rngs)
        self.heads = TaskHeads(h, [c for _, c in self.tasks], rngs=rngs, dtype=dtype)

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.tasks)

    # ------------------------------------------------------------------ forward

    def mtop_states(self, input_ids, attention_mask, token_type_ids=None):
        """(input states [B, L, H], prompt states [B, N, P, H]) of mode ``mtop``."""
        run = (prompt_attention.run_fast if self.cfg.attention == "fast"
               else prompt_attention.run_dense)
        return run(self.encoder, self.prompts, input_ids, attention_mask, token_type_ids)

    def features(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None) -> jax.Array:
        """[B, N, H] every task's pooled representation h_t (DESIGN.md section 6)."""
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        n = len(self.tasks)
        mode = self.cfg.mode
        if mode == "mtop":
            x, p = self.mtop_states(input_ids, attention_mask, token_type_ids)
            return pool_tasks(self.cfg.pooler, self.encoder.pooler, self.queries, x, p,
                              attention_mask)
        if mode == "shared":
            _, pooled = self.encoder(input_ids, attention_mask, token_type_ids)
            return jnp.broadcast_to(pooled[:, None], (pooled.shape[0], n, pooled.shape[-1]))
        if mode == "prefix":
            return self._prefix_features(input_ids, attention_mask, token_type_ids)

        @nnx.vmap(in_axes=(0, None, None, None), out_axes=1)
        def run(encoder: Encoder, ids, mask, types):
            return encoder(ids, mask, types)[1]

        return run(self.encoders, input_ids, attention_mask, token_type_ids)

    def _prefix_features(self, input_ids, attention_mask, token_type_ids):
        """N passes, folded into the batch: row (t, b) is text b under task t's prefix."""
        keys, values = self.prefix()  # [N, layers, P, h, d]
        n, b = len(self.tasks), input_ids.shape[0]
        tile = lambda a: None if a is None else jnp.tile(a, (n, 1))  # [N*B, L], task-major
        encoder, ids, mask = self.encoder, tile(input_ids), tile(attention_mask)
        x = encoder.embeddings(ids, tile(token_type_ids))
        positions = token_positions(ids)
        biases = encoder.layer_biases(mask, positions)
        per_row = lambda kv: jnp.repeat(kv, b, axis=0).astype(x.dtype)  # [N*B, P, h, d]
        shared = encoder.position_context()
        for i, layer in enumerate(encoder.layers):
            x = layer(x, positions, biases[layer.window],
                      extra_kv=(per_row(keys[:, i]), per_row(values[:, i])), shared=shared)
        pooled = encoder.pooler(encoder.pool_input(encoder.final(x), mask))
        return pooled.reshape(n, b, -1).transpose(1, 0, 2)

    def logits(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               token_type_ids: jax.Array | None = None) -> jax.Array:
        """[B, N, C] padded logits, fp32; padded classes hold ``MASKED_LOGIT``."""
        return self.heads(self.features(input_ids, attention_mask, token_type_ids))

    def split(self, logits: jax.Array) -> dict[str, jax.Array]:
        """Padded [B, N, C] -> {task name: [B, C_t]}."""
        return {name: logits[:, t, :c] for t, (name, c) in enumerate(self.tasks)}

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None) -> dict[str, jax.Array]:
        return self.split(self.logits(input_ids, attention_mask, token_type_ids))

    # ------------------------------------------------------------------ tasks

    def select_tasks(self, names: Sequence[str]) -> MultiTaskModel:
        """A new model serving only ``names`` (in that order), sharing nothing mutable.

        Per-task parameters (leading logical axis ``tasks``) are sliced; all
        others are copied. Removing a task is selecting the rest.
        """
        index = {name: t for t, name in enumerate(self.task_names)}
        unknown = [n for n in names if n not in index]
        if unknown:
            raise ConfigError(f"unknown tasks {unknown}; the model has {list(self.task_names)}")
        idx = np.asarray([index[n] for n in names])
        subset = [self.tasks[i] for i in idx]
        new = nnx.eval_shape(lambda: MultiTaskModel(self.encoder_cfg, self.cfg, subset,
                                                    rngs=nnx.Rngs(0)))

        width = max(c for _, c in subset)

        def take(path, var: nnx.Variable) -> nnx.Variable:
            value = var.get_value()
            # Everything of a per-task encoder (its rng counters too) is stacked on tasks.
            if is_per_task(var) or path[0] == "encoders":
                value = value[idx]
            if is_per_task(var) and logical_axes(var)[-1] == "classes":
                value = value[..., :width]
            return var.replace(value)

        flat = nnx.to_flat_state(nnx.state(self))
        state = nnx.from_flat_state([(path, take(path, var)) for path, var in flat])
        nnx.update(new, state)
        if is_deterministic(self):
            new.eval()
        return new


# ---------------------------------------------------------------------- helpers


def is_deterministic(module: nnx.Module) -> bool:
    """True when the module is in eval mode (its dropouts are off)."""
    return all(m.deterministic for _, m in nnx.iter_graph(module) if isinstance(m, nnx.Dropout))


def param_group(path: Sequence[Any]) -> str:
    """Which of ``PARAM_GROUPS`` the parameter at ``path`` belongs to."""
    keys = [str(k) for k in path]
    if keys[0] in ("encoder", "encoders"):
        return "pooler" if "pooler" in keys else "backbone"
    if keys[0] in ("prompts", "prefix"):
        return "prompts"
    if keys[0] == "queries":
        return "pooler"
    if keys[0] == "heads":
        return "heads"
    raise ValueError(f"parameter {'/'.join(keys)} belongs to no group")


def param_labels(model: MultiTaskModel) -> nnx.State:
    """A State of group names shaped like ``nnx.state(model, nnx.Param)`` (for optax)."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return nnx.from_flat_state([(path, var.replace(param_group(path))) for path, var in flat])


def load_backbone(model: MultiTaskModel, params: dict[tuple[Any, ...], np.ndarray]) -> None:
    """Write pretrained encoder ``params`` into the model (into every copy for ``single``)."""
    from mtop_jax.models.pretrained import assign_params

    if model.cfg.mode == "single":
        n = len(model.tasks)
        assign_params(model.encoders,
                      {k: np.broadcast_to(v, (n, *v.shape)) for k, v in params.items()})
    else:
        assign_params(model.encoder, params)


def params_per_task(model: MultiTaskModel) -> int:
    """Parameters one more task adds: those on the ``tasks`` axis, divided by N."""
    total = 0
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if is_per_task(var):
            total += int(np.prod(var.get_value().shape))
    return total // len(model.tasks)


"""How far apart the tasks' representations are: whether the prompts condition anything.

In mode ``mtop`` the input tokens never see the prompts (I1), so task t's
representation differs from task u's only through their prompts. An encoder can wash
input-depth prompts out: through the six post-LayerNorm layers of all-MiniLM-L6-v2
the tasks' differences shrink about 30x per layer from the fourth layer on, to 1e-5 of
the differences between texts (benchmarks/README.md, "Why mtop equalled shared"). Then
every task reads the same vector and ``mtop`` *is* the ``shared`` baseline with N
heads. Deep prompts (``model.prompt_depth="deep"``) add each task's offset before
every layer, so the last layers cannot erase it.

The spread of states ``[B, N, ...]`` (B texts, N tasks) is the standard deviation
across tasks over the standard deviation across texts, each averaged over the other
axes: 0 when all tasks see the same vector, about 1 when tasks differ as much as texts.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from mtop_jax.errors import ConfigError
from mtop_jax.models import prompt_attention
from mtop_jax.models.pooling import pool_tasks


def spread(states: Any) -> float:
    """Std across tasks / std across texts of ``states`` [B, N, ...] (B, N >= 2)."""
    states = np.asarray(states, np.float64)
    across_tasks = states.std(axis=1).mean()
    across_texts = states.std(axis=0).mean()
    return float(across_tasks / across_texts) if across_texts > 0 else float("nan")


def task_spread(model: nnx.Module, input_ids: Any, attention_mask: Any,
                token_type_ids: Any = None) -> dict[str, Any]:
    """``{"layers": [spread of the prompt states after layer 1, 2, ..], "features":
    spread of the pooled h_t}`` of an ``mtop`` model (in eval mode, as
    ``mtop_jax.load`` builds it) on one batch of at least two texts."""
    cfg = model.cfg
    if cfg.mode != "mtop":
        raise ConfigError(f"model.mode: task spread needs 'mtop', got {cfg.mode!r} (in "
                          "'shared' every task reads the same [CLS]: spread 0 by design)")
    if len(model.tasks) < 2 or np.shape(input_ids)[0] < 2:
        raise ConfigError("task spread: needs at least two tasks and two texts, got "
                          f"{len(model.tasks)} and {np.shape(input_ids)[0]}")
    graphdef, state = nnx.split(model)

    @jax.jit
    def states(state, ids, mask, types):
        m = nnx.merge(graphdef, state)
        trace: list[jax.Array] = []
        x, p = prompt_attention.run_fast(m.encoder, m.prompts, ids, mask, types, trace=trace)
        return trace, pool_tasks(cfg.pooler, m.encoder.pooler, m.queries, x, p, mask)

    trace, features = states(state, input_ids, attention_mask, token_type_ids)
    return {"layers": [spread(t) for t in trace], "features": spread(features)}

"""Helpers shared by the MTOP model tests: tiny multi-task models whose parameters are
all non-trivial, the same model under the other attention implementation, and the
fast-path-versus-dense-reference comparison."""

import jax
import numpy as np
from flax import nnx

from mtop_jax.models.config import PRESETS
from mtop_jax.models.multitask import ModelConfig, MultiTaskModel
from mtop_jax.parallel.sharding import DEFAULT_RULES, state_shardings

TINY = PRESETS["tiny"]


def make_tasks(n: int):
    return [(f"task{t}", 1 if t % 4 == 3 else 2 + t % 5) for t in range(n)]


def make_model(n=3, *, mode="mtop", seed=0, encoder_cfg=TINY, mesh=None, **kw) -> MultiTaskModel:
    """A model in eval mode whose prompt-side parameters are all non-trivial."""
    # Built eagerly: the per-op compile caches make that cheaper than one jitted init per test.
    model = MultiTaskModel(encoder_cfg, ModelConfig(mode=mode, **kw), make_tasks(n),
                           rngs=nnx.Rngs(seed))
    model.eval()
    # Zero-initialised parameters (deep offsets, pooler queries, biases) would hide bugs.
    state = nnx.state(model, nnx.Param)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    nnx.update(model, jax.tree.unflatten(tree, leaves))
    return model if mesh is None else shard_model(model, mesh)


def shard_model(model: MultiTaskModel, mesh) -> MultiTaskModel:
    """Place every variable of ``model`` on ``mesh`` by its logical names (in place)."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, state_shardings(state, mesh, DEFAULT_RULES)))
    return model


def with_attention(model: MultiTaskModel, impl: str) -> MultiTaskModel:
    """The same parameters, run through the other attention implementation."""
    other = MultiTaskModel(model.encoder_cfg, ModelConfig(
        **{**model.cfg.__dict__, "attention": impl}), model.tasks, rngs=nnx.Rngs(0))
    nnx.update(other, nnx.state(model))
    other.eval()
    return other


_mtop_run = jax.jit(lambda m, i, k, t: (*m.mtop_states(i, k, t), m.logits(i, k, t)))


def assert_fast_equals_dense(fast: MultiTaskModel, ids, mask, types=None,
                             atol: float = 1e-5) -> tuple[dict[str, float], jax.Array]:
    """Run ``fast`` (attention "fast") and its dense reference on one batch; assert input
    states (on real tokens), prompt states and logits agree within ``atol``. Returns the
    max abs differences and the fast path's input states."""
    assert fast.cfg.attention == "fast"
    xf, pf, logits_f = _mtop_run(fast, ids, mask, types)
    xd, pd, logits_d = _mtop_run(with_attention(fast, "dense"), ids, mask, types)
    real = np.asarray(mask, bool)[..., None]
    pairs = {"inputs": (np.where(real, xf, 0), np.where(real, xd, 0)), "prompts": (pf, pd),
             "logits": (logits_f, logits_d)}
    errors = {k: float(np.abs(np.asarray(a) - np.asarray(b)).max())
              for k, (a, b) in pairs.items()}
    for name, (a, b) in pairs.items():
        np.testing.assert_allclose(a, b, atol=atol, rtol=0, err_msg=name)
    return errors, xf

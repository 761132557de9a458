"""Per-task gradients with one forward pass, and applying a gradient weighting to them.

- :func:`per_task_grads`: ``jax.vjp`` of the per-task loss vector once, then its
  VJP ``jax.vmap``-ed over the rows of the K x K identity: the K per-task
  gradients, stacked on a leading axis of every leaf (memory: K gradients).
- :func:`gram_of_tree` / :func:`combine_grad_tree`: the method applied to them
  without ever concatenating the leaves into ``[K, D]``: the Gram matrix is a sum of per-leaf
  contractions and ``d`` a per-leaf weighted sum, so every leaf keeps its
  sharding. ``shared`` selects the leaves the method acts on; the others (task
  heads) get the plain sum of the present tasks' gradients, as in the CAGrad,
  GetMTL and Nash-MTL code, where the method only rewrites the shared gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from mtop_jax.errors import ConfigError
from mtop_jax.weighting.base import Aux, GradWeighting, State, as_mask, contract, weighted_sum

PyTree = Any
#: Which gradient leaves the method acts on: None (all), a pytree of bools with the
#: structure of the parameters, or ``fn(path, leaf) -> bool`` (``path`` as in
#: ``jax.tree_util.tree_flatten_with_path``; ``leaf`` is the stacked [K, ...] gradient).
SharedSpec = PyTree | Callable[[tuple, jax.Array], bool] | None


def per_task_grads(
    loss_fn: Callable[..., Any],
    params: PyTree,
    batch: Any,
    num_tasks: int,
    *,
    has_aux: bool = False,
) -> tuple[Any, PyTree]:
    """Per-task losses and their gradients with one forward pass and K vmapped VJPs.

    ``loss_fn(params, batch) -> losses: f32[K]`` (or ``(losses, aux)`` with
    ``has_aux``). Returns ``(losses, grads)`` (``((losses, aux), grads)`` with
    ``has_aux``, like ``jax.value_and_grad``), ``grads`` the pytree of ``params``
    with a leading ``[K]`` axis on every leaf: ``grads[k] = d losses[k] / d params``.
    """
    f = lambda p: loss_fn(p, batch)
    if has_aux:
        losses, vjp_fn, aux = jax.vjp(f, params, has_aux=True)
    else:
        losses, vjp_fn = jax.vjp(f, params)
    if losses.shape != (num_tasks,):
        raise ConfigError(f"per_task_grads: loss_fn returned shape {losses.shape}, "
                          f"expected ({num_tasks},)")
    (grads,) = jax.vmap(vjp_fn)(jnp.eye(num_tasks, dtype=losses.dtype))
    return ((losses, aux) if has_aux else losses), grads


def gram_of_tree(grads: PyTree, present: jax.Array | None = None) -> jax.Array:
    """``G G^T: f32[K, K]`` of stacked per-task gradients, leaf by leaf (no concatenation)."""
    leaves = jax.tree.leaves(grads)
    if not leaves:
        raise ConfigError("gram_of_tree: no gradient leaves")
    k = leaves[0].shape[0]
    mask = as_mask(present, k)
    gram = jnp.zeros((k, k), jnp.float32)
    for leaf in leaves:
        leaf = _mask_rows(leaf, mask)
        gram = gram + contract(leaf, leaf)
    return gram


def select_shared(tree: PyTree, shared: SharedSpec = None) -> list[jax.Array]:
    """The leaves of ``tree`` (e.g. the parameters) that ``shared`` marks, in the order
    :func:`combine_grad_tree` visits them (what DB-MTL's ``init(grads_like=...)`` takes)."""
    leaves = jax.tree.leaves(tree)
    return [x for x, f in zip(leaves, _shared_flags(tree, shared), strict=True) if f]


def _mask_rows(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.where(mask.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros_like(x))


def _shared_flags(grads: PyTree, shared: SharedSpec) -> list[bool]:
    with_path, _ = jax.tree_util.tree_flatten_with_path(grads)
    if shared is None:
        return [True] * len(with_path)
    if callable(shared):
        return [bool(shared(path, leaf)) for path, leaf in with_path]
    flags = jax.tree.leaves(shared)
    if len(flags) != len(with_path):
        raise ConfigError(f"combine_grad_tree: shared has {len(flags)} leaves, "
                          f"the gradients {len(with_path)}")
    return [bool(f) for f in flags]


def combine_grad_tree(
    method: GradWeighting,
    grads: PyTree,
    losses: jax.Array,
    present: jax.Array | None,
    state: State,
    key: jax.Array | None = None,
    *,
    shared: SharedSpec = None,
) -> tuple[PyTree, State, Aux]:
    """Apply a gradient weighting to stacked per-task gradients (from :func:`per_task_grads`).

    Returns ``(grad, new_state, aux)``: ``grad`` has the structure of one task's
    gradients (feed it to ``optimizer.update``). On the ``shared`` leaves it is the
    method's direction (:meth:`GradWeighting.combine_shared`: ``sum_k weights_k g_k``
    with weights from the Gram matrix of the shared leaves only, for all but
    GradDrop); on the other leaves the plain sum over present tasks. A method with
    ``transform_grads`` (DB-MTL) first replaces the gradients by what it combines.
    """
    leaves, treedef = jax.tree.flatten(grads)
    k = method.num_tasks
    for leaf in leaves:
        if leaf.ndim < 1 or leaf.shape[0] != k:
            raise ConfigError(f"combine_grad_tree: a gradient leaf has shape {leaf.shape}, "
                              f"expected a leading axis of {k} tasks")
    flags = _shared_flags(grads, shared)
    mask = as_mask(present, k)
    dtypes = [x.dtype for x in leaves]
    leaves = [_mask_rows(x, mask) for x in leaves]
    leaves, state = method.transform_grads(leaves, flags, jnp.asarray(losses), mask, state)
    shared_leaves = [x for x, f in zip(leaves, flags, strict=True) if f]
    if not shared_leaves:
        raise ConfigError("combine_grad_tree: no leaf is marked shared")
    shared_out, state, aux = method.combine_shared(shared_leaves, losses, mask, state, key)
    shared_out = iter(shared_out)
    ones = mask.astype(jnp.float32)
    out = [(next(shared_out) if f else weighted_sum(ones, x)).astype(dt)
           for x, f, dt in zip(leaves, flags, dtypes, strict=True)]
    return jax.tree.unflatten(treedef, out), state, aux


"""The two kinds of weighting method, and the masked helpers they share.

A method is a frozen dataclass holding only hyper-parameters (hashable, so it
can be closed over by, or passed statically to, a ``jax.jit``-ed step). All
mutable quantities live in its *state*, a dict of jnp arrays returned by
``init`` and threaded through the train step like an optax state; ``uncertainty``
also has *learned parameters* (``init_params``) that the trainer differentiates
and optimises together with the model.

- :class:`LossWeighting`: ``combine(losses, present, state, params)`` turns the
  per-task losses into the scalar that the trainer differentiates;
  ``update(state, losses, present, ...)`` advances the state after the step.
- :class:`GradWeighting`: ``weights_from_gram(gram, losses, present, state, key)``
  turns the Gram matrix of the per-task gradients into per-task coefficients;
  ``combine_shared`` applies them to the per-task gradient leaves (a method that is
  not a linear combination of the gradients, GradDrop, overrides it instead), and
  ``combine_grad_tree`` calls it on the shared leaves of a gradient tree.

Every method reads a ``present: bool[K]`` mask (``None``: all present). An absent
task (no labelled example in the batch) gets weight 0, its loss is never read
(so it may be any finite number, typically 0) and it leaves the method's state
as it was; each method's docstring says what that means for it.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from mtop_jax.errors import ConfigError

#: A method's state: a dict of jnp arrays (nested pytrees for FAMO's optional optax state).
State = dict[str, Any]
#: Per-step diagnostics: a flat dict of jnp arrays, ``"weights"`` always among them.
Aux = dict[str, jax.Array]
#: Learned parameters of a loss-based method (``{}`` for all but ``uncertainty``).
Params = dict[str, jax.Array]


def as_mask(present: jax.Array | None, num_tasks: int) -> jax.Array:
    """``present`` as a ``bool[num_tasks]`` array; ``None`` means every task is present."""
    if present is None:
        return jnp.ones((num_tasks,), bool)
    present = jnp.asarray(present)
    if present.shape != (num_tasks,):
        raise ConfigError(f"weighting: present has shape {present.shape}, expected ({num_tasks},)")
    return present.astype(bool)


def check_losses(losses: jax.Array, num_tasks: int) -> jax.Array:
    losses = jnp.asarray(losses)
    if losses.shape != (num_tasks,):
        raise ConfigError(f"weighting: losses have shape {losses.shape}, expected ({num_tasks},)")
    return losses


def masked_softmax(x: jax.Array, mask: jax.Array) -> jax.Array:
    """softmax of ``x`` over the entries where ``mask`` holds, 0 elsewhere (all 0 if none)."""
    x = jnp.asarray(x, jnp.float32)
    top = jnp.max(jnp.where(mask, x, jnp.finfo(jnp.float32).min))
    x = jnp.where(mask, x, top)  # finite everywhere, so no inf * 0 in the gradient
    e = jnp.where(mask, jnp.exp(x - top), 0.0)
    s = jnp.sum(e)
    return e / jnp.where(s > 0, s, 1.0)


def num_present(mask: jax.Array) -> jax.Array:
    """Number of present tasks as a float32 scalar."""
    return jnp.sum(mask.astype(jnp.float32))


def uniform_over(mask: jax.Array) -> jax.Array:
    """1/K_p on the present tasks, 0 elsewhere (all 0 if none is present)."""
    m = mask.astype(jnp.float32)
    return m / jnp.maximum(jnp.sum(m), 1.0)


def task_orders(key: jax.Array | None, num_tasks: int) -> jax.Array:
    """``int32[K, K]``: row i an order in which task i visits the tasks (PCGrad, GradVac).

    Each row is its own permutation drawn from ``key`` (the same key, the same
    orders); ``key=None`` gives ``0..K-1`` for every task.
    """
    if key is None:
        return jnp.broadcast_to(jnp.arange(num_tasks), (num_tasks, num_tasks))
    keys = jax.random.split(key, num_tasks)
    return jax.vmap(lambda kk: jax.random.permutation(kk, num_tasks))(keys)


_HI = jax.lax.Precision.HIGHEST


def contract(a: jax.Array, b: jax.Array) -> jax.Array:
    """``[K, ...] x [K, ...] -> [K, K]`` contracting every non-leading axis, in float32."""
    axes = tuple(range(1, a.ndim))
    return jax.lax.dot_general(a, b, ((axes, axes), ((), ())), precision=_HI,
                               preferred_element_type=jnp.float32)


def weighted_sum(weights: jax.Array, x: jax.Array) -> jax.Array:
    """``sum_k weights_k x[k]`` in float32, cast back to ``x``'s dtype."""
    out = jax.lax.dot_general(weights.astype(jnp.float32), x, (((0,), (0,)), ((), ())),
                              precision=_HI, preferred_element_type=jnp.float32)
    return out.astype(x.dtype)


def _check_num_tasks(own: int, num_tasks: int | None, what: str) -> int:
    if num_tasks is not None and int(num_tasks) != own:
        raise ConfigError(f"weighting: {what}({num_tasks}) on a method built for {own} tasks")
    return own


@dataclasses.dataclass(frozen=True)
class Weighting(abc.ABC):
    """Common part: the number of tasks K, fixed when the method is built."""

    num_tasks: int
    #: registry name
    name: ClassVar[str] = ""
    #: ``"loss"`` or ``"grad"``
    kind: ClassVar[str] = ""

    def __post_init__(self):
        if not isinstance(self.num_tasks, int) or self.num_tasks < 1:
            raise ConfigError(
                f"weighting.num_tasks: must be a positive integer, got {self.num_tasks!r}"
            )

    def init(self, num_tasks: int | None = None) -> State:
        """The initial state (a dict of jnp arrays; checkpoint it with the optimizer state).

        ``num_tasks``, if given, must be the one the method was built with.
        """
        _check_num_tasks(self.num_tasks, num_tasks, "init")
        return {"step": jnp.zeros((), jnp.int32), **self._init_state()}

    def _init_state(self) -> State:
        return {}


@dataclasses.dataclass(frozen=True)
class LossWeighting(Weighting):
    """A weighting that only looks at the per-task loss values.

    Inside the differentiated loss function::

        total, aux = method.combine(losses, present, state, params)

    and after the optimizer step::

        state = method.update(state, losses, present)            # or, for FAMO,
        state = method.update(state, losses, present, new_losses=..., new_present=...)
    """

    kind: ClassVar[str] = "loss"
    #: True when ``update`` wants the same batch's losses after the optimizer step
    #: (``new_losses``, ``new_present``): the trainer then runs one more forward pass.
    needs_losses_after_step: ClassVar[bool] = False

    def init_params(self, num_tasks: int | None = None) -> Params:
        """Learned parameters of the method (``{}`` unless it has some, see ``uncertainty``)."""
        _check_num_tasks(self.num_tasks, num_tasks, "init_params")
        return {}

    def combine(
        self,
        losses: jax.Array,
        present: jax.Array | None,
        state: State,
        params: Params | None = None,
    ) -> tuple[jax.Array, Aux]:
        """``(total, aux)``: the scalar to differentiate and diagnostics.

        ``losses: f32[K]``, ``present: bool[K]``. ``aux["weights"]`` (no gradient) is
        d total / d L_k, 0 for absent tasks.
        """
        losses = check_losses(losses, self.num_tasks)
        mask = as_mask(present, self.num_tasks)
        # An absent task's loss is never read: replace it before anything sees it.
        losses = jnp.where(mask, losses, jnp.zeros_like(losses))
        total, aux = self._combine(losses, mask, state, params)
        aux = {k: jax.lax.stop_gradient(v) for k, v in aux.items()}
        return total, aux

    @abc.abstractmethod
    def _combine(
        self, losses: jax.Array, mask: jax.Array, state: State, params: Params | None
    ) -> tuple[jax.Array, Aux]: ...

    def update(
        self,
        state: State,
        losses: jax.Array,
        present: jax.Array | None = None,
        *,
        new_losses: jax.Array | None = None,
        new_present: jax.Array | None = None,
    ) -> State:
        """The state after an optimizer step on a batch whose per-task losses were ``losses``.

        ``new_losses``/``new_present``: the same batch's losses after the step (only FAMO
        reads them; see :class:`~mtop_jax.weighting.loss_based.FAMO`). No gradient flows.
        """
        losses = jax.lax.stop_gradient(check_losses(losses, self.num_tasks))
        mask = as_mask(present, self.num_tasks)
        losses = jnp.where(mask, losses, jnp.zeros_like(losses))
        if new_losses is not None:
            new_losses = jax.lax.stop_gradient(check_losses(new_losses, self.num_tasks))
            new_mask = as_mask(new_present, self.num_tasks) if new_present is not None else mask
            new_losses = jnp.where(new_mask, new_losses, jnp.zeros_like(new_losses))
        else:
            new_mask = None
        state = self._update(state, losses, mask, new_losses, new_mask)
        return {**state, "step": state["step"] + 1}

    def _update(
        self,
        state: State,
        losses: jax.Array,
        mask: jax.Array,
        new_losses: jax.Array | None,
        new_mask: jax.Array | None,
    ) -> State:
        return state


@dataclasses.dataclass(frozen=True)
class GradWeighting(Weighting):
    """A weighting that combines per-task gradients of the shared parameters.

    Almost every method here depends on the gradients only through their Gram
    matrix ``gram = G G^T`` (and the losses), and returns a direction that is a
    linear combination ``d = sum_k weights_k g_k``. So the core is
    :meth:`weights_from_gram`; :meth:`combine_shared` applies it to the stacked
    per-task gradient leaves, and :func:`~mtop_jax.weighting.grads.combine_grad_tree`
    to per-task gradient pytrees (a flat ``[K, D]`` matrix is the one-leaf case). A
    method that acts coordinate by coordinate (GradDrop) overrides
    :meth:`combine_shared` and has no :meth:`weights_from_gram`. The update is
    ``state -> new_state`` inside the call.
    """

    kind: ClassVar[str] = "grad"
    #: whether ``key`` changes the result (PCGrad's random order)
    uses_key: ClassVar[bool] = False
    #: whether :meth:`init` needs ``grads_like`` (DB-MTL's buffers of shared gradients)
    needs_grad_buffer: ClassVar[bool] = False

    def transform_grads(
        self,
        leaves: list[jax.Array],
        flags: list[bool],
        losses: jax.Array,
        mask: jax.Array,
        state: State,
    ) -> tuple[list[jax.Array], State]:
        """The gradients the method combines, from the per-task ones (``flags``: which
        leaves are shared). Default: the gradients themselves; DB-MTL swaps in its buffers."""
        return leaves, state

    def weights_from_gram(
        self,
        gram: jax.Array,
        losses: jax.Array,
        present: jax.Array | None,
        state: State,
        key: jax.Array | None = None,
    ) -> tuple[jax.Array, State, Aux]:
        """``(weights: f32[K], new_state, aux)`` with ``d = sum_k weights_k g_k``.

        ``gram: f32[K, K]`` is ``G G^T`` (absent rows/columns are ignored),
        ``losses: f32[K]`` the per-task losses (read by the loss normalisations).
        Absent tasks get weight 0. No gradient flows through.
        """
        k = self.num_tasks
        gram = jax.lax.stop_gradient(jnp.asarray(gram, jnp.float32))
        if gram.shape != (k, k):
            raise ConfigError(f"weighting: gram has shape {gram.shape}, expected ({k}, {k})")
        losses = jax.lax.stop_gradient(check_losses(losses, k)).astype(jnp.float32)
        mask = as_mask(present, k)
        both = mask[:, None] & mask[None, :]
        gram = jnp.where(both, gram, 0.0)
        losses = jnp.where(mask, losses, 0.0)
        weights, new_state, aux = self._weights(gram, losses, mask, state, key)
        weights = jnp.where(mask, weights, 0.0)
        aux = {"weights": weights, **aux}
        return weights, {**new_state, "step": state["step"] + 1}, aux

    def combine_shared(
        self,
        leaves: list[jax.Array],
        losses: jax.Array,
        present: jax.Array | None,
        state: State,
        key: jax.Array | None = None,
    ) -> tuple[list[jax.Array], State, Aux]:
        """``(d_leaves, new_state, aux)``: the direction on stacked per-task leaves ``[K, ...]``.

        The leaves' absent rows must already be zero (``combine_grad_tree`` does it).
        Default: ``d = sum_k weights_k g_k`` with the weights of :meth:`weights_from_gram`
        on the Gram matrix summed leaf by leaf (no concatenation, so each leaf keeps
        its sharding).
        """
        gram = jnp.zeros((self.num_tasks, self.num_tasks), jnp.float32)
        for x in leaves:
            gram = gram + contract(x, x)
        weights, state, aux = self.weights_from_gram(gram, losses, present, state, key)
        return [weighted_sum(weights, x) for x in leaves], state, aux

    @abc.abstractmethod
    def _weights(
        self,
        gram: jax.Array,
        losses: jax.Array,
        mask: jax.Array,
        state: State,
        key: jax.Array | None,
    ) -> tuple[jax.Array, State, Aux]: ...

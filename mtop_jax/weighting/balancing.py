"""Gradient weightings that balance the tasks' gradient magnitudes or utilities:
GradNorm, Nash-MTL, FairGrad (and DB-MTL, whose state is a gradient buffer).

Each maps the Gram matrix ``M = G G^T`` of the per-task (shared) gradients to the
coefficients ``weights: f32[K]`` of ``d = sum_k weights_k g_k`` (see
:class:`~mtop_jax.weighting.base.GradWeighting`); absent tasks get weight 0 and
the problems run over the present tasks only.

Nash-MTL and FairGrad solve ``M w = w^(-1/alpha)`` (Nash-MTL: alpha = 1), which the
references hand to cvxpy/ECOS (a sequential convex program) and to
``scipy.optimize.least_squares``. Here it is the optimality condition of the
strictly convex ``min_{w>0} 1/2 w^T M w - sum_k h(w_k)`` with ``h' = w^(-1/alpha)``
(``h = log`` for alpha = 1), solved by :func:`alpha_fair_weights`: damped Newton,
a fixed number of steps under ``lax.fori_loop``, jit-able.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax

from mtop_jax.errors import ConfigError
from mtop_jax.weighting.base import GradWeighting, State, masked_softmax, num_present
from mtop_jax.weighting.loss_based import _loss_mean_of_first_epochs, _loss_means

FAIR_ITERS = 40
_TINY = 1e-30


def alpha_fair_weights(
    gram: jax.Array,
    mask: jax.Array | None,
    alpha: float,
    *,
    num_iters: int = FAIR_ITERS,
) -> tuple[jax.Array, jax.Array]:
    """The positive root ``w`` of ``gram w = w^(-1/alpha)`` over the present tasks.

    ``gram: f32[K, K]`` (``G G^T``), ``mask: bool[K]``. Returns ``(w, residual)``:
    ``w`` (0 for absent tasks) and ``max_k |(gram w)_k - w_k^(-1/alpha)| / w_k^(-1/alpha)``
    over the present tasks (the relative residual; ~1e-6 once converged).

    ``w`` minimises ``f(w) = 1/2 w^T M w - sum_k h(w_k)``, convex with ``h' =
    w^(-1/alpha)``. The Gram matrix is first divided by its mean present diagonal
    ``s`` (the root of ``s M'`` is ``s^(-alpha/(1+alpha))`` times that of ``M'``), the
    start is the root of the diagonal alone, and each of the ``num_iters`` Newton
    steps ``p = -H^-1 grad f`` is damped by ``1 / (1 + lambda)`` (``lambda`` the
    Newton decrement; the full step once ``lambda < 1/4``) and kept inside
    ``w > 0``. Where no positive root exists (a present task with a zero
    gradient, or a non-negative combination of the gradients that vanishes) the
    weights grow with the iterations, as the references' do.
    """
    gram = jnp.asarray(gram, jnp.float32)
    k = gram.shape[0]
    mask = jnp.ones((k,), bool) if mask is None else mask.astype(bool)
    both = mask[:, None] & mask[None, :]
    m = mask.astype(jnp.float32)
    diag = jnp.where(mask, jnp.diagonal(gram), 1.0)
    scale = jnp.sum(diag * m) / jnp.maximum(jnp.sum(m), 1.0)
    scale = jnp.where(scale > _TINY, scale, 1.0)
    # absent tasks: an identity block, and h' = w^(-1/alpha) has the root w = 1 there
    a = jnp.where(both, gram / scale, jnp.eye(k, dtype=jnp.float32))
    p_exp = -1.0 / alpha
    w0 = jnp.maximum(jnp.diagonal(a), 1e-12) ** (-alpha / (1.0 + alpha))

    def step(_, w):
        h1 = w**p_exp
        g = a @ w - h1
        hess = a + jnp.diag(h1 / (alpha * w))  # d/dw (-w^(-1/alpha)) = (1/alpha) w^(-1/alpha-1)
        p = -jnp.linalg.solve(hess, g)
        lam = jnp.sqrt(jnp.maximum(-(g @ p), 0.0))
        t = jnp.where(lam < 0.25, 1.0, 1.0 / (1.0 + lam))
        ratio = jnp.where(p < 0, -w / jnp.where(p < 0, p, -1.0), jnp.inf)
        t = jnp.minimum(t, 0.99 * jnp.min(ratio))  # stay in w > 0
        w_new = w + t * p
        return jnp.where(jnp.all(jnp.isfinite(w_new)) & jnp.all(w_new > 0), w_new, w)

    w = jax.lax.fori_loop(0, num_iters, step, w0)
    h1 = w**p_exp
    residual = jnp.max(jnp.where(mask, jnp.abs(a @ w - h1) / h1, 0.0))
    w = jnp.where(mask, w * scale ** (-alpha / (1.0 + alpha)), 0.0)
    return w, residual


@dataclasses.dataclass(frozen=True)
class FairGrad(GradWeighting):
    """FairGrad (Ban and Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024).

    Reference: torchjd 0.18 ``aggregation.FairGrad`` (the authors' code,
    ``least_squares(A x - x^(-1/alpha), x0 = 1/K, bounds=(0, inf))`` on the Gramian,
    the same as LibMTL's ``FairGrad.py``); default ``alpha = 1.0`` (LibMTL's
    ``FairGrad_alpha``; torchjd has none). The weights are the positive root of
    ``G G^T w = w^(-1/alpha)`` (:func:`alpha_fair_weights`, ``num_iters`` Newton
    steps instead of scipy), applied to the raw gradients. Scale: not normalised,
    as in the reference: ``w`` scales as ``|g|^(-2 alpha/(1+alpha))``, so ``d`` as
    ``|g|^((1-alpha)/(1+alpha))`` (alpha = 1: ``w_k (G d)_k = 1``, ``|d| = sqrt(K)``).
    ``alpha = 0`` gives the reference's uniform ``1/K``. aux: ``residual`` (relative).
    The state is a step counter.
    """

    alpha: float = 1.0
    num_iters: int = FAIR_ITERS
    name: ClassVar[str] = "fairgrad"

    def __post_init__(self):
        super().__post_init__()
        if not self.alpha >= 0:
            raise ConfigError(f"weighting.alpha: must be non-negative, got {self.alpha}")

    def _weights(self, gram, losses, mask, state, key):
        if self.alpha == 0:
            return masked_softmax(jnp.zeros_like(losses), mask), state, {}
        w, residual = alpha_fair_weights(gram, mask, self.alpha, num_iters=self.num_iters)
        return w, state, {"residual": residual}


@dataclasses.dataclass(frozen=True)
class NashMTL(GradWeighting):
    """Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022).

    Reference: torchjd 0.18 ``aggregation.NashMTL`` (the authors' code as a
    weighting of the Jacobian; LibMTL's ``Nash_MTL.py`` is the same solver, its
    clipping applied by ``clip_grad_norm_`` to the shared gradient). Defaults
    ``max_norm=1.0``, ``update_weights_every=1``, ``optim_niter=20`` (the
    reference's sequential convex program; here ``num_iters`` Newton steps).

    The weights are the Nash bargaining solution ``G G^T w = 1 / w``, ``w > 0``
    (:func:`alpha_fair_weights` with alpha = 1: the point the reference's convex
    programs converge to). Scale: then ``|d|^2 = w^T G G^T w = K``, and, as in the
    reference, ``w`` is multiplied by ``max_norm / |d|`` when ``|d| > max_norm``
    (``max_norm=0``: no clipping), so by default ``|d| = 1``.
    ``update_weights_every = n``: the weights are solved on steps 0, n, 2n, ...
    and reused (clipped with the current gradients) in between, as the reference's.

    Absent tasks: weight 0, the problem is the present tasks'; the stored
    weights of an absent task are left as they were. State: ``alpha`` (f32[K],
    the last solved weights, before clipping; the reference's ``prvs_alpha``,
    init 1), ``step``. aux: ``residual`` (relative; 0 on reuse steps), ``norm``.
    """

    max_norm: float = 1.0
    update_weights_every: int = 1
    num_iters: int = FAIR_ITERS
    name: ClassVar[str] = "nashmtl"

    def __post_init__(self):
        super().__post_init__()
        if not self.max_norm >= 0 or self.update_weights_every < 1:
            raise ConfigError("weighting.max_norm must be >= 0 and update_weights_every >= 1, "
                              f"got {self.max_norm}, {self.update_weights_every}")

    def _init_state(self) -> State:
        return {"alpha": jnp.ones((self.num_tasks,), jnp.float32)}

    def _weights(self, gram, losses, mask, state, key):
        solve = state["step"] % self.update_weights_every == 0
        w, residual = alpha_fair_weights(gram, mask, 1.0, num_iters=self.num_iters)
        alpha = jnp.where(solve & mask, w, state["alpha"])
        weights = jnp.where(mask, alpha, 0.0)
        norm = jnp.sqrt(jnp.maximum(weights @ gram @ weights, 0.0))
        if self.max_norm > 0:
            clip = norm > self.max_norm
            weights = jnp.where(clip, weights * self.max_norm / jnp.where(clip, norm, 1.0),
                                weights)
        aux = {"residual": jnp.where(solve, residual, 0.0), "norm": norm}
        return weights, {**state, "alpha": alpha}, aux


@dataclasses.dataclass(frozen=True)
class GradNorm(GradWeighting):
    """GradNorm (Chen et al., ICML 2018).

    Reference: LibMTL ``LibMTL/weighting/GradNorm.py``, default ``alpha=1.5``.
    Learned logits ``theta`` (state, init 1), loss scales ``s = K softmax(theta)``
    (they sum to K: ``d = sum_k s_k g_k`` has the scale of the summed losses).
    In the reference's epoch 0 (``step < steps_per_epoch``; set it to the trainer's
    epoch length, default 100) ``d`` is the plain sum and each task's mean loss
    is recorded as its initial loss ``L_k(0)``. From then on, with ``n_k = |g_k|``
    (from the Gram diagonal):
    ``Gbar = mean_k s_k n_k``, ``r_k = (L_k / L_k(0)) / mean_j (L_j / L_j(0))``,
    ``L_grad(theta) = sum_k |s_k n_k - Gbar r_k^alpha|`` (the second term without
    gradient), the weights are ``s`` (before the update) and ``theta`` takes one
    step of the reference's optimizer on ``d L_grad / d theta``: LibMTL trains it
    with the model's, by default ``Adam(lr=1e-4, weight_decay=1e-5)`` (torch's
    coupled L2): here ``learning_rate``/``weight_decay`` of an optax
    ``add_decayed_weights + adam`` chain, or ``optimizer`` (any optax
    transformation), whose state is ``state["opt_state"]``.

    Absent tasks: weight 0, left out of the softmax, the means and K, not
    recorded into ``L(0)``; their logit does not move (the optimizer's moments
    still decay, as FAMO's). State: ``theta``, ``opt_state``, ``loss_sum``,
    ``loss_count``, ``step``. aux: ``active`` (past epoch 0), ``grad_loss`` (L_grad).
    """

    alpha: float = 1.5
    learning_rate: float = 1e-4
    weight_decay: float = 1e-5
    steps_per_epoch: int = 100
    optimizer: Any = None  # optax.GradientTransformation | None
    name: ClassVar[str] = "gradnorm"

    def __post_init__(self):
        super().__post_init__()
        if self.steps_per_epoch < 1:
            raise ConfigError(f"weighting.steps_per_epoch: must be >= 1, "
                              f"got {self.steps_per_epoch}")
        if self.optimizer is not None and not isinstance(
            self.optimizer, optax.GradientTransformation
        ):
            raise ConfigError(
                f"weighting.optimizer: expected an optax GradientTransformation or None, "
                f"got {type(self.optimizer).__name__}"
            )

    def tx(self) -> optax.GradientTransformation:
        """The optimizer of ``theta``: ``optimizer``, or torch's ``Adam(lr, weight_decay)``."""
        if self.optimizer is not None:
            return self.optimizer
        return optax.chain(optax.add_decayed_weights(self.weight_decay),
                           optax.adam(self.learning_rate))

    def _init_state(self) -> State:
        k = self.num_tasks
        theta = jnp.ones((k,), jnp.float32)
        return {"theta": theta, "opt_state": self.tx().init(theta),
                "loss_sum": jnp.zeros((k,), jnp.float32),
                "loss_count": jnp.zeros((k,), jnp.int32)}

    def _weights(self, gram, losses, mask, state, key):
        active = state["step"] >= self.steps_per_epoch
        kp = num_present(mask)
        n = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
        ratio = losses / _loss_means(state)
        r = ratio / jnp.maximum(jnp.sum(jnp.where(mask, ratio, 0.0)) / jnp.maximum(kp, 1.0),
                                _TINY)
        r = jnp.where(mask, r, 0.0)

        def scales(theta):
            return kp * masked_softmax(theta, mask)

        def grad_loss(theta):
            gper = scales(theta) * n
            gbar = jnp.sum(jnp.where(mask, gper, 0.0)) / jnp.maximum(kp, 1.0)
            const = jax.lax.stop_gradient(gbar * r**self.alpha)
            return jnp.sum(jnp.where(mask, jnp.abs(gper - const), 0.0))

        theta = state["theta"]
        value, g = jax.value_and_grad(grad_loss)(theta)
        tx = self.tx()
        updates, opt_state = tx.update(g, state["opt_state"], theta)
        new_theta = jnp.where(mask, optax.apply_updates(theta, updates), theta)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(active, a, b), new, old)
        new_state = {
            **_loss_mean_of_first_epochs(state, losses, mask, ~active),
            "theta": keep(new_theta, theta),
            "opt_state": keep(opt_state, state["opt_state"]),
        }
        weights = jnp.where(active, scales(theta), mask.astype(jnp.float32))
        return weights, new_state, {"active": active, "grad_loss": value}


@dataclasses.dataclass(frozen=True)
class DBMTL(GradWeighting):
    """Dual-Balancing Multi-Task Learning (Lin et al., "Dual-Balancing for Multi-Task
    Learning", 2023; arXiv:2308.12029).

    Reference: LibMTL ``LibMTL/weighting/DB_MTL.py``, defaults ``DB_beta=0.9``,
    ``DB_beta_sigma=0``. Loss-scale balancing: each task's gradient is that of
    ``log(L_k + 1e-8)``, i.e. ``g_k / (L_k + 1e-8)``. Gradient-magnitude balancing:
    an EMA buffer of those gradients, ``b_k <- h_k + beta_t (b_k - h_k)`` with
    ``beta_t = beta / t^beta_sigma`` (``t`` = 1, 2, ...: the step, from 1; the buffer
    starts at 0 with no bias correction, as the reference), and
    ``d = sum_k (max_j |b_j| / (|b_k| + 1e-8)) b_k``: every buffer rescaled to the
    largest norm. Scale: ``d`` is about K times the largest buffer's norm.

    This is the one method whose direction is not a combination of this step's
    gradients: :func:`~mtop_jax.weighting.grads.combine_grad_tree` calls
    :meth:`transform_grads` first, which replaces the shared gradients by the
    updated buffers (whose Gram matrix then gives the weights) and the
    task-specific ones (heads) by their log-loss gradients, as the reference's
    backward of the log-losses leaves them. The buffers are the state
    (``state["buffer"]``: a tuple of f32 ``[K, ...]`` arrays, one per shared leaf:
    K times the shared parameters' size), so :meth:`init` needs ``grads_like``,
    the shared parameters (or any arrays of their shapes) in the order of the
    gradient tree's shared leaves.

    Absent tasks: weight 0, their buffer is left as it was, the maximum runs over
    the present tasks. aux: ``buffer_norms``.
    """

    beta: float = 0.9
    beta_sigma: float = 0.0
    name: ClassVar[str] = "dbmtl"
    #: ``init`` needs the shared gradients' shapes, ``combine_grad_tree`` calls ``transform_grads``
    needs_grad_buffer: ClassVar[bool] = True

    def init(self, num_tasks: int | None = None, grads_like: Any = None) -> State:
        """The initial state: zero buffers shaped ``[K, *leaf.shape]`` for each leaf of
        ``grads_like`` (the shared parameters, a list of them or of their shapes)."""
        if grads_like is None:
            raise ConfigError("weighting 'dbmtl': init() needs grads_like, the shared "
                              "parameters (its state is a buffer of their gradients)")
        state = super().init(num_tasks)
        leaves = jax.tree.leaves(grads_like, is_leaf=lambda x: isinstance(x, tuple) and all(
            isinstance(n, int) for n in x))
        shapes = [tuple(x) if isinstance(x, tuple) else tuple(jnp.shape(x)) for x in leaves]
        state["buffer"] = tuple(jnp.zeros((self.num_tasks, *s), jnp.float32) for s in shapes)
        return state

    def transform_grads(
        self,
        leaves: list[jax.Array],
        flags: list[bool],
        losses: jax.Array,
        mask: jax.Array,
        state: State,
    ) -> tuple[list[jax.Array], State]:
        """Shared leaves -> the updated EMA buffers, the others -> log-loss gradients."""
        buffers = state["buffer"]
        if len(buffers) != sum(flags):
            raise ConfigError(f"weighting 'dbmtl': {len(buffers)} buffers for "
                              f"{sum(flags)} shared gradient leaves")
        losses = jax.lax.stop_gradient(jnp.where(mask, losses, 1.0)).astype(jnp.float32)
        inv = jnp.where(mask, 1.0 / (losses + 1e-8), 0.0)
        t = (state["step"] + 1).astype(jnp.float32)
        beta_t = self.beta / t**self.beta_sigma
        out, new_buffers = [], []
        it = iter(buffers)
        for x, shared in zip(leaves, flags, strict=True):
            rows = (-1,) + (1,) * (x.ndim - 1)
            h = x.astype(jnp.float32) * inv.reshape(rows)
            if shared:
                b = next(it)
                b = jnp.where(mask.reshape(rows), h + beta_t * (b - h), b)
                new_buffers.append(b)
                out.append(jnp.where(mask.reshape(rows), b, 0.0))
            else:
                out.append(h)
        return out, {**state, "buffer": tuple(new_buffers)}

    def _weights(self, gram, losses, mask, state, key):
        n = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
        top = jnp.max(jnp.where(mask, n, 0.0))
        return jnp.where(mask, top / (n + 1e-8), 0.0), state, {"buffer_norms": n}

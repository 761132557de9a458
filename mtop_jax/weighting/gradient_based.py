"""Weightings that combine per-task gradients: PCGrad, MGDA, CAGrad, GetMTL.

Each method maps the Gram matrix ``M = G G^T`` of the per-task gradients (rows
of absent tasks zeroed) and the losses to coefficients ``weights: f32[K]`` with
the update direction ``d = sum_k weights_k g_k`` (see
:class:`~mtop_jax.weighting.base.GradWeighting`). Only the present tasks take
part: ``K`` below is their number, the means run over them, the simplex is
theirs, and absent tasks get weight 0.

Scale of ``d`` (kept as in each method's reference code): PCGrad sums the
projected gradients (the paper's), MGDA returns the min-norm point itself (a
convex combination, the scale of one task's gradient), CAGrad and GetMTL
multiply by K "to match the sum loss" as the authors' code does.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from mtop_jax.errors import ConfigError
from mtop_jax.weighting.base import (
    GradWeighting,
    State,
    masked_softmax,
    num_present,
    task_orders,
    uniform_over,
)
from mtop_jax.weighting.min_norm import DEFAULT_ITERS, cagrad_simplex, min_norm_simplex

#: Gradient normalisations for the min-norm problems (Sener and Koltun's code):
#: ``g_k / n_k`` with n_k = 1, L_k, |g_k| or L_k |g_k|.
NORMALIZATIONS = ("none", "loss", "l2", "loss+")


def gradient_scales(
    gram: jax.Array, losses: jax.Array, mask: jax.Array, normalization: str
) -> jax.Array:
    """The ``n_k`` by which task k's gradient is divided before a min-norm solve.

    ``"none"``: 1; ``"loss"``: L_k; ``"l2"``: |g_k|; ``"loss+"``: L_k |g_k|. A
    non-positive scale (zero loss or gradient, absent task) is replaced by 1.
    """
    if normalization == "none":
        n = jnp.ones_like(losses)
    elif normalization == "loss":
        n = losses
    elif normalization == "l2":
        n = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
    elif normalization == "loss+":
        n = losses * jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
    else:
        raise ConfigError(f"weighting.normalization: expected one of {NORMALIZATIONS}, "
                          f"got {normalization!r}")
    return jnp.where(mask & (n > 1e-20), n, 1.0)


def _check_normalization(normalization: str) -> None:
    if normalization not in NORMALIZATIONS:
        raise ConfigError(f"weighting.normalization: expected one of {NORMALIZATIONS}, "
                          f"got {normalization!r}")


def _rescaled_gram(gram: jax.Array, n: jax.Array) -> jax.Array:
    """Gram matrix of ``g_k / n_k``."""
    return gram / (n[:, None] * n[None, :])


@dataclasses.dataclass(frozen=True)
class PCGrad(GradWeighting):
    """Projecting Conflicting Gradients (Yu et al., NeurIPS 2020, Algorithm 1).

    For each task i, ``pc_i`` starts at ``g_i`` and, for each other present task j
    in a random order, if ``pc_i . g_j < 0`` it is replaced by its projection on
    the normal plane of ``g_j``: ``pc_i -= (pc_i . g_j) / |g_j|^2 g_j``. Then
    ``d = sum_i pc_i`` (the paper's sum, not a mean).

    Each ``pc_i`` is tracked as a row of coefficients on the original gradients,
    so the projections run on the Gram matrix (a ``lax.scan`` over the K positions
    of the orders) and ``d = weights . G`` exactly. ``key``: each task gets its own
    permutation drawn from ``key`` (the same key, the same orders); ``key=None``
    uses the order 0..K-1 for every task. ``aux["conflicts"]``: projections made.
    """

    name: ClassVar[str] = "pcgrad"
    uses_key: ClassVar[bool] = True

    def _weights(self, gram, losses, mask, state, key):
        k = self.num_tasks
        orders = task_orders(key, k)
        rows = jnp.arange(k)
        sq = jnp.diagonal(gram)

        def project(coef, t):
            j = orders[:, t]  # task i projects against task j[i] at this position
            dots = jnp.sum(coef * gram[j], axis=1)  # pc_i . g_j
            conflict = (dots < 0) & (j != rows) & mask & mask[j] & (sq[j] > 0)
            c = jnp.where(conflict, dots / jnp.where(sq[j] > 0, sq[j], 1.0), 0.0)
            coef = coef - c[:, None] * jax.nn.one_hot(j, k, dtype=coef.dtype)
            return coef, jnp.sum(conflict.astype(jnp.int32))

        coef0 = jnp.diag(mask.astype(jnp.float32))
        coef, conflicts = jax.lax.scan(project, coef0, jnp.arange(k))
        weights = jnp.sum(jnp.where(mask[:, None], coef, 0.0), axis=0)
        return weights, state, {"conflicts": jnp.sum(conflicts)}


@dataclasses.dataclass(frozen=True)
class MGDA(GradWeighting):
    """Multiple-gradient descent (Sener and Koltun, NeurIPS 2018): the min-norm point.

    ``w = argmin_{w in simplex} |sum_k w_k g_k / n_k|^2`` (``normalization``: see
    :func:`gradient_scales`, default ``"none"``), solved in jnp by pairwise
    Frank-Wolfe (:func:`~mtop_jax.weighting.min_norm.min_norm_simplex`, ``num_iters``
    steps); the weights are then applied to the *raw* gradients,
    ``d = sum_k w_k g_k``, as the authors' code applies them to the raw losses.
    For two tasks this is the closed form
    ``w_1 = clip((g_2 - g_1).g_2 / |g_1 - g_2|^2, 0, 1)``.
    ``aux["min_norm"]``: ``|sum_k w_k g_k / n_k|``.
    """

    normalization: str = "none"
    num_iters: int = DEFAULT_ITERS
    name: ClassVar[str] = "mgda"

    def __post_init__(self):
        super().__post_init__()
        _check_normalization(self.normalization)

    def _weights(self, gram, losses, mask, state, key):
        n = gradient_scales(gram, losses, mask, self.normalization)
        w, norm_sq = min_norm_simplex(_rescaled_gram(gram, n), mask, num_iters=self.num_iters)
        return w, state, {"min_norm": jnp.sqrt(norm_sq)}


@dataclasses.dataclass(frozen=True)
class CAGrad(GradWeighting):
    """Conflict-Averse Gradient descent (Liu et al., NeurIPS 2021), ``c = 0.4``.

    ``g0`` = mean present gradient, ``sqrt(phi) = c |g0|``;
    ``w = argmin_{w in simplex} g_w . g0 + sqrt(phi) |g_w|`` (``g_w = G^T w``), solved
    in jnp by pairwise Frank-Wolfe with an exact line search
    (:func:`~mtop_jax.weighting.min_norm.cagrad_simplex`) instead of the authors'
    scipy SLSQP; then, as in the authors' code,
    ``d = (g0 + sqrt(phi) / |g_w| g_w) / (1 + c^2) * K`` (``rescale=1``; 0: no
    division, 2: divide by ``1 + c``), with their ``1e-8`` guards.
    """

    c: float = 0.4
    rescale: int = 1
    num_iters: int = DEFAULT_ITERS
    name: ClassVar[str] = "cagrad"

    def __post_init__(self):
        super().__post_init__()
        if not self.c >= 0:
            raise ConfigError(f"weighting.c: must be non-negative, got {self.c}")
        if self.rescale not in (0, 1, 2):
            raise ConfigError(f"weighting.rescale: expected 0, 1 or 2, got {self.rescale}")

    def _weights(self, gram, losses, mask, state, key):
        b = uniform_over(mask)
        w = cagrad_simplex(gram, mask, self.c, num_iters=self.num_iters)
        g0_norm = jnp.sqrt(jnp.maximum(b @ gram @ b, 0.0) + 1e-8)
        sqrt_phi = self.c * g0_norm + 1e-8
        gw_norm = jnp.sqrt(jnp.maximum(w @ gram @ w, 0.0))
        lam = sqrt_phi / (gw_norm + 1e-8)
        div = {0: 1.0, 1: 1.0 + self.c**2, 2: 1.0 + self.c}[self.rescale]
        weights = (b + lam * w) / div * num_present(mask)
        return weights, state, {"w": w, "g0_norm": g0_norm, "gw_norm": gw_norm}


@dataclasses.dataclass(frozen=True)
class GetMTL(GradWeighting):
    """GetMTL (Chai et al., ACL 2023), as the authors' public code computes it.

    With ``G`` the present tasks' gradients, ``g0`` their mean and ``alpha = 0.15``:

    - ``w`` = min-norm simplex weights of ``G`` (MGDA; the authors minimise
      ``|g_w| ((alpha|g0|^2 + 1)^2 / (2 alpha rho) - alpha / 2)``, which has the same
      minimiser whenever ``rho > 0``);
    - ``s`` = min-norm simplex weights of the loss-normalised gradients ``g_k / L_k``
      (``normalization``, default ``"loss"``, see :func:`gradient_scales`);
    - ``w_hat = softmax(w * s)``, ``gw = G^T w_hat``;
    - ``lambda = (|gw| + 1e-8) / (alpha |g0|^2 + 1e-8)``, ``rho = 1 - alpha^2 |g0|^2``;
    - ``d = (g0 + lambda gw) / rho / (1 + alpha^2) * K``.

    ``|g0|`` is ``sqrt(|g0|^2 + 1e-8)`` as in the code. If ``rho <= 0`` (``|g0| >=
    1/alpha``) the formula is meaningless; ``d`` falls back to ``K g0`` (the
    gradient of the plain sum of losses) and ``state["fallbacks"]`` counts it.
    aux: ``rho``, ``lambda``, ``fallback``, ``w``, ``s``, ``w_hat``.
    """

    alpha: float = 0.15
    normalization: str = "loss"
    num_iters: int = DEFAULT_ITERS
    name: ClassVar[str] = "getmtl"

    def __post_init__(self):
        super().__post_init__()
        if not self.alpha > 0:
            raise ConfigError(f"weighting.alpha: must be positive, got {self.alpha}")
        _check_normalization(self.normalization)

    def _init_state(self) -> State:
        return {"fallbacks": jnp.zeros((), jnp.int32)}

    def _weights(self, gram, losses, mask, state, key):
        kp = num_present(mask)
        b = uniform_over(mask)
        a = self.alpha
        w, _ = min_norm_simplex(gram, mask, num_iters=self.num_iters)
        n = gradient_scales(gram, losses, mask, self.normalization)
        s, _ = min_norm_simplex(_rescaled_gram(gram, n), mask, num_iters=self.num_iters)
        w_hat = masked_softmax(w * s, mask)
        g0_sq = jnp.maximum(b @ gram @ b, 0.0) + 1e-8  # |g0|^2, with the code's guard
        gw_norm = jnp.sqrt(jnp.maximum(w_hat @ gram @ w_hat, 0.0))
        lam = (gw_norm + 1e-8) / (a * g0_sq + 1e-8)
        rho = 1.0 - a * a * g0_sq
        fallback = (rho <= 0) & (kp > 0)
        safe_rho = jnp.where(rho > 0, rho, 1.0)
        weights = (b + lam * w_hat) / safe_rho / (1.0 + a * a) * kp
        weights = jnp.where(fallback, mask.astype(jnp.float32), weights)
        new_state = {**state, "fallbacks": state["fallbacks"] + fallback.astype(jnp.int32)}
        aux = {"rho": rho, "lambda": lam, "fallback": fallback, "w": w, "s": s, "w_hat": w_hat}
        return weights, new_state, aux

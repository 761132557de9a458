"""Gradient aggregators ported from torchjd 0.18: UPGrad, DualProj, IMTL-G, Aligned-MTL,
ConFIG, GradVac and GradDrop.

Each class computes what ``torchjd.aggregation.<Name>()`` (default arguments) computes
on the Jacobian ``J = G: [K, D]`` of the present tasks, and is tested against it
(``tests/reference/weighting_torchjd.npz``). All but GradDrop are linear
combinations ``d = sum_k weights_k g_k`` with weights from the Gram matrix, as in
torchjd's ``GramianWeightedAggregator`` (ConFIG, a plain ``Aggregator`` there, is
rewritten on the Gram matrix here); GradDrop acts coordinate by coordinate and
overrides :meth:`~mtop_jax.weighting.base.GradWeighting.combine_shared`.

The solvers torchjd runs on the host (quadprog, ``torch.linalg.pinv``/``eigh``) are jnp
here: a fixed-step active-set + coordinate-descent solver for the dual-cone QP
(:mod:`mtop_jax.weighting.dual_cone`) and ``jnp.linalg.eigh`` for the
pseudo-inverses, all in float32 (torchjd follows its input's dtype).

Absent tasks: the result is torchjd's on the present rows alone (a preference
vector's default, the mean ``1/K``, becomes ``1/K_present``), absent tasks get weight
0 and GradVac's targets for pairs with an absent task are not updated.
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
    as_mask,
    check_losses,
    task_orders,
    uniform_over,
)
from mtop_jax.weighting.dual_cone import (
    CD_SWEEPS,
    F32_EPS,
    NEWTON_ITERS,
    NORM_EPS,
    REG_EPS,
    pinv_psd,
    project_dual_cone,
)

ALIGNED_SCALE_MODES = ("min", "median", "rmse")


def _check_vector(value, num_tasks: int, what: str, low: float | None = None,
                  high: float | None = None) -> tuple[float, ...] | None:
    """``value`` as a tuple of K floats (or None), checked against ``[low, high]``."""
    if value is None:
        return None
    try:
        v = tuple(float(x) for x in value)
    except TypeError:
        v = ()
    bad = len(v) != num_tasks or (low is not None and min(v) < low) or (
        high is not None and max(v) > high)
    if bad:
        bounds = f" in [{low}, {high}]" if low is not None else ""
        raise ConfigError(f"weighting.{what}: expected {num_tasks} numbers{bounds}, "
                          f"got {value!r}")
    return v


def _pref(pref_vector: tuple[float, ...] | None, mask: jax.Array, default: str) -> jax.Array:
    """The preference vector on the present tasks (0 elsewhere): given, or the default
    ``"mean"`` (``1/K_present``, torchjd's ``MeanWeighting``) or ``"sum"`` (1)."""
    if pref_vector is not None:
        return jnp.where(mask, jnp.asarray(pref_vector, jnp.float32), 0.0)
    return uniform_over(mask) if default == "mean" else mask.astype(jnp.float32)


def _check_pref(method: GradWeighting) -> None:
    """Store ``method.pref_vector`` as a tuple of K floats (or None)."""
    object.__setattr__(method, "pref_vector",
                       _check_vector(method.pref_vector, method.num_tasks, "pref_vector"))


@dataclasses.dataclass(frozen=True)
class _DualConeMethod(GradWeighting):
    """What UPGrad and DualProj share: a preference vector and torchjd's dual QP."""

    pref_vector: tuple[float, ...] | None = None
    norm_eps: float = NORM_EPS
    reg_eps: float = REG_EPS
    newton_iters: int = NEWTON_ITERS
    cd_sweeps: int = CD_SWEEPS

    def __post_init__(self):
        super().__post_init__()
        _check_pref(self)
        if self.norm_eps < 0 or self.reg_eps <= 0:
            raise ConfigError("weighting.norm_eps/reg_eps: need norm_eps >= 0 and reg_eps > 0, "
                              f"got {self.norm_eps}, {self.reg_eps}")

    def _project(self, gram: jax.Array, u: jax.Array, mask: jax.Array):
        """Projection weights of ``u`` (``[K]`` or ``[K, K]``) and the solver's residual."""
        return project_dual_cone(gram, u, mask, norm_eps=self.norm_eps, reg_eps=self.reg_eps,
                                 newton_iters=self.newton_iters, cd_sweeps=self.cd_sweeps)


@dataclasses.dataclass(frozen=True)
class UPGrad(_DualConeMethod):
    """Unconflicting projection of gradients (Quinton and Rey 2024, "Jacobian Descent
    for Multi-Objective Optimization", arXiv:2406.16232); torchjd ``aggregation/_upgrad.py``.

    Each ``u_i g_i`` (``u = pref_vector``, default the mean ``1/K``) is projected onto
    the dual cone ``{x : g_k . x >= 0 for all k}`` and the projections are summed:
    ``d = sum_i pi(u_i g_i)``, i.e. the *mean* of the projected gradients by default
    (the scale of one task's gradient). The projection weights solve torchjd's dual
    QP ``min_{v >= u_i e_i} v^T M v`` on ``M = gram / trace + reg_eps I`` (``M = reg_eps
    I`` when ``trace < norm_eps``: the update is then the plain mean), defaults
    ``norm_eps = reg_eps = 1e-4``, with the fixed-step solver of
    :func:`~mtop_jax.weighting.dual_cone.project_dual_cone` (``newton_iters``,
    ``cd_sweeps``). ``aux["qp_residual"]``: the solver's LCP residual.
    """

    name: ClassVar[str] = "upgrad"

    def _weights(self, gram, losses, mask, state, key):
        u = jnp.diag(_pref(self.pref_vector, mask, "mean"))
        v, res = self._project(gram, u, mask)
        return jnp.sum(v, axis=0), state, {"qp_residual": res}


@dataclasses.dataclass(frozen=True)
class DualProj(_DualConeMethod):
    """Projection of the mean gradient onto the dual cone (GEM, Lopez-Paz and Ranzato,
    NeurIPS 2017, eq. 11; as generalised in Quinton and Rey 2024); torchjd
    ``aggregation/_dualproj.py``.

    ``d = pi(sum_k u_k g_k)`` with ``u = pref_vector`` (default the mean ``1/K``: the
    scale of one task's gradient), the projection weights from the same dual QP and
    defaults as :class:`UPGrad` (``norm_eps = reg_eps = 1e-4``).
    ``aux["qp_residual"]``: the solver's LCP residual.
    """

    name: ClassVar[str] = "dualproj"

    def _weights(self, gram, losses, mask, state, key):
        u = _pref(self.pref_vector, mask, "mean")
        v, res = self._project(gram, u, mask)
        return v, state, {"qp_residual": res}


@dataclasses.dataclass(frozen=True)
class IMTLG(GradWeighting):
    """IMTL-G (Liu et al., ICLR 2021, "Towards Impartial Multi-task Learning"), in the
    form of Quinton and Rey 2024 that allows linearly dependent gradients; torchjd
    ``aggregation/_imtl_g.py``.

    ``v = pinv(gram) diag(gram)^(1/2)``, ``weights = v / sum(v)`` (0 if
    ``|sum(v)| < 1e-12``): the direction with equal projections on every unit
    gradient, weights summing to 1 (the scale of one task's gradient). The
    pseudo-inverse drops eigenvalues below ``K eps(float32)`` times the largest, as
    ``torch.linalg.pinv`` does in float32. No hyper-parameters.
    """

    name: ClassVar[str] = "imtlg"

    def _weights(self, gram, losses, mask, state, key):
        d = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
        v = pinv_psd(gram, mask) @ d
        s = jnp.sum(v)
        weights = jnp.where(jnp.abs(s) < 1e-12, 0.0, v / jnp.where(s == 0, 1.0, s))
        return weights, state, {}


@dataclasses.dataclass(frozen=True)
class AlignedMTL(GradWeighting):
    """Aligned-MTL (Senushkin et al., CVPR 2023, "Independent Component Alignment for
    Multi-Task Learning", Algorithm 1); torchjd ``aggregation/_aligned_mtl.py``
    (adapted from SamsungLabs/MTL).

    With ``gram = V diag(lambda) V^T`` restricted to the eigenvalues above
    ``max(lambda) K eps`` (eps of float32), ``B = sqrt(s) V diag(lambda)^(-1/2) V^T``
    and ``weights = B u`` (``u = pref_vector``, default the mean ``1/K``): the
    gradients' components are made orthogonal with equal norms ``sqrt(s)``.
    ``scale_mode`` picks ``s``: ``"min"`` (default) the smallest kept eigenvalue,
    ``"median"`` the lower median, ``"rmse"`` the mean (the original code's). With no
    eigenvalue kept (all gradients 0), ``weights = u``. Scale: with the default ``u``
    the mean of the aligned gradients, each of norm ``sqrt(s)``.
    """

    pref_vector: tuple[float, ...] | None = None
    scale_mode: str = "min"
    name: ClassVar[str] = "alignedmtl"

    def __post_init__(self):
        super().__post_init__()
        _check_pref(self)
        if self.scale_mode not in ALIGNED_SCALE_MODES:
            raise ConfigError(f"weighting.scale_mode: expected one of {ALIGNED_SCALE_MODES}, "
                              f"got {self.scale_mode!r}")

    def _weights(self, gram, losses, mask, state, key):
        k = self.num_tasks
        u = _pref(self.pref_vector, mask, "mean")
        g = 0.5 * (gram + gram.T)
        lam, vec = jnp.linalg.eigh(g)  # ascending; absent tasks only add zero eigenvalues
        kp = jnp.sum(mask.astype(jnp.float32))
        tol = jnp.max(lam) * kp * F32_EPS
        keep = lam > tol  # a suffix of the ascending order
        rank = jnp.sum(keep.astype(jnp.int32))
        first = k - rank  # index of the smallest kept eigenvalue
        if self.scale_mode == "min":
            scale = lam[jnp.minimum(first, k - 1)]
        elif self.scale_mode == "median":  # torch.median: the lower of the two middle values
            scale = lam[jnp.minimum(first + (rank - 1) // 2, k - 1)]
        else:
            scale = jnp.sum(jnp.where(keep, lam, 0.0)) / jnp.maximum(rank, 1)
        inv_sqrt = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, lam, 1.0)), 0.0)
        b = jnp.sqrt(jnp.maximum(scale, 0.0)) * (vec * inv_sqrt) @ vec.T
        weights = jnp.where(rank > 0, b @ u, u)
        return weights, state, {"rank": rank}


@dataclasses.dataclass(frozen=True)
class ConFIG(GradWeighting):
    """ConFIG, conflict-free training (Liu et al., ICLR 2025, arXiv:2408.11104, eq. 2);
    torchjd ``aggregation/_config.py`` (adapted from tum-pbs/ConFIG).

    With unit gradients ``e_k = g_k / |g_k|`` (0 for a zero gradient), the direction
    ``x = pinv([e_1 .. e_K]^T) w`` (``w = pref_vector``, default all 1) has equal
    projections on every ``e_k``; ``d = (sum_k g_k . x_hat) x_hat`` with ``x_hat =
    x / max(|x|, 1e-12)``: the scale of the *sum* of the gradients' projections.
    Here ``x = sum_k c_k e_k`` with ``c = pinv(E E^T) w`` on the unit Gram matrix,
    which drops eigenvalues below ``rcond`` times the largest (default 1e-6, i.e.
    singular values below 1e-3 of the largest; torch's ``pinv`` on the ``[K, D]``
    matrix uses ``max(K, D) eps``, which in float32 is below the Gram matrix's
    rounding for small D and grows with D).
    """

    pref_vector: tuple[float, ...] | None = None
    rcond: float = 1e-6
    name: ClassVar[str] = "conflictfree"

    def __post_init__(self):
        super().__post_init__()
        _check_pref(self)
        if not 0 <= self.rcond < 1:
            raise ConfigError(f"weighting.rcond: expected a number in [0, 1), got {self.rcond}")

    def _weights(self, gram, losses, mask, state, key):
        w = _pref(self.pref_vector, mask, "sum")
        norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
        nonzero = mask & (norms > 0)
        inv_n = jnp.where(nonzero, 1.0 / jnp.where(nonzero, norms, 1.0), 0.0)
        units = gram * inv_n[:, None] * inv_n[None, :]
        c = pinv_psd(units, nonzero, self.rcond) @ w
        x_norm = jnp.sqrt(jnp.maximum(c @ units @ c, 0.0))
        coef = c * inv_n / jnp.maximum(x_norm, 1e-12)  # x_hat = sum_k coef_k g_k
        length = jnp.sum(jnp.where(mask, gram @ coef, 0.0))
        return length * coef, state, {"length": length}


@dataclasses.dataclass(frozen=True)
class GradVac(GradWeighting):
    """Gradient Vaccine (Wang et al., ICLR 2021, arXiv:2010.05874); torchjd
    ``aggregation/_gradvac.py``, which works on the Gram matrix as here.

    For each task i, ``g_i'`` starts at ``g_i``; for each other present task j in a
    random order, with ``phi = cos(g_i', g_j)`` and the target ``phi_hat =
    state["phi"][i, j]``: if ``phi < phi_hat``, ``g_i' += |g_i'| (phi_hat sqrt(1 -
    phi^2) - phi sqrt(1 - phi_hat^2)) / (|g_j| sqrt(1 - phi_hat^2) + eps) g_j``; then
    ``phi_hat <- (1 - beta) phi_hat + beta phi``. ``d = sum_i g_i'`` (a sum).
    Defaults ``beta = 0.5``, ``eps = 1e-8``; the targets start at 0. ``key`` draws
    each task's order (``None``: ascending); torchjd uses ``torch.randperm``.
    Absent tasks: no pair with one is visited, its targets stay as they were.
    ``aux["corrections"]``: corrections made.
    """

    beta: float = 0.5
    eps: float = 1e-8
    name: ClassVar[str] = "gradvac"
    uses_key: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.beta <= 1.0 or self.eps < 0:
            raise ConfigError(f"weighting.beta/eps: need beta in [0, 1] and eps >= 0, "
                              f"got {self.beta}, {self.eps}")

    def _init_state(self) -> State:
        return {"phi": jnp.zeros((self.num_tasks, self.num_tasks), jnp.float32)}

    def _weights(self, gram, losses, mask, state, key):
        k = self.num_tasks
        orders = task_orders(key, k)
        beta, eps = self.beta, self.eps
        norm_j = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))

        def row(i, order, phi_row):
            c = jax.nn.one_hot(i, k, dtype=jnp.float32) * mask[i]

            def visit(carry, j):
                c, cg, phi_row, n = carry
                valid = (j != i) & mask[i] & mask[j]
                norm_i = jnp.sqrt(jnp.maximum(cg @ c, 0.0))
                phi = cg[j] / (norm_i * norm_j[j] + eps)
                hat = phi_row[j]
                fix = valid & (phi < hat)
                s_phi = jnp.sqrt(jnp.maximum(1.0 - phi * phi, 0.0))
                s_hat = jnp.sqrt(jnp.maximum(1.0 - hat * hat, 0.0))
                w = norm_i * (hat * s_phi - phi * s_hat) / (norm_j[j] * s_hat + eps)
                w = jnp.where(fix, w, 0.0)
                c = c.at[j].add(w)
                cg = cg + w * gram[j]
                phi_row = phi_row.at[j].set(jnp.where(valid, (1 - beta) * hat + beta * phi, hat))
                return (c, cg, phi_row, n + fix.astype(jnp.int32)), None

            init = (c, c @ gram, phi_row, jnp.zeros((), jnp.int32))
            (c, _, phi_row, n), _ = jax.lax.scan(visit, init, order)
            return c, phi_row, n

        coef, phi, n = jax.vmap(row)(jnp.arange(k), orders, state["phi"])
        weights = jnp.sum(coef, axis=0)
        return weights, {**state, "phi": phi}, {"corrections": jnp.sum(n)}


def graddrop_direction(g: jax.Array, u: jax.Array, leak: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
    """GradDrop on one stacked leaf ``g: [K, ...]`` with uniforms ``u`` (``g``'s shape
    without the K axis) and ``leak: f32[K]``: ``(d, kept)``, ``kept_k`` the squared norm
    of task k's surviving part weighted by its coefficient, ``sum coef_k g_k^2``."""
    g = g.astype(jnp.float32)
    total, absolute = jnp.sum(g, axis=0), jnp.sum(jnp.abs(g), axis=0)
    # torchjd divides 0 by 0 where every gradient is 0; those coordinates contribute 0 anyway
    purity = 0.5 * (1.0 + total / jnp.where(absolute > 0, absolute, 1.0))
    keep = ((purity > u) & (g > 0)) | ((purity < u) & (g < 0))
    lk = leak.reshape((-1,) + (1,) * (g.ndim - 1))
    coef = lk + (1.0 - lk) * keep.astype(jnp.float32)
    axes = tuple(range(1, g.ndim))
    return jnp.sum(coef * g, axis=0), jnp.sum(coef * g * g, axis=axes)


@dataclasses.dataclass(frozen=True)
class GradDrop(GradWeighting):
    """Gradient sign dropout (Chen et al., NeurIPS 2020, "Just Pick a Sign", Algorithm 1
    lines 10-15); torchjd ``aggregation/_graddrop.py``.

    Per coordinate, the positive sign purity ``P = (1 + sum_k g_k / sum_k |g_k|) / 2``
    and a uniform ``U``: if ``P > U`` only the positive entries are kept, if ``P < U``
    only the negative ones; ``d = sum_k (leak_k + (1 - leak_k) keep_k) g_k`` (a sum).
    ``leak``: one number in [0, 1] per task, default all 0 (torchjd's ``None``); the
    purity transform ``f`` is the identity (torchjd's default; no other is offered).
    ``U`` is drawn from ``key`` (one ``fold_in`` per leaf; ``None``: a fixed key 0).
    Not a linear combination of the gradients, so it overrides ``combine_shared`` and
    ``aux["weights"]`` is the part of each task's squared gradient norm that survives,
    ``sum coef_k g_k^2 / |g_k|^2`` (0 for absent or zero gradients). Absent tasks'
    rows are zero, so ``P`` is that of the present tasks.
    """

    leak: tuple[float, ...] | None = None
    name: ClassVar[str] = "graddrop"
    uses_key: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "leak", _check_vector(self.leak, self.num_tasks, "leak",
                                                       0.0, 1.0))

    def combine_shared(self, leaves, losses, present, state, key=None):
        """Coordinate-wise sign dropout on the stacked leaves (absent rows already zero)."""
        k = self.num_tasks
        check_losses(losses, k)
        mask = as_mask(present, k)
        key = jax.random.key(0) if key is None else key
        leak = jnp.zeros((k,), jnp.float32) if self.leak is None else jnp.asarray(
            self.leak, jnp.float32)
        out = []
        kept = jnp.zeros((k,), jnp.float32)
        sq = jnp.zeros((k,), jnp.float32)
        for idx, x in enumerate(leaves):
            x = jnp.where(mask.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros_like(x))
            u = jax.random.uniform(jax.random.fold_in(key, idx), x.shape[1:], jnp.float32)
            d, kept_x = graddrop_direction(x, u, leak)
            out.append(d.astype(x.dtype))
            kept = kept + kept_x
            sq = sq + jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(k, -1), axis=1)
        weights = jnp.where(mask & (sq > 0), kept / jnp.where(sq > 0, sq, 1.0), 0.0)
        return out, {**state, "step": state["step"] + 1}, {"weights": weights}

    def _weights(self, gram, losses, mask, state, key):
        raise ConfigError("weighting 'graddrop' acts coordinate by coordinate: it has no "
                          "weights from the Gram matrix; use combine_shared/combine_grad_tree")

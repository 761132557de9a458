"""Linear algebra on the K x K Gram matrix for the Jacobian-descent methods, in jnp.

- :func:`project_dual_cone`: the weights of the projection of ``G^T u`` onto the dual
  cone ``{x : G x >= 0}`` of the gradients (UPGrad, DualProj). torchjd hands this
  quadratic program to quadprog on the host; here it is solved inside ``jax.jit``
  with a fixed number of steps.
- :func:`pinv_psd`: the pseudo-inverse of a symmetric PSD matrix (IMTL-G, ConFIG).

Every function takes a ``mask: bool[K]`` of present tasks and acts as if the absent
rows and columns were not there (their outputs are 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

#: quadprog projector defaults of torchjd 0.18 (``torchjd._linalg.QuadprogProjector``)
NORM_EPS = 1e-4
REG_EPS = 1e-4
#: fixed solver budget: primal-dual active-set (Newton) steps, then coordinate-descent sweeps
NEWTON_ITERS = 20
CD_SWEEPS = 50
F32_EPS = float(jnp.finfo(jnp.float32).eps)


def _masked(gram: jax.Array, mask: jax.Array) -> jax.Array:
    gram = jnp.asarray(gram, jnp.float32)
    gram = 0.5 * (gram + gram.T)
    return jnp.where(mask[:, None] & mask[None, :], gram, 0.0)


def dual_cone_gram(
    gram: jax.Array, mask: jax.Array, norm_eps: float = NORM_EPS, reg_eps: float = REG_EPS
) -> jax.Array:
    """torchjd's ``regularize(normalize(gram, norm_eps), reg_eps)`` on the present block.

    ``gram / trace`` (all 0 when ``trace < norm_eps``, an *absolute* threshold, so tiny
    gradients make UPGrad/DualProj the plain mean), plus ``reg_eps`` on the diagonal;
    absent coordinates get 1 on the diagonal and no coupling, so they stay at 0.
    """
    g = _masked(gram, mask)
    tr = jnp.trace(g)
    g = jnp.where(tr < norm_eps, 0.0, g / jnp.where(tr > 0, tr, 1.0))
    m = mask.astype(jnp.float32)
    return g + jnp.diag(reg_eps * m + (1.0 - m))


def solve_lcp(
    g: jax.Array, q: jax.Array, *, newton_iters: int = NEWTON_ITERS, cd_sweeps: int = CD_SWEEPS
) -> tuple[jax.Array, jax.Array]:
    """``x >= 0`` with ``w = g x + q >= 0`` and ``x . w = 0`` (min ``x^T g x / 2 + q^T x``).

    ``g: f32[K, K]`` positive definite. Primal-dual active-set steps (Hintermueller,
    Ito and Kunisch 2002: guess the active set from ``w - x``, solve the equality
    problem exactly; usually exact after a few steps for small K) followed by
    projected Gauss-Seidel sweeps, which converge for any positive definite ``g``
    and leave an exact solution in place. Returns ``(x, residual)`` with the natural
    residual ``max_i |min(x_i, w_i)|`` (0 at the solution).
    """
    k = q.shape[0]

    def newton(_, x):
        w = g @ x + q
        active = (w - x) > 0  # predicted x_i = 0; the others get w_i = 0
        free = ~active
        m = jnp.where(free[:, None] & free[None, :], g, 0.0) + jnp.diag(active.astype(g.dtype))
        return jnp.linalg.solve(m, jnp.where(free, -q, 0.0))

    x = jax.lax.fori_loop(0, newton_iters, newton, jnp.zeros_like(q))
    x = jnp.maximum(x, 0.0)
    diag = jnp.diagonal(g)

    def sweep(_, x):
        def coord(i, x):
            xi = jnp.maximum(x[i] - (g[i] @ x + q[i]) / diag[i], 0.0)
            return x.at[i].set(xi)

        return jax.lax.fori_loop(0, k, coord, x)

    x = jax.lax.fori_loop(0, cd_sweeps, sweep, x)
    residual = jnp.max(jnp.abs(jnp.minimum(x, g @ x + q)))
    return x, residual


def project_dual_cone(
    gram: jax.Array,
    u: jax.Array,
    mask: jax.Array,
    *,
    norm_eps: float = NORM_EPS,
    reg_eps: float = REG_EPS,
    newton_iters: int = NEWTON_ITERS,
    cd_sweeps: int = CD_SWEEPS,
) -> tuple[jax.Array, jax.Array]:
    """Weights ``v`` with ``G^T v`` the projection of ``G^T u`` onto the dual cone of ``G``.

    By Proposition 1 of Quinton and Rey (2024, "Jacobian descent for multi-objective
    optimization"), ``v = argmin_{v >= u} v^T M v`` with ``M`` = :func:`dual_cone_gram`
    (torchjd solves the same program with quadprog, in float64). ``u: f32[..., K]``
    (a batch of rows is solved with ``vmap``). Returns ``(v, residual)``: ``v`` the
    shape of ``u`` (0 on absent tasks) and the largest LCP residual over the batch,
    in the units of the trace-normalised ``M``.
    """
    m = dual_cone_gram(gram, mask, norm_eps, reg_eps)
    u = jnp.where(mask, jnp.asarray(u, jnp.float32), 0.0)
    flat = u.reshape(-1, u.shape[-1])
    solve = lambda row: solve_lcp(m, m @ row, newton_iters=newton_iters, cd_sweeps=cd_sweeps)
    x, res = jax.vmap(solve)(flat)
    v = jnp.where(mask, flat + x, 0.0)
    return v.reshape(u.shape), jnp.max(res)


def pinv_psd(gram: jax.Array, mask: jax.Array, rtol: float | jax.Array | None = None
             ) -> jax.Array:
    """Pseudo-inverse of the present block of a symmetric PSD ``gram`` (0 elsewhere).

    Eigenvalues with ``|lambda| <= rtol * max |lambda|`` are dropped; ``rtol=None`` is
    ``torch.linalg.pinv``'s default on a square matrix, ``K_present * eps(float32)``.
    """
    g = _masked(gram, mask)
    if rtol is None:
        rtol = jnp.sum(mask.astype(jnp.float32)) * F32_EPS
    lam, vec = jnp.linalg.eigh(g)
    keep = jnp.abs(lam) > rtol * jnp.max(jnp.abs(lam))
    inv = jnp.where(keep, 1.0 / jnp.where(keep, lam, 1.0), 0.0)
    out = (vec * inv) @ vec.T
    return jnp.where(mask[:, None] & mask[None, :], out, 0.0)

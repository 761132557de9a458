"""mtop_jax.weighting: every method against a small problem with a known answer."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtop_jax.errors import ConfigError
from mtop_jax.weighting import (
    GRADIENT_BASED,
    LOSS_BASED,
    WEIGHTINGS,
    GradWeighting,
    LossWeighting,
    cagrad_simplex,
    combine_grad_tree,
    gram_of_tree,
    make_weighting,
    min_norm_simplex,
    per_task_grads,
)

ALL = LOSS_BASED + GRADIENT_BASED
T, F = True, False


def _simplex_grid(k: int, n: int) -> np.ndarray:
    """Every point of the simplex in R^k with coordinates in multiples of 1/n."""
    pts = [c for c in itertools.product(range(n + 1), repeat=k - 1) if sum(c) <= n]
    a = np.asarray(pts, np.float64)
    return np.concatenate([a, n - a.sum(1, keepdims=True)], axis=1) / n


# ---------------------------------------------------------------- registry


def test_registry_and_config_errors():
    assert set(ALL) == set(WEIGHTINGS) == {
        "static", "uncertainty", "dwa", "famo", "rlw", "gls", "stch",
        "pcgrad", "mgda", "cagrad", "getmtl", "gradnorm", "nashmtl", "fairgrad", "dbmtl",
        "upgrad", "dualproj", "imtlg", "alignedmtl", "conflictfree", "gradvac", "graddrop"}
    assert len(WEIGHTINGS) == 22
    for name in LOSS_BASED:
        assert isinstance(make_weighting(name, 3), LossWeighting)
    for name in GRADIENT_BASED:
        m = make_weighting(name.upper(), 3)
        assert isinstance(m, GradWeighting) and hash(m) == hash(make_weighting(name, 3))
    with pytest.raises(ConfigError, match="expected one of"):
        make_weighting("nosuchmethod", 2)
    with pytest.raises(ConfigError, match="unknown argument"):
        make_weighting("dwa", 2, temprature=2.0)
    with pytest.raises(ConfigError, match="non-negative numbers"):
        make_weighting("static", 3, weights=[1.0, 2.0])
    with pytest.raises(ConfigError, match="normalization"):
        make_weighting("mgda", 3, normalization="l1")
    with pytest.raises(ConfigError, match="built for 3 tasks"):
        make_weighting("mgda", 3).init(4)
    with pytest.raises(ConfigError, match="losses have shape"):
        m = make_weighting("static", 3)
        m.combine(jnp.ones(2), None, m.init())


# ---------------------------------------------------------------- loss-based


def test_static_weights_present_tasks_only():
    m = make_weighting("static", 3, weights=(1.0, 2.0, 3.0))
    total, aux = m.combine(jnp.array([1.0, 2.0, 50.0]), jnp.array([T, T, F]), m.init())
    assert float(total) == pytest.approx(1.0 + 4.0)
    np.testing.assert_allclose(aux["weights"], [1, 2, 0])
    g = jax.grad(lambda L: m.combine(L, jnp.array([T, T, F]), m.init())[0])(jnp.ones(3))
    np.testing.assert_allclose(g, [1, 2, 0])


def test_uncertainty_reaches_analytic_optimum_with_adam():
    """0.5 exp(-s) L + 0.5 s is minimal at s = log L; an absent task's s does not move."""
    losses = jnp.array([0.3, 1.0, 5.0, 7.0])
    present = jnp.array([T, T, T, F])
    m = make_weighting("uncertainty", 4)
    state, params = m.init(), m.init_params()
    total0, aux0 = m.combine(losses, present, state, params)
    assert float(total0) == pytest.approx(0.5 * (0.3 + 1.0 + 5.0))
    np.testing.assert_allclose(aux0["weights"], [0.5, 0.5, 0.5, 0.0])
    tx = optax.adam(0.05)

    @jax.jit
    def train(params):
        def step(carry, _):
            p, o = carry
            g = jax.grad(lambda p: m.combine(losses, present, state, p)[0])(p)
            u, o = tx.update(g, o, p)
            return (optax.apply_updates(p, u), o), None

        (p, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=400)
        return p

    s = train(params)["log_vars"]
    np.testing.assert_allclose(s[:3], np.log(losses[:3]), atol=2e-3)
    assert float(s[3]) == 0.0
    with pytest.raises(ConfigError, match="needs params"):
        m.combine(losses, present, state)


def test_dwa_matches_hand_computation():
    m = make_weighting("dwa", 3)  # T = 2
    state = m.init()
    losses = jnp.array([2.0, 3.0, 4.0])
    for _ in range(2):  # uniform for the first two steps
        _, aux = m.combine(losses, None, state)
        np.testing.assert_allclose(aux["weights"], [1, 1, 1])
        state = m.update(state, losses, None)
        losses = jnp.array([1.0, 2.7, 4.4])
    # history: L(t-2) = [2, 3, 4], L(t-1) = [1, 2.7, 4.4]
    r = np.array([1 / 2, 2.7 / 3, 4.4 / 4])
    expected = 3 * np.exp(r / 2) / np.exp(r / 2).sum()
    total, aux = m.combine(jnp.array([1.0, 1.0, 1.0]), None, state)
    np.testing.assert_allclose(aux["weights"], expected, rtol=1e-6)
    assert float(total) == pytest.approx(expected.sum(), rel=1e-6)
    # an absent task keeps its history and gets weight 0; K counts present tasks
    state2 = m.update(state, jnp.array([0.5, 9.0, 4.4]), jnp.array([T, F, T]))
    np.testing.assert_allclose(state2["prev1"], [0.5, 2.7, 4.4])
    np.testing.assert_allclose(state2["prev2"], [1.0, 3.0, 4.4])
    _, aux = m.combine(jnp.ones(3), jnp.array([T, F, T]), state2)
    r2 = np.array([0.5 / 1.0, 4.4 / 4.4])
    np.testing.assert_allclose(np.asarray(aux["weights"])[[0, 2]],
                               2 * np.exp(r2 / 2) / np.exp(r2 / 2).sum(), rtol=1e-6)
    assert float(aux["weights"][1]) == 0.0


def test_famo_combine_gradient_and_update_formula():
    m = make_weighting("famo", 3, beta=0.5, gamma=0.1)
    state = {**m.init(), "logits": jnp.array([0.2, -0.1, 0.4])}
    losses = jnp.array([0.5, 2.0, 1.0])
    present = jnp.array([T, T, F])
    z = np.exp([0.2, -0.1]) / np.exp([0.2, -0.1]).sum()
    c = 1 / (z / np.array([0.5, 2.0])).sum()
    total, aux = m.combine(losses, present, state)
    assert float(total) == pytest.approx(c * (z * np.log([0.5, 2.0])).sum(), rel=1e-5)
    grad = jax.grad(lambda L: m.combine(L, present, state)[0])(losses)
    np.testing.assert_allclose(grad, [c * z[0] / 0.5, c * z[1] / 2.0, 0.0], rtol=1e-5)
    np.testing.assert_allclose(aux["weights"], grad, rtol=1e-6)
    # paper update: xi <- xi - beta (J_softmax^T delta + gamma xi) on the present tasks
    new = jnp.array([0.4, 1.9, 7.0])
    s2 = m.update(state, losses, present, new_losses=new)
    delta = np.log([0.5, 2.0]) - np.log([0.4, 1.9])
    g = z * (delta - (z * delta).sum()) + 0.1 * np.array([0.2, -0.1])
    np.testing.assert_allclose(s2["logits"][:2], np.array([0.2, -0.1]) - 0.5 * g, rtol=1e-5)
    assert float(s2["logits"][2]) == pytest.approx(0.4)  # absent: untouched


@pytest.mark.parametrize("variant", ["paper", "delayed", "adam"])
def test_famo_weights_move_to_the_slower_task(variant):
    opt = optax.adam(0.025) if variant == "adam" else None
    m = make_weighting("famo", 2, beta=0.5, optimizer=opt)
    state = m.init()
    losses = jnp.array([1.0, 1.0])
    for _ in range(5):
        after = losses * jnp.array([0.8, 0.98])  # task 0 drops much faster
        if variant == "delayed":
            state = m.update(state, losses, None)
        else:
            state = m.update(state, losses, None, new_losses=after)
        losses = after
    _, aux = m.combine(jnp.array([1.0, 1.0]), None, state)
    assert float(aux["z"][1]) > float(aux["z"][0]) + 0.01
    assert float(aux["weights"][1]) > 0.5


# ---------------------------------------------------------------- gradient-based


def combine_matrix(method, G, losses, present, state, key=None):
    """The method on a flat ``G: [K, D]``: the one-leaf gradient tree the trainer's path
    (``combine_grad_tree``) takes. ``(d: [D], new_state, aux)``."""
    d, state, aux = combine_grad_tree(method, {"g": G}, losses, present, state, key)
    return d["g"], state, aux


@functools.cache
def _jitted(method):
    """``combine_matrix`` jitted, compiled once per method (eager dispatch is slower here)."""
    return jax.jit(functools.partial(combine_matrix, method))


def _init(m, grads_like):
    """``m.init()``; dbmtl's state is a buffer shaped like the (shared) gradients."""
    return m.init(grads_like=grads_like) if getattr(m, "needs_grad_buffer", False) else m.init()


def _d(name, G, losses=None, present=None, key=None, **kw):
    m = make_weighting(name, G.shape[0], **kw)
    losses = jnp.ones(G.shape[0]) if losses is None else jnp.asarray(losses, jnp.float32)
    return _jitted(m)(jnp.asarray(G, jnp.float32), losses, present,
                      _init(m, [jnp.zeros(G.shape[1:])]), key)


def test_pcgrad_two_conflicting_gradients_hand_projected():
    g1, g2 = np.array([1.0, 0.0]), np.array([-1.0, 1.0])  # g1.g2 = -1
    pc1 = g1 - (-1.0) / 2.0 * g2  # [0.5, 0.5]
    pc2 = g2 - (-1.0) / 1.0 * g1  # [0, 1]
    d, _, aux = _d("pcgrad", np.stack([g1, g2]), key=jax.random.key(0))
    np.testing.assert_allclose(d, pc1 + pc2, atol=1e-6)
    assert int(aux["conflicts"]) == 2
    # no conflict: the plain sum
    d, _, aux = _d("pcgrad", np.array([[1.0, 0.0], [1.0, 1.0]]))
    np.testing.assert_allclose(d, [2.0, 1.0])
    assert int(aux["conflicts"]) == 0


def test_pcgrad_three_tasks_matches_sequential_projection():
    rng = np.random.default_rng(3)
    G = rng.normal(size=(3, 5))
    G[1] = -0.7 * G[0] + 0.3 * G[1]
    m = make_weighting("pcgrad", 3)
    key = jax.random.key(7)
    d, _, _ = _jitted(m)(jnp.asarray(G, jnp.float32), jnp.ones(3), None,
                                           m.init(), key)
    orders = np.asarray(jax.vmap(lambda k: jax.random.permutation(k, 3))(jax.random.split(key, 3)))
    ref = np.zeros(5)
    for i in range(3):
        pc = G[i].copy()
        for j in orders[i]:
            if j != i and pc @ G[j] < 0:
                pc -= (pc @ G[j]) / (G[j] @ G[j]) * G[j]
        ref += pc
    np.testing.assert_allclose(d, ref, rtol=1e-5, atol=1e-6)
    d2, _, _ = _jitted(m)(jnp.asarray(G, jnp.float32), jnp.ones(3), None,
                                            m.init(), key)
    np.testing.assert_array_equal(d, d2)  # deterministic for a given key


def test_mgda_two_tasks_closed_form():
    rng = np.random.default_rng(0)
    for trial in range(6):
        g1, g2 = rng.normal(size=4), rng.normal(size=4)
        if trial == 0:
            g2 = 3.0 * g1  # the min-norm point is g1 itself
        w1 = np.clip((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2)), 0, 1)
        d, _, aux = _d("mgda", np.stack([g1, g2]))
        np.testing.assert_allclose(aux["weights"], [w1, 1 - w1], atol=1e-5)
        np.testing.assert_allclose(d, w1 * g1 + (1 - w1) * g2, atol=1e-5)


def test_mgda_three_tasks_known_answer_and_brute_force():
    # orthogonal gradients a_k e_k: w_k proportional to 1 / a_k^2
    a = np.array([1.0, 2.0, 4.0])
    d, _, aux = _d("mgda", np.diag(a))
    w = (1 / a**2) / (1 / a**2).sum()
    np.testing.assert_allclose(aux["weights"], w, rtol=1e-5)
    np.testing.assert_allclose(d, w * a, rtol=1e-5)
    # random problems against a fine grid of the simplex (and scipy if it is there)
    grid = _simplex_grid(3, 300)
    rng = np.random.default_rng(1)
    for _ in range(4):
        G = rng.normal(size=(3, 6)) * rng.uniform(0.2, 3.0, size=(3, 1))
        G[2] = -0.5 * G[0] + 0.2 * G[2]
        M = G @ G.T
        best = np.einsum("ni,ij,nj->n", grid, M, grid).min()
        w, norm_sq = jax.jit(min_norm_simplex)(jnp.asarray(M, jnp.float32))
        w = np.asarray(w, np.float64)
        assert w.min() >= 0 and w.sum() == pytest.approx(1, abs=1e-6)
        assert w @ M @ w <= best + 1e-5 * (1 + best)
        assert float(norm_sq) == pytest.approx(w @ M @ w, rel=1e-4, abs=1e-6)


def test_mgda_loss_normalization_and_absent_task():
    G = np.array([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    losses = np.array([1.0, 2.0, 3.0])
    # "loss": min-norm of g_k / L_k, applied to the raw gradients
    d, _, aux = _d("mgda", G, losses, jnp.array([T, T, F]), normalization="loss")
    w = np.array([1.0, 4.0]) / 5.0  # orthogonal e1 and e2/2: w proportional to 1, 4
    np.testing.assert_allclose(aux["weights"], [w[0], w[1], 0.0], rtol=1e-5)
    np.testing.assert_allclose(d, [w[0], w[1]], rtol=1e-5)


def _cagrad_objective(w, M, c):
    b = np.ones(M.shape[0]) / M.shape[0]
    g0 = np.sqrt(b @ M @ b)
    return w @ M @ b + c * g0 * np.sqrt(np.maximum(np.einsum("ni,ij,nj->n", w, M, w), 0))


_cagrad_jit = jax.jit(cagrad_simplex)


def test_cagrad_against_brute_force():
    grid = _simplex_grid(3, 300)
    rng = np.random.default_rng(2)
    for trial in range(4):
        G = rng.normal(size=(3, 5)) * rng.uniform(0.2, 3.0, size=(3, 1))
        if trial % 2:
            G[1] = -0.8 * G[0] + 0.1 * G[1]
        M, c = G @ G.T, 0.4
        f_grid = _cagrad_objective(grid, M, c)
        w = np.asarray(_cagrad_jit(jnp.asarray(M, jnp.float32), None, c), np.float64)
        f_w = _cagrad_objective(w[None], M, c)[0]
        assert f_w <= f_grid.min() + 1e-5 * (1 + abs(f_grid.min()))
        # the direction, from the authors' formula
        d, _, aux = _d("cagrad", G)
        g0 = G.mean(0)
        gw = np.asarray(aux["w"], np.float64) @ G
        sqrt_phi = c * np.sqrt(g0 @ g0 + 1e-8) + 1e-8
        ref = (g0 + sqrt_phi / (np.linalg.norm(gw) + 1e-8) * gw) / (1 + c**2) * 3
        np.testing.assert_allclose(d, ref, rtol=1e-4, atol=1e-5)
    # two tasks, a unique answer on a fine 1-d grid
    G = np.array([[1.0, 0.2], [-0.6, 1.0]])
    M = G @ G.T
    line = np.linspace(0, 1, 200001)
    ws = np.stack([line, 1 - line], 1)
    w_best = ws[np.argmin(_cagrad_objective(ws, M, 0.4))]
    w = _cagrad_jit(jnp.asarray(M, jnp.float32), None, 0.4)
    np.testing.assert_allclose(w, w_best, atol=1e-4)


def test_getmtl_hand_computed_two_tasks():
    g1, g2 = np.array([1.0, 0.0, 0.0]), np.array([-0.5, 1.0, 0.0])  # conflicting
    L = np.array([1.0, 2.0])
    alpha = 0.15
    # min-norm weights of (g1, g2): w1 = (g2 - g1).g2 / |g1 - g2|^2 = 1.75 / 3.25
    w = np.array([7 / 13, 6 / 13])
    # of (g1 / 1, g2 / 2): (0.3125 + 0.25) / (1 + 0.5 + 0.3125)
    s1 = 0.5625 / 1.8125
    s = np.array([s1, 1 - s1])
    w_hat = np.exp(w * s) / np.exp(w * s).sum()
    gw = w_hat[0] * g1 + w_hat[1] * g2
    g0 = (g1 + g2) / 2
    g0_sq = g0 @ g0 + 1e-8
    lam = (np.linalg.norm(gw) + 1e-8) / (alpha * g0_sq + 1e-8)
    rho = 1 - alpha**2 * g0_sq
    ref = (g0 + lam * gw) / rho / (1 + alpha**2) * 2
    m = make_weighting("getmtl", 2)
    state = m.init()
    combine = _jitted(m)
    d, state, aux = combine(jnp.asarray(np.stack([g1, g2]), jnp.float32),
                            jnp.asarray(L, jnp.float32), None, state)
    np.testing.assert_allclose(aux["w"], w, rtol=1e-5)
    np.testing.assert_allclose(aux["s"], s, rtol=1e-5)
    np.testing.assert_allclose(aux["w_hat"], w_hat, rtol=1e-5)
    assert float(aux["rho"]) == pytest.approx(rho, rel=1e-6)
    np.testing.assert_allclose(d, ref, rtol=1e-5)
    assert int(state["fallbacks"]) == 0 and not bool(aux["fallback"])
    # |g0| >= 1/alpha: rho <= 0, fall back to K g0 (the plain sum) and count it
    G = jnp.asarray(np.stack([g1, g2]) * 100.0, jnp.float32)
    for n in (1, 2):
        d, state, aux = combine(G, jnp.asarray(L, jnp.float32), None, state)
        assert bool(aux["fallback"]) and float(aux["rho"]) <= 0
        np.testing.assert_allclose(d, 100.0 * (g1 + g2), rtol=1e-6)
        assert int(state["fallbacks"]) == n


# ---------------------------------------------------------------- every method changes the update

# Three tasks whose gradients pairwise conflict (negative dot products), of unequal norms.
CONFLICTING = np.array([[2.0, 0.3, 0.0, 0.0],
                        [-0.9, 0.8, 0.2, 0.0],
                        [-0.2, -0.5, 0.5, 0.3]])


def _loss_weights_after_updates(name: str, updates: int) -> np.ndarray:
    """A loss-based method's weights on equal losses after ``updates`` steps on losses that
    fall at different rates per task (uncertainty: a gradient step on its log-variances)."""
    m = make_weighting(name, 3)
    state, params = m.init(), m.init_params()
    losses = jnp.array([0.4, 1.5, 3.0])
    rates = jnp.array([0.5, 0.9, 1.0])  # task 0 falls fastest, task 2 not at all
    for _ in range(updates):
        if params:
            g = jax.grad(lambda p, L=losses, s=state: m.combine(L, None, s, p)[0])(params)
            params = jax.tree.map(lambda p, g: p - 0.5 * g, params, g)
        state = m.update(state, losses, None, new_losses=losses * rates)
        losses = losses * rates
    _, aux = m.combine(jnp.ones(3), None, state, params)
    return np.asarray(aux["weights"], np.float64)


def _uniform(w) -> bool:
    return bool(np.allclose(w, np.mean(w), rtol=1e-4, atol=0))


@pytest.mark.parametrize("name", ALL)
def test_every_method_changes_the_update(name):
    """Each method other than static gives another update than the plain sum."""
    if name in ("rlw", "gls", "stch", "gradnorm"):  # random / the sum in warm-up epochs
        pytest.skip("checked against its reference in test_weighting_reference_libmtl.py")
    assert np.all((CONFLICTING @ CONFLICTING.T)[np.triu_indices(3, 1)] < 0)  # pairwise
    if name in GRADIENT_BASED:
        d, _, aux = _d(name, CONFLICTING, [0.5, 1.0, 2.0], key=jax.random.key(1))
        plain = CONFLICTING.sum(0)
        d = np.asarray(d, np.float64)
        cos = d @ plain / (np.linalg.norm(d) * np.linalg.norm(plain))
        # another direction, not a rescaled sum (cos 0.77-0.98; dualproj 0.992: it only
        # moves the mean gradient to the dual cone's boundary)
        assert cos < (0.995 if name == "dualproj" else 0.99), (name, cos)
        assert not _uniform(aux["weights"]), aux["weights"]
        return
    at_init = _loss_weights_after_updates(name, 0)
    after = _loss_weights_after_updates(name, 4)
    assert _uniform(at_init), at_init  # every method starts at (a multiple of) the sum
    if name == "static":  # the reference: fixed weights, whatever the losses did
        np.testing.assert_array_equal(after, np.ones(3))
        return
    assert not _uniform(after), (name, after)
    if name == "dwa":  # its first two steps are uniform by construction
        assert _uniform(_loss_weights_after_updates(name, 1))
        assert not _uniform(_loss_weights_after_updates(name, 2))
    # The slowest task (2) gains weight over the fastest (0); uncertainty: the largest
    # loss gets the smallest weight (1 / its variance).
    if name == "uncertainty":
        assert after[2] < after[1] < after[0], after
    else:
        assert after[2] > after[0], (name, after)


# ---------------------------------------------------------------- every method, jitted


@pytest.mark.parametrize("name", ALL)
def test_jitted_finite_with_absent_task(name):
    k, dim = 4, 9
    m = make_weighting(name, k)
    rng = np.random.default_rng(1)
    G = jnp.asarray(rng.normal(size=(k, dim)) * np.array([[1], [1], [0], [1]]), jnp.float32)
    losses = jnp.asarray(rng.uniform(0.1, 3.0, size=k) * np.array([1, 1, 0, 1]), jnp.float32)
    present = jnp.array([T, T, F, T])
    state = _init(m, [G[0]])
    if name in LOSS_BASED:
        params = m.init_params()

        @jax.jit
        def step(losses, state, params):
            (total, aux), g = jax.value_and_grad(
                lambda L, p: m.combine(L, present, state, p), argnums=(0, 1), has_aux=True
            )(losses, params)
            state = m.update(state, losses, present, new_losses=0.9 * losses)
            return total, aux, g, state

        run = lambda state: step(losses, state, params)
        for _ in range(3):
            total, aux, g, state = run(state)
        outs = [total, aux, g, state]
        assert float(aux["weights"][2]) == 0.0 and float(g[0][2]) == 0.0
    else:
        step = _jitted(m)
        run = lambda state: step(G, losses, present, state, jax.random.key(5))
        for _ in range(3):
            d, state, aux = run(state)
        outs = [d, aux, state]
        assert float(aux["weights"][2]) == 0.0
    assert int(state["step"]) == 3
    for leaf in jax.tree.leaves(outs):
        assert np.all(np.isfinite(np.asarray(leaf, np.float64))), name
    # the state is a pytree of arrays: saved as numpy and restored, it gives the same step
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))
    restored = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), state)
    jax.tree.map(np.testing.assert_array_equal, run(restored), run(state))


@pytest.mark.parametrize("name", GRADIENT_BASED)
def test_absent_task_is_ignored(name):
    """With an absent task (any finite row, any loss) the result is that of the others alone."""
    rng = np.random.default_rng(6)
    G = rng.normal(size=(3, 5))
    G[2] = -0.6 * G[0] + 0.4 * G[2]
    L = np.array([0.7, 1.3, 2.1])
    d3, s3, aux3 = _d(name, np.stack([G[0], 50 * G[1], G[2]]), [L[0], 9.0, L[2]],
                      jnp.array([T, F, T]))
    d2, s2, aux2 = _d(name, G[[0, 2]], L[[0, 2]])
    np.testing.assert_allclose(d3, d2, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(aux3["weights"])[[0, 2]], aux2["weights"],
                               rtol=1e-4, atol=1e-6)
    assert float(aux3["weights"][1]) == 0.0


# ---------------------------------------------------------------- per-task gradients


def _toy_params(seed, d=4, h=3, k=2):
    rng = np.random.default_rng(seed)
    return {"W": jnp.asarray(0.3 * rng.normal(size=(d, h)), jnp.float32),
            "heads": jnp.asarray(0.3 * rng.normal(size=(k, h)), jnp.float32)}


def _toy_batch(seed, n=16, d=4, k=2):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=(n, d)), jnp.float32),
            jnp.asarray(rng.normal(size=(n, k)), jnp.float32))


def _toy_task_losses(params, batch):
    x, y = batch  # x [n, d], y [n, K]
    feats = x @ params["W"]
    pred = feats @ params["heads"].T  # [n, K]
    return jnp.mean((pred - y) ** 2, axis=0)


def test_per_task_grads_and_tree_helpers():
    params, batch = _toy_params(0), _toy_batch(1)
    m = make_weighting("cagrad", 2)
    is_w = lambda path, leaf: path[0].key == "W"

    @jax.jit
    def run(params, batch):
        losses, grads = per_task_grads(_toy_task_losses, params, batch, 2)
        (_, aux), _ = per_task_grads(lambda p, b: (_toy_task_losses(p, b), 2.0 * p["W"]),
                                     params, batch, 2, has_aux=True)
        G = jnp.concatenate([grads["W"].reshape(2, -1), grads["heads"].reshape(2, -1)], 1)
        d, _, _ = combine_matrix(m, G, losses, None, m.init())
        n_w = params["W"].size
        d = {"W": d[:n_w].reshape(params["W"].shape), "heads": d[n_w:].reshape(
            params["heads"].shape)}
        tree_all, _, _ = combine_grad_tree(m, grads, losses, None, m.init())
        tree_w, _, aux_w = combine_grad_tree(m, grads, losses, None, m.init(), shared=is_w)
        tree_d, _, _ = combine_grad_tree(m, grads, losses, None, m.init(),
                                         shared={"W": True, "heads": False})
        return dict(losses=losses, grads=grads, aux=aux, jac=jax.jacrev(_toy_task_losses)(
            params, batch), G=G, gram=gram_of_tree(grads), d=d, tree_all=tree_all,
            tree_w=tree_w, weights_w=aux_w["weights"], tree_d=tree_d)

    r = run(params, batch)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    jax.tree.map(close, r["grads"], r["jac"])
    close(r["losses"], _toy_task_losses(params, batch))
    close(r["aux"], 2.0 * params["W"])
    close(r["gram"], r["G"] @ r["G"].T)
    jax.tree.map(close, r["tree_all"], r["d"])  # tree path == flat path
    # only W shared: weights from W's gradients, the heads get the plain sum
    close(r["tree_w"]["heads"], r["grads"]["heads"].sum(0))
    close(r["tree_w"]["W"], np.tensordot(r["weights_w"], r["grads"]["W"], 1))
    jax.tree.map(close, r["tree_d"], r["tree_w"])
    assert not np.allclose(r["tree_w"]["W"], r["tree_all"]["W"])


# ---------------------------------------------------------------- end to end


def _toy_data():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(64, 4))
    a1 = rng.normal(size=4)
    a2 = -a1 + 0.5 * np.array([1.0, -1.0, 0.5, 0.0])  # tasks that pull W apart
    return jnp.asarray(x, jnp.float32), jnp.asarray(np.stack([x @ a1, x @ a2], 1), jnp.float32)


def test_toy_tasks_conflict_at_init():
    """The shared-weight gradients of the two toy tasks point in opposite directions."""
    x, y = (np.asarray(a, np.float64) for a in _toy_data())
    p = {k: np.asarray(v, np.float64) for k, v in _toy_params(5).items()}
    gW = [2 / len(x) * x.T @ np.outer(x @ p["W"] @ p["heads"][k] - y[:, k], p["heads"][k])
          for k in range(2)]
    assert np.sum(gW[0] * gW[1]) < 0


@pytest.mark.parametrize("name", ALL)
def test_end_to_end_toy_regression(name):
    """100 adam steps on two conflicting linear-regression tasks reduce both losses.

    Task 1 is absent from every fourth batch.
    """
    x, y = _toy_data()
    params = _toy_params(5)
    m = make_weighting(name, 2)
    tx = optax.adam(0.03)
    shared = {"W": True, "heads": False}
    wstate = _init(m, [params["W"]])
    wparams = m.init_params() if name in LOSS_BASED else {}

    def task_losses(p, i):
        present = jnp.array([True, i % 4 != 0])
        losses = jnp.where(present, _toy_task_losses(p, (x, y)), 0.0)
        return losses, present

    @jax.jit
    def train(params, wparams, wstate):
        def step(carry, i):
            p, wp, o, ws = carry
            if name in LOSS_BASED:
                def loss_fn(p, wp):
                    losses, present = task_losses(p, i)
                    total, _ = m.combine(losses, present, ws, wp)
                    return total, (losses, present)

                (_, (losses, present)), g = jax.value_and_grad(
                    loss_fn, argnums=(0, 1), has_aux=True)(p, wp)
                u, o = tx.update(g, o, (p, wp))
                p, wp = optax.apply_updates((p, wp), u)
                new_losses, new_present = task_losses(p, i)
                ws = m.update(ws, losses, present, new_losses=new_losses, new_present=new_present)
            else:
                (losses, present), grads = per_task_grads(task_losses, p, i, 2, has_aux=True)
                g, ws, _ = combine_grad_tree(m, grads, losses, present, ws,
                                             jax.random.fold_in(jax.random.key(0), i),
                                             shared=shared)
                u, o = tx.update((g, wp), o, (p, wp))
                p, wp = optax.apply_updates((p, wp), u)
            return (p, wp, o, ws), losses

        carry = (params, wparams, tx.init((params, wparams)), wstate)
        (p, wp, _, ws), hist = jax.lax.scan(step, carry, jnp.arange(100))
        return p, ws, hist

    p, ws, hist = train(params, wparams, wstate)
    before = _toy_task_losses(params, (x, y))
    after = _toy_task_losses(p, (x, y))
    assert np.all(np.isfinite(np.asarray(hist))) and np.all(np.isfinite(np.asarray(after)))
    # dbmtl steps on log-loss gradients (g / L) rescaled to the largest buffer: near zero
    # loss they stay large and the losses oscillate at this learning rate (cut 13-50x)
    cut = 0.1 if name == "dbmtl" else 0.01
    assert np.all(np.asarray(after) < cut * np.asarray(before)), (name, before, after)
    assert int(ws["step"]) == 100

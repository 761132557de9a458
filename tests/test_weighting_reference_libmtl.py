"""rlw, gls, stch, gradnorm, nashmtl, fairgrad, dbmtl against their PyTorch references.

The references' outputs are recorded in tests/reference/weighting_libmtl.npz by
tests/reference/record_weighting_references_libmtl.py (LibMTL at commit 4336804 for
rlw, gls, stch, gradnorm and dbmtl; torchjd 0.18 for nashmtl and fairgrad; the
script says why). Tolerances: 1e-5 (relative, float32) where the computation is the
same closed form; the solver methods (fairgrad, nashmtl: our damped Newton vs scipy's
least_squares / cvxpy's ECOS) 2e-4 relative, the references' own accuracy.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtop_jax.errors import ConfigError
from mtop_jax.weighting import (
    GRADIENT_BASED,
    LOSS_BASED,
    GradWeighting,
    LossWeighting,
    combine_grad_tree,
    make_weighting,
    per_task_grads,
    select_shared,
)

NEW = ("rlw", "gls", "stch", "gradnorm", "nashmtl", "fairgrad")  # dbmtl: tests of its own
REF = np.load(os.path.join(os.path.dirname(__file__), "reference", "weighting_libmtl.npz"))
CASES = sorted({k.split("/")[1] for k in REF.files if k.startswith("cases/")})
EXACT = dict(rtol=1e-5, atol=1e-6)
SOLVER = dict(rtol=2e-4, atol=1e-5)


def _case(name):
    return (REF[f"cases/{name}/G"].astype(np.float32), REF[f"cases/{name}/losses"],
            REF[f"cases/{name}/present"])


@functools.cache
def _jitted(method):
    """The method's step on a flat [K, D] matrix (gradient methods) or on the losses
    (loss methods, differentiated as the trainer does), jitted once per method."""
    if isinstance(method, GradWeighting):
        return jax.jit(lambda G, L, p, s: combine_grad_tree(method, {"g": G}, L, p, s))
    return jax.jit(lambda L, p, s: jax.value_and_grad(
        lambda L: method.combine(L, p, s), has_aux=True)(L))


def _grad_step(method, G, losses, present, state):
    """(d, weights, new_state, aux) of a gradient method on a flat [K, D] matrix."""
    d, state, aux = _jitted(method)(jnp.asarray(G, jnp.float32),
                                    jnp.asarray(losses, jnp.float32),
                                    jnp.asarray(present), state)
    return np.asarray(d["g"]), np.asarray(aux["weights"]), state, aux


def _loss_step(method, losses, present, state):
    """(total, d total / d losses, aux) of a loss method."""
    if present is None:
        present = np.ones(len(losses), bool)
    (total, aux), g = _jitted(method)(jnp.asarray(losses, jnp.float32), jnp.asarray(present),
                                      state)
    return np.asarray(total), np.asarray(g), aux


# ---------------------------------------------------------------- loss-based


@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_rlw_same_draw_same_weights(k):
    """LibMTL: w = softmax(z), z ~ N(0, I); the same z gives the same weights and gradient."""
    m = make_weighting("rlw", k)
    z = jnp.asarray(REF[f"rlw/k{k}/z"])
    got = np.asarray(m.weights_from_draw(z, jnp.ones(k, bool)))
    np.testing.assert_allclose(got, REF[f"rlw/k{k}/weights"], **EXACT)
    # combine uses the same transform of its own draw, and its gradient is the weights
    state = m.init()
    total, g, aux = _loss_step(m, REF[f"rlw/k{k}/losses"], None, state)
    w = np.asarray(m.weights_from_draw(m.draw(state), jnp.ones(k, bool)))
    np.testing.assert_allclose(g, w, **EXACT)
    np.testing.assert_allclose(aux["weights"], w, **EXACT)
    np.testing.assert_allclose(total, w @ REF[f"rlw/k{k}/losses"], **EXACT)


def test_rlw_draws_are_standard_normal_and_a_function_of_the_step():
    m = make_weighting("rlw", 8, seed=3)
    s0, s1 = m.init(), m.update(m.init(), jnp.ones(8))
    np.testing.assert_array_equal(m.draw(s0), m.draw(m.init()))
    assert not np.allclose(m.draw(s0), m.draw(s1))
    assert not np.allclose(m.draw(s0), make_weighting("rlw", 8, seed=4).draw(s0))
    z = np.stack([m.draw({"step": jnp.int32(t)}) for t in range(400)])
    assert abs(z.mean()) < 0.05 and abs(z.std() - 1.0) < 0.05


@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_gls_matches_libmtl(k):
    m = make_weighting("gls", k)
    total, g, aux = _loss_step(m, REF[f"gls/k{k}/losses"], None, m.init())
    np.testing.assert_allclose(total, REF[f"gls/k{k}/total"], **EXACT)
    np.testing.assert_allclose(g, REF[f"gls/k{k}/grad"], **EXACT)
    np.testing.assert_allclose(aux["weights"], g, **EXACT)


@pytest.mark.parametrize("k", [3, 5])
def test_stch_matches_libmtl_over_a_history(k):
    """Warm-up epoch 0, nadir epoch 1, then STCH; 2 steps an epoch, as recorded."""
    hist, ref = REF[f"stch/k{k}/losses"], REF[f"stch/k{k}/grad"]
    m = make_weighting("stch", k, mu=float(REF[f"stch/k{k}/mu"]), warmup_epochs=1,
                       steps_per_epoch=2)
    state = m.init()
    for t, losses in enumerate(hist):
        _, g, aux = _loss_step(m, losses, None, state)
        np.testing.assert_allclose(g, ref[t], **EXACT, err_msg=f"step {t}")
        np.testing.assert_allclose(aux["weights"], g, **EXACT)
        state = m.update(state, jnp.asarray(losses, jnp.float32))
    np.testing.assert_allclose(aux["nadir"], REF[f"stch/k{k}/nadir"], **EXACT)


# ---------------------------------------------------------------- gradient-based


@pytest.mark.parametrize("alpha", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("case", CASES)
def test_fairgrad_matches_torchjd(case, alpha):
    G, L, present = _case(case)
    m = make_weighting("fairgrad", len(L), alpha=alpha)
    d, w, state, aux = _grad_step(m, G, L, present, m.init())
    ref = REF[f"fairgrad/a{alpha}/{case}/weights"]
    assert float(aux["residual"]) < 1e-4
    assert np.all(w[present] > 0) and np.all(w[~present] == 0)
    if case == "small3":
        # least_squares stops on its cost tolerance before the root at this scale
        # (|g| ~ 1e-3, w ~ 200): its relative residual is 1e-2 to 7e-2, ours < 1e-6.
        A = G.astype(np.float64) @ G.T.astype(np.float64)
        ref_res = np.abs(A @ ref - ref ** (-1 / alpha)).max() / np.abs(ref ** (-1 / alpha)).max()
        assert ref_res > 1e-3
        np.testing.assert_allclose(w, ref, rtol=0.1)
        return
    np.testing.assert_allclose(w, ref, **SOLVER)
    np.testing.assert_allclose(d, ref @ G, **SOLVER)


@pytest.mark.parametrize("case", CASES)
def test_nashmtl_matches_torchjd(case):
    G, L, present = _case(case)
    k = len(L)
    for key, kwargs in (("nashmtl", {}), ("nashmtl_unclipped", {"max_norm": 0.0})):
        m = make_weighting("nashmtl", k, **kwargs)
        d, w, state, aux = _grad_step(m, G, L, present, m.init())
        ref = REF[f"{key}/{case}/weights"]
        Gp = G[present].astype(np.float64)
        if case == "small3":
            # ECOS fails on this scale (|g| ~ 1e-3): "Solution may be inaccurate", a zero
            # weight; ours solves G G^T w = 1/w: the reference's residual is not small.
            ref_res = np.abs(Gp @ Gp.T @ ref - 1 / np.maximum(ref, 1e-30))
            assert ref_res.max() > 1.0
            assert float(aux["residual"]) < 1e-4
            continue
        np.testing.assert_allclose(w, ref, **SOLVER)
        np.testing.assert_allclose(d, ref @ G, **SOLVER)
        if key == "nashmtl":  # LibMTL's Nash_MTL: the same direction, clipped by torch
            np.testing.assert_allclose(d, REF[f"nashmtl_libmtl/{case}/d"], **SOLVER)
            assert abs(np.linalg.norm(d) - 1.0) < 1e-4  # |d| = sqrt(K) > 1 -> clipped to 1


def test_nashmtl_update_weights_every_matches_torchjd():
    hist, ref = REF["nashmtl_hist/G"].astype(np.float32), REF["nashmtl_hist/weights"]
    m = make_weighting("nashmtl", 3, update_weights_every=2)
    state = m.init()
    for t, G in enumerate(hist):
        _, w, state, _ = _grad_step(m, G, np.ones(3), np.ones(3, bool), state)
        np.testing.assert_allclose(w, ref[t], **SOLVER, err_msg=f"step {t}")


@pytest.mark.parametrize("k", [3, 5])
def test_gradnorm_matches_libmtl_over_a_history(k):
    """Epoch 0 (2 steps): the plain sum, L(0) recorded; then GradNorm; Adam(0.05) on theta."""
    Gh, Lh = REF[f"gradnorm/k{k}/G"].astype(np.float32), REF[f"gradnorm/k{k}/losses"]
    m = make_weighting("gradnorm", k, alpha=1.5, learning_rate=0.05, weight_decay=0.0,
                       steps_per_epoch=2)
    state = m.init()
    for t in range(len(Gh)):
        d, w, state, aux = _grad_step(m, Gh[t], Lh[t], np.ones(k, bool), state)
        np.testing.assert_allclose(w, REF[f"gradnorm/k{k}/weights"][t], **EXACT)
        ref_d = REF[f"gradnorm/k{k}/d"][t]  # float32 cancellation in the sums: scale atol
        np.testing.assert_allclose(d, ref_d, rtol=1e-5, atol=1e-5 * np.abs(ref_d).max())
        np.testing.assert_allclose(state["theta"], REF[f"gradnorm/k{k}/loss_scale"][t],
                                   **EXACT, err_msg=f"step {t}")
        assert bool(aux["active"]) == (t >= 2)


# ---------------------------------------------------------------- every new method


def _absent_state_unchanged(name, old, new):
    """Per-task entries of the state of task 1 (absent) are as they were."""
    per_task = {"stch": ("loss_sum", "loss_count"), "nashmtl": ("alpha",),
                "gradnorm": ("theta", "loss_sum", "loss_count")}.get(name, ())
    for key in per_task:
        np.testing.assert_array_equal(np.asarray(new[key])[1], np.asarray(old[key])[1],
                                      err_msg=f"{name}: {key}")
    assert int(new["step"]) == int(old["step"]) + 1


@pytest.mark.parametrize("name", NEW)
def test_absent_task_weight_zero_state_unchanged_and_jit(name):
    k = 4
    kwargs = {"steps_per_epoch": 1} if name in ("stch", "gradnorm") else {}
    if name == "stch":
        kwargs["warmup_epochs"] = 1
    m = make_weighting(name, k, **kwargs)
    rng = np.random.default_rng(2)
    G = jnp.asarray(rng.normal(size=(k, 10)), jnp.float32)
    losses = jnp.asarray(rng.uniform(0.2, 2.0, k), jnp.float32)
    present = jnp.array([True, False, True, True])
    state = m.init()
    if isinstance(m, LossWeighting):

        def step(state, losses, present):
            (total, aux), g = jax.value_and_grad(
                lambda L: m.combine(L, present, state), has_aux=True)(losses)
            return total, g, aux, m.update(state, losses, present)

        jstep = jax.jit(step)
        for t in range(4):  # through warm-up, nadir and STCH phases
            jitted = jstep(state, losses, present)
            if t == 3:  # the same eagerly
                jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                                     atol=1e-7),
                             step(state, losses, present), jitted)
            total, g, aux, new = jitted
            assert float(g[1]) == 0.0 and float(aux["weights"][1]) == 0.0
            assert np.isfinite(float(total)) and np.all(np.isfinite(np.asarray(g)))
            _absent_state_unchanged(name, state, new)
            state = new
    else:

        def step(state, G, losses, present):
            return combine_grad_tree(m, {"g": G}, losses, present, state, jax.random.key(0))

        jstep = jax.jit(step)
        for t in range(4):
            jitted = jstep(state, G, losses, present)
            if t == 3:  # the same eagerly
                jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                                     atol=1e-6),
                             step(state, G, losses, present), jitted)
            d, new, aux = jitted
            assert float(aux["weights"][1]) == 0.0
            assert np.all(np.isfinite(np.asarray(d["g"])))
            _absent_state_unchanged(name, state, new)
            state = new
    # the state survives a numpy round trip (as in a checkpoint)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))


def test_absent_task_equals_the_present_tasks_alone():
    """With task 2 absent (any row, any loss), the weights are those of the other tasks."""
    G, L, present = _case("absent5")
    for name in ("nashmtl", "fairgrad", "gradnorm"):
        m5, m4 = make_weighting(name, 5), make_weighting(name, 4)
        G5 = G.copy()
        G5[2] *= 50.0
        _, w5, _, _ = _grad_step(m5, G5, L, present, m5.init())
        _, w4, _, _ = _grad_step(m4, G[present], L[present], np.ones(4, bool), m4.init())
        np.testing.assert_allclose(w5[present], w4, rtol=1e-5, atol=1e-6, err_msg=name)
        assert w5[2] == 0.0


def test_make_weighting_every_new_name():
    for name in (*NEW, "dbmtl"):
        assert name in LOSS_BASED + GRADIENT_BASED
        m = make_weighting(name.upper(), 3)
        if name != "dbmtl":
            m.init()  # works without arguments (dbmtl: see test_dbmtl_heads_absent_task_and_init)
        assert hash(m) == hash(make_weighting(name, 3)) and m.name == name
        kind = LossWeighting if name in ("rlw", "gls", "stch") else GradWeighting
        assert isinstance(m, kind)
    with pytest.raises(ConfigError, match="fairgrad"):  # the error lists the names
        make_weighting("fairgard", 3)
    with pytest.raises(ConfigError, match="unknown argument"):
        make_weighting("nashmtl", 3, max_nrom=1.0)


@pytest.mark.parametrize("k", [3, 5])
def test_dbmtl_matches_libmtl_over_a_history(k):
    """The combined shared gradient after each of 5 steps (its EMA buffers as state)."""
    Gh, Lh = REF[f"dbmtl/k{k}/G"].astype(np.float32), REF[f"dbmtl/k{k}/losses"]
    m = make_weighting("dbmtl", k, beta=float(REF[f"dbmtl/k{k}/beta"]),
                       beta_sigma=float(REF[f"dbmtl/k{k}/sigma"]))
    state = m.init(grads_like={"g": jnp.zeros(Gh.shape[-1])})
    step = jax.jit(lambda G, L, s: combine_grad_tree(m, {"g": G}, L, None, s))
    for t in range(len(Gh)):
        d, state, _ = step(jnp.asarray(Gh[t]), jnp.asarray(Lh[t], jnp.float32), state)
        ref = REF[f"dbmtl/k{k}/d"][t]
        np.testing.assert_allclose(d["g"], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(),
                                   err_msg=f"step {t}")


def test_dbmtl_heads_absent_task_and_init():
    """Heads get the log-loss gradients; an absent task's buffer stays; init needs shapes."""
    k = 3
    m = make_weighting("dbmtl", k)
    with pytest.raises(ConfigError, match="grads_like"):
        m.init()
    rng = np.random.default_rng(3)
    grads = {"W": jnp.asarray(rng.normal(size=(k, 4, 2)), jnp.float32),
             "heads": jnp.asarray(rng.normal(size=(k, 2)), jnp.float32)}
    shared = {"W": True, "heads": False}
    params_like = {"W": jnp.zeros((4, 2)), "heads": jnp.zeros((2,))}
    state = m.init(grads_like=select_shared(params_like, shared))
    assert len(state["buffer"]) == 1 and state["buffer"][0].shape == (k, 4, 2)
    L = jnp.array([0.5, 2.0, 1.0])
    present = jnp.array([True, False, True])
    step = jax.jit(lambda g, s: combine_grad_tree(m, g, L, present, s, shared=shared))
    d, new, aux = step(grads, state)
    inv = np.where(np.asarray(present), 1 / (np.asarray(L) + 1e-8), 0.0)
    np.testing.assert_allclose(d["heads"], np.tensordot(inv, grads["heads"], 1), rtol=1e-5)
    np.testing.assert_array_equal(new["buffer"][0][1], state["buffer"][0][1])
    assert float(aux["weights"][1]) == 0.0 and int(new["step"]) == 1
    # first step: b = (1 - beta) g / L; d = sum_k max|b| / |b_k| b_k over the present tasks
    b = 0.1 * np.asarray(grads["W"]) * inv[:, None, None]
    n = np.linalg.norm(b.reshape(k, -1), axis=1)
    ref = sum(n[[0, 2]].max() / (n[i] + 1e-8) * b[i] for i in (0, 2))
    np.testing.assert_allclose(d["W"], ref, rtol=1e-5)
    d2, new2, _ = step(grads, new)  # jitted twice: the state's structure is stable
    assert jax.tree.structure(new2) == jax.tree.structure(new)


def test_dbmtl_toy_training_reduces_both_losses():
    """60 adam steps on two linear-regression tasks (task 1 absent every fourth step)
    cut both losses by more than 5x."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(64, 4)), jnp.float32)
    a = rng.normal(size=(4, 2))
    y = x @ jnp.asarray(a, jnp.float32)
    params = {"W": jnp.asarray(0.3 * rng.normal(size=(4, 3)), jnp.float32),
              "heads": jnp.asarray(0.3 * rng.normal(size=(2, 3)), jnp.float32)}
    shared = {"W": True, "heads": False}
    m = make_weighting("dbmtl", 2)

    def task_losses(p, i):
        present = jnp.array([True, i % 4 != 0])
        losses = jnp.mean((x @ p["W"] @ p["heads"].T - y) ** 2, axis=0)
        return jnp.where(present, losses, 0.0), present

    tx = optax.adam(0.03)

    @jax.jit
    def train(params):
        def step(carry, i):
            p, o, ws = carry
            (losses, present), grads = per_task_grads(task_losses, p, i, 2, has_aux=True)
            g, ws, _ = combine_grad_tree(m, grads, losses, present, ws, shared=shared)
            u, o = tx.update(g, o, p)
            return (optax.apply_updates(p, u), o, ws), losses

        carry = (params, tx.init(params), m.init(grads_like=select_shared(params, shared)))
        (p, _, ws), hist = jax.lax.scan(step, carry, jnp.arange(60))
        return p, ws, hist

    p, ws, hist = train(params)
    before = task_losses(params, 1)[0]
    after = task_losses(p, 1)[0]
    assert np.all(np.isfinite(np.asarray(hist)))
    assert np.all(np.asarray(after) < 0.2 * np.asarray(before)), (before, after)
    assert int(ws["step"]) == 60

"""The torchjd ports of mtop_jax.weighting against torchjd 0.18 itself.

``tests/reference/weighting_torchjd.npz`` holds torchjd's outputs on small Jacobians
(K = 2, 3, 4, 5, 8 tasks, D <= 16; conflicting, aligned, rank-deficient, badly scaled,
tiny, with absent tasks), recorded by ``tests/reference/record_weighting_references.py``
(float64, the dual-cone QP solved exactly). Every case is padded to K = 8 tasks and
D = 16 with absent tasks and zero columns, so each method compiles once and runs
all cases under one ``vmap``: a K-task case is also a check that absent tasks
change nothing.

Tolerances, relative to the largest entry of torchjd's output: 1e-5 (float32 against
float64); ConFIG 3e-5 (a pseudo-inverse of the unit Gram matrix in float32). In
``k3_scaled`` (Gram condition number 2e7) IMTL-G's and Aligned-MTL's eigenvalue
cut-off, relative to eps of the dtype, drops a direction in float32 that float64
keeps: there they are compared with torchjd run in float32, to 1e-3.
"""

from __future__ import annotations

import functools
import itertools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtop_jax.errors import ConfigError
from mtop_jax.weighting import (
    GradWeighting,
    combine_grad_tree,
    graddrop_direction,
    make_weighting,
    project_dual_cone,
)

REF = np.load(Path(__file__).parent / "reference" / "weighting_torchjd.npz")
CASES = [str(c) for c in REF["cases"]]
K, D = 8, 16
PREF = np.linspace(0.5, 1.5, K)  # as recorded
NEW = ("upgrad", "dualproj", "imtlg", "alignedmtl", "conflictfree", "gradvac", "graddrop")
#: recorded run -> (method, kwargs; "pref" stands for the case's preference vector)
RUNS = {
    "upgrad": ("upgrad", {}),
    "upgrad_pref": ("upgrad", {"pref": True}),
    "dualproj": ("dualproj", {}),
    "dualproj_pref": ("dualproj", {"pref": True}),
    "imtlg": ("imtlg", {}),
    "alignedmtl": ("alignedmtl", {}),
    "alignedmtl_median": ("alignedmtl", {"scale_mode": "median"}),
    "alignedmtl_rmse": ("alignedmtl", {"scale_mode": "rmse"}),
    "alignedmtl_pref": ("alignedmtl", {"pref": True}),
    "conflictfree": ("conflictfree", {}),
    "conflictfree_pref": ("conflictfree", {"pref": True}),
}
TOL = {"conflictfree": 3e-5}
FLOAT32_CASES = {"k3_scaled": ("imtlg", "alignedmtl")}


def _pad(case: str) -> tuple[np.ndarray, np.ndarray]:
    """(J f32[K, D], present bool[K]) padded with absent tasks and zero columns."""
    j, p = REF[f"{case}.J"], REF[f"{case}.present"]
    k, d = j.shape
    assert np.array_equal(REF[f"{case}.pref"], PREF[:k])
    J = np.zeros((K, D), np.float32)
    J[:k, :d] = j
    present = np.zeros(K, bool)
    present[:k] = p
    return J, present


def _stacked() -> tuple[jax.Array, jax.Array]:
    Js, ps = zip(*(_pad(c) for c in CASES), strict=True)
    return jnp.asarray(np.stack(Js)), jnp.asarray(np.stack(ps))


def _close(got: np.ndarray, ref: np.ndarray, tol: float, what: str) -> float:
    err = float(np.max(np.abs(np.asarray(got, np.float64) - ref)))
    scale = float(np.max(np.abs(ref)))
    assert err <= tol * scale, (what, err, scale)
    return err / scale


@functools.cache
def _run_all(run: str):
    """The method on every padded case, one jit: (d [C, D], weights [C, K], residual [C])."""
    name, kw = RUNS[run]
    kw = dict(kw)
    if kw.pop("pref", False):
        kw["pref_vector"] = tuple(PREF)  # the recorded vector; absent entries are ignored
    m = make_weighting(name, K, **kw)

    def one(J, present):
        out, _, aux = combine_grad_tree(m, {"g": J}, jnp.ones(K), present, m.init())
        return out["g"], aux["weights"], aux.get("qp_residual", jnp.zeros(()))

    return jax.jit(jax.vmap(one))


@pytest.mark.parametrize("run", list(RUNS))
def test_gram_methods_match_torchjd(run):
    Js, presents = _stacked()
    d, w, res = _run_all(run)(Js, presents)
    name = RUNS[run][0]
    for i, case in enumerate(CASES):
        p = REF[f"{case}.present"]
        k, dim = REF[f"{case}.J"].shape
        float32 = name in FLOAT32_CASES.get(case, ())
        sfx, tol = ("32", 1e-3) if float32 else ("", TOL.get(name, 1e-5))
        _close(np.asarray(d[i])[:dim], REF[f"{case}.{run}.d{sfx}"], tol, (case, run))
        assert np.all(np.asarray(d[i])[dim:] == 0)
        key = f"{case}.{run}.weights{sfx}"
        if key in REF:
            _close(np.asarray(w[i])[:k], REF[key], tol, (case, run, "weights"))
        assert np.all(np.asarray(w[i])[k:] == 0) and np.all(np.asarray(w[i])[:k][~p] == 0)
    if name in ("upgrad", "dualproj"):
        assert float(jnp.max(res)) < 1e-6  # LCP residual, in trace-normalised units


def test_graddrop_matches_torchjd():
    """The per-coordinate core, with torchjd's uniforms."""
    for case in CASES:
        J, p = REF[f"{case}.J"], REF[f"{case}.present"]
        u = jnp.asarray(REF[f"{case}.graddrop.u"])
        Jm = jnp.asarray(np.where(p[:, None], J, 0.0))
        for run, leak in [("graddrop", np.zeros(len(p))),
                          ("graddrop_leak", REF[f"{case}.graddrop.leak"])]:
            d, _ = _graddrop(Jm, u, jnp.asarray(leak, jnp.float32))
            _close(d, REF[f"{case}.{run}.d"], 1e-5, (case, run))


_graddrop = jax.jit(graddrop_direction)


def test_graddrop_tree_path_uses_the_core_per_leaf():
    """combine_grad_tree draws each leaf's uniforms from fold_in(key, leaf index)."""
    rng = np.random.default_rng(0)
    grads = {"a": jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32),
             "b": jnp.asarray(rng.normal(size=(3, 7)), jnp.float32)}
    present = jnp.array([True, False, True])
    m = make_weighting("graddrop", 3, leak=[0.2, 0.0, 0.5])
    key = jax.random.key(3)
    out, state, aux = jax.jit(lambda g, s: combine_grad_tree(m, g, jnp.ones(3), present, s, key)
                              )(grads, m.init())
    leak = jnp.array([0.2, 0.0, 0.5])
    for idx, name in enumerate(sorted(grads)):
        x = jnp.where(present.reshape(-1, *[1] * (grads[name].ndim - 1)), grads[name], 0.0)
        u = jax.random.uniform(jax.random.fold_in(key, idx), x.shape[1:])
        d, _ = graddrop_direction(x, u, leak)
        np.testing.assert_allclose(out[name], d, rtol=1e-6, atol=1e-7)
    w = np.asarray(aux["weights"])
    assert w[1] == 0 and np.all((w[[0, 2]] > 0) & (w[[0, 2]] <= 1)) and int(state["step"]) == 1
    # a different key, different uniforms
    out2, _, _ = combine_grad_tree(m, grads, jnp.ones(3), present, m.init(), jax.random.key(4))
    assert not np.allclose(out["a"], out2["a"])


@functools.cache
def _gradvac_step():
    m = make_weighting("gradvac", K)
    return m, jax.jit(lambda J, p, s: combine_grad_tree(m, {"g": J}, jnp.ones(K), p, s))


def test_gradvac_matches_torchjd_over_steps():
    """Three or four steps in a row: the update, the weights and the EMA targets."""
    m, step = _gradvac_step()
    for seq in (str(s) for s in REF["gradvac_sequences"]):
        Js, ps = REF[f"{seq}.J"], REF[f"{seq}.present"]
        t_steps, k, dim = Js.shape
        state = m.init()
        for t in range(t_steps):
            J = np.zeros((K, D), np.float32)
            J[:k, :dim] = Js[t]
            p = np.zeros(K, bool)
            p[:k] = ps[t]
            before = np.asarray(state["phi"])
            out, state, aux = step(jnp.asarray(J), jnp.asarray(p), state)
            _close(np.asarray(out["g"])[:dim], REF[f"{seq}.d"][t], 1e-5, (seq, t))
            _close(np.asarray(aux["weights"])[:k], REF[f"{seq}.weights"][t], 1e-5, (seq, t))
            phi = np.asarray(state["phi"])
            np.testing.assert_allclose(phi[:k, :k], REF[f"{seq}.phi"][t], atol=1e-6)
            absent = ~p
            np.testing.assert_array_equal(phi[absent], before[absent])  # rows and columns
            np.testing.assert_array_equal(phi[:, absent], before[:, absent])
        assert int(state["step"]) == t_steps


def test_gradvac_random_orders_are_permutations():
    """With a key each task visits the others in its own random order: every ordered
    pair once (each target moves, the diagonal does not), and the order matters."""
    m = make_weighting("gradvac", 4)
    rng = np.random.default_rng(2)
    G = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    phi0 = 0.5 * (1.0 - jnp.eye(4))  # high targets: many corrections, order-dependent
    state0 = {**m.init(), "phi": phi0}
    f = jax.jit(lambda k: combine_grad_tree(m, {"g": G}, jnp.ones(4), None, state0, k))
    outs = [f(jax.random.key(i)) for i in range(4)]
    off = ~np.eye(4, dtype=bool)
    for out, state, aux in outs:
        assert np.all(np.isfinite(np.asarray(out["g"]))) and int(aux["corrections"]) > 0
        phi = np.asarray(state["phi"])
        assert np.all(phi[off] != 0.5) and np.all(np.diag(phi) == 0)
    assert len({np.asarray(o[0]["g"]).tobytes() for o in outs}) > 1


def _exact_dual_cone(G: np.ndarray, u: np.ndarray) -> np.ndarray:
    """argmin_{v >= u} v^T G v by trying every active set (float64)."""
    best, best_obj = None, np.inf
    for active in itertools.product([False, True], repeat=len(u)):
        a = np.array(active)
        f = ~a
        v = u.copy()
        if f.any():
            v[f] = np.linalg.solve(G[np.ix_(f, f)], -G[np.ix_(f, a)] @ u[a])
        lam = 2 * G @ v
        if np.all(v[f] >= u[f] - 1e-12) and np.all(lam[a] >= -1e-12) and v @ G @ v < best_obj:
            best, best_obj = v, v @ G @ v
    return best


def test_dual_cone_solver_against_exact_enumeration():
    """Random and nearly aligned Jacobians, 6 tasks: the solver's weights, and the
    projection lies in the dual cone, up to the regularisation: by the QP's optimality
    ``g_k . d = trace(G) (M v)_k - reg_eps trace(G) v_k >= -reg_eps trace(G) v_k``."""
    k = 6
    rng = np.random.default_rng(7)
    Js = [rng.normal(size=(k, 10)), rng.normal(size=10) + 0.1 * rng.normal(size=(k, 10)),
          rng.normal(size=(k, 10)) * np.exp(rng.normal(size=(k, 1)))]
    Js[1][0] *= -1
    grams = jnp.asarray(np.stack([j @ j.T for j in Js]), jnp.float32)
    us = jnp.asarray(rng.uniform(size=(len(Js), k)), jnp.float32)
    solve = jax.jit(jax.vmap(lambda g, u: project_dual_cone(g, u, jnp.ones(k, bool))))
    v, res = solve(grams, us)
    for i, J in enumerate(Js):
        g = np.asarray(grams[i], np.float64)
        exact = _exact_dual_cone(g / np.trace(g) + 1e-4 * np.eye(k), np.asarray(us[i], np.float64))
        _close(np.asarray(v[i]), exact, 1e-4, i)
        vi = np.asarray(v[i], np.float64)
        slack = J @ (J.T @ vi) + 1e-4 * np.trace(g) * vi
        assert np.all(slack >= -1e-5 * np.trace(g)), slack
    assert float(jnp.max(res)) < 1e-6


@pytest.mark.parametrize("name", NEW)
def test_absent_task_weight_zero_state_unchanged(name):
    """An absent task (its row garbage) gets weight 0, and the state does not move for it."""
    m = make_weighting(name, 3)
    rng = np.random.default_rng(1)
    G = jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)
    G = G.at[1].set(1e3)
    state = m.init()
    if name == "gradvac":
        state = {**state, "phi": jnp.full((3, 3), 0.3)}
    out, new, aux = jax.jit(lambda G, s: combine_grad_tree(
        m, {"g": G}, jnp.array([1.0, 50.0, 2.0]), jnp.array([True, False, True]), s,
        jax.random.key(0)))(G, state)
    assert float(aux["weights"][1]) == 0.0 and int(new["step"]) == 1
    assert np.all(np.isfinite(np.asarray(out["g"])))
    if name == "gradvac":
        np.testing.assert_array_equal(new["phi"][1], state["phi"][1])
        np.testing.assert_array_equal(new["phi"][:, 1], state["phi"][:, 1])
        assert not np.allclose(new["phi"][0, 2], 0.3)
    # nobody present: a zero update
    out0, _, aux0 = combine_grad_tree(m, {"g": G}, jnp.ones(3), jnp.zeros(3, bool), state)
    assert np.all(np.asarray(out0["g"]) == 0) and np.all(np.asarray(aux0["weights"]) == 0)


def test_make_weighting_and_config_accept_the_new_names():
    from mtop_jax.config.defaults import base_config
    from mtop_jax.training.setup import build_weighting

    for name in NEW:
        m = make_weighting(name, 3)
        assert isinstance(m, GradWeighting) and m.name == name and hash(m) == hash(
            make_weighting(name.upper(), 3))
        cfg = base_config().weighting
        cfg.method = name
        assert build_weighting(cfg, 3) == m
    m = make_weighting("upgrad", 3, pref_vector=[1, 2, 3])
    assert m.pref_vector == (1.0, 2.0, 3.0) and hash(m)
    assert make_weighting("graddrop", 2, leak=[0.1, 0.9]).leak == (0.1, 0.9)
    cfg = base_config().weighting
    cfg.method = "no-such-method"
    with pytest.raises(ConfigError, match="conflictfree"):  # the message lists the names
        build_weighting(cfg, 3)
    bad = [("upgrad", dict(pref_vector=[1.0, 2.0])), ("alignedmtl", dict(scale_mode="max")),
           ("graddrop", dict(leak=[0.1, 1.5])), ("gradvac", dict(beta=1.5)),
           ("dualproj", dict(reg_eps=0.0)), ("conflictfree", dict(rcond=1.0)),
           ("imtlg", dict(pref_vector=[1.0, 1.0]))]
    for name, kw in bad:
        with pytest.raises(ConfigError):
            make_weighting(name, 2 if name != "upgrad" else 3, **kw)
    with pytest.raises(ConfigError, match="coordinate by coordinate"):
        m = make_weighting("graddrop", 2)
        m.weights_from_gram(jnp.eye(2), jnp.ones(2), None, m.init())

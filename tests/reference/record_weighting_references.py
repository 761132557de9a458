"""Record torchjd 0.18's aggregators on small Jacobians for tests/test_weighting_reference.py.

Run once, in a throwaway environment with torch and torchjd (neither is a dependency
of mtop-jax or of its CI):

    python -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 torchjd==0.18.0 numpy
    /tmp/refvenv/bin/python tests/reference/record_weighting_references.py

It writes ``tests/reference/weighting_torchjd.npz`` (a sibling ``weighting_libmtl.npz``
holds LibMTL's methods). Keys, for each case name ``c`` in ``cases``:

- ``c.J: f32[K, D]`` the Jacobian (a row per task; absent rows are garbage),
  ``c.present: bool[K]``, ``c.pref: f64[K]`` the preference vector of the ``*_pref``
  runs, the first K entries of ``linspace(0.5, 1.5, 8)`` (its present entries are
  handed to torchjd);
- ``c.<method>.d: f64[D]`` torchjd's aggregation of the *present* rows, in float64;
  ``c.<method>.weights: f64[K]`` its weights where it has some (0 on absent tasks);
  ``c.<method>.d32``/``weights32``: the same in float32 (where eigenvalue cut-offs,
  relative to ``eps`` of the dtype, differ: ``k3_scaled``'s Gram matrix has a
  condition number of 2e7),
  for method in upgrad, upgrad_pref, dualproj, dualproj_pref, imtlg, alignedmtl,
  alignedmtl_median, alignedmtl_rmse, alignedmtl_pref, conflictfree, conflictfree_pref,
  graddrop, graddrop_leak (GradDrop's uniforms ``c.graddrop.u: f32[D]`` and leaks
  ``c.graddrop.leak: f32[K]``);
- GradVac sequences ``s`` in ``gradvac_sequences``: ``s.J: f32[T, K, D]``,
  ``s.present: bool[T, K]``, ``s.d: f64[T, D]``, ``s.weights: f64[T, K]``,
  ``s.phi: f64[T, K, K]`` (the targets after each step). The order of the other tasks
  is ascending (``torch.randperm`` replaced by ``arange``); with absent tasks torchjd
  runs on the present rows with the present pairs' targets, which are written back.

The dual-cone QP of UPGrad and DualProj: torchjd's ``QuadprogProjector`` calls quadprog
through qpsolvers, which this environment does not have; ``ExactProjector`` below
keeps its ``__call__`` (torchjd's ``normalize``/``regularize`` with norm_eps = reg_eps
= 1e-4) and replaces only ``solve_qp`` by an exact solve: every active set is tried
(K <= 8: at most 256 linear systems) and the KKT point is kept.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
import torchjd
from torchjd._linalg import QuadprogProjector
from torchjd.aggregation import (
    IMTLG,
    AlignedMTL,
    ConFIG,
    DualProj,
    GradDrop,
    GradVac,
    UPGrad,
)
from torchjd.aggregation._aggregator_bases import GramianWeightedAggregator
from torchjd.aggregation._gradvac import GradVacWeighting

DTYPE = torch.float64
#: the preference vector of the ``*_pref`` runs: its first K entries for K tasks
PREF = np.linspace(0.5, 1.5, 8)


class ExactProjector(QuadprogProjector):
    """torchjd's quadprog projector with its QP ``min v^T G v s.t. v >= u`` solved exactly."""

    _REQUIRED_DEPS = ["numpy"]

    def _project_weight_vector(self, u: np.ndarray, G: np.ndarray) -> np.ndarray:
        m = G.shape[0]
        best, best_obj = None, np.inf
        for active in itertools.product([False, True], repeat=m):
            a = np.array(active)
            f = ~a
            v = u.copy()
            if f.any():
                v[f] = np.linalg.solve(G[np.ix_(f, f)], -G[np.ix_(f, a)] @ u[a])
            lam = 2 * G @ v
            if np.all(v[f] >= u[f] - 1e-12) and np.all(lam[a] >= -1e-12):
                obj = v @ G @ v
                if obj < best_obj:
                    best, best_obj = v, obj
        assert best is not None
        return best


def jacobians(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (J f32[K, D], present bool[K])."""
    out = {}
    for k, d in [(2, 10), (3, 12), (5, 14), (8, 16)]:
        conflict = rng.normal(size=(k, d))
        if k == 2:
            conflict[1] = -0.7 * conflict[0] + 0.5 * conflict[1]
        out[f"k{k}_conflict"] = conflict
        common = rng.normal(size=d)
        out[f"k{k}_aligned"] = common + 0.4 * rng.normal(size=(k, d))
    # rows of different norms, conflicting
    out["k3_scaled"] = rng.normal(size=(3, 12)) * np.array([[0.01], [1.0], [30.0]])
    # rank 3, exactly in float32 too (a copy and a -2 multiple): pseudo-inverses drop two
    # directions
    j = rng.normal(size=(3, 12)).astype(np.float32)
    out["k5_dependent"] = np.concatenate([j, j[:1], -2 * j[1:2]])
    # trace of the Gram matrix below torchjd's norm_eps = 1e-4
    out["k3_tiny"] = 1e-3 * rng.normal(size=(3, 12))
    out = {n: (j.astype(np.float32), np.ones(len(j), bool)) for n, j in out.items()}
    j = rng.normal(size=(4, 12))
    out["k4_absent"] = (j.astype(np.float32), np.array([True, False, True, True]))
    j = rng.normal(size=(8, 16))
    j[3] = -j[0] + 0.3 * j[3]
    out["k8_absent2"] = (j.astype(np.float32), np.array([1, 1, 0, 1, 1, 0, 1, 1], bool))
    return out


def _t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, np.float64), dtype=DTYPE)


def _embed(w_present: torch.Tensor, present: np.ndarray) -> np.ndarray:
    w = np.zeros(len(present))
    w[present] = w_present.double().numpy()
    return w


def _aggregators(pref: torch.Tensor) -> dict:
    return {
        "upgrad": UPGrad(projector=ExactProjector()),
        "upgrad_pref": UPGrad(pref_vector=pref, projector=ExactProjector()),
        "dualproj": DualProj(projector=ExactProjector()),
        "dualproj_pref": DualProj(pref_vector=pref, projector=ExactProjector()),
        "imtlg": IMTLG(),
        "alignedmtl": AlignedMTL(),
        "alignedmtl_median": AlignedMTL(scale_mode="median"),
        "alignedmtl_rmse": AlignedMTL(scale_mode="rmse"),
        "alignedmtl_pref": AlignedMTL(pref_vector=pref),
        "conflictfree": ConFIG(),
        "conflictfree_pref": ConFIG(pref_vector=pref),
    }


def record_case(name: str, J: np.ndarray, present: np.ndarray, rng: np.random.Generator,
                out: dict) -> None:
    k, d = J.shape
    Jp = _t(J[present])
    pref = PREF[:k]
    pref_t = _t(pref[present])
    out[f"{name}.J"], out[f"{name}.present"], out[f"{name}.pref"] = J, present, pref
    for suffix, dtype in [("", DTYPE), ("32", torch.float32)]:
        for method, agg in _aggregators(pref_t.to(dtype)).items():
            jac = Jp.to(dtype)
            out[f"{name}.{method}.d{suffix}"] = agg(jac).numpy()
            if isinstance(agg, GramianWeightedAggregator):
                out[f"{name}.{method}.weights{suffix}"] = _embed(agg.weighting(jac), present)
    u = rng.uniform(size=d).astype(np.float32)
    leak = np.linspace(0.1, 0.6, k).astype(np.float32)
    out[f"{name}.graddrop.u"], out[f"{name}.graddrop.leak"] = u, leak
    real_rand = torch.rand
    torch.rand = lambda *a, **kw: _t(u)
    try:
        out[f"{name}.graddrop.d"] = GradDrop()(Jp).numpy()
        out[f"{name}.graddrop_leak.d"] = GradDrop(leak=_t(leak[present]))(Jp).numpy()
    finally:
        torch.rand = real_rand


def record_gradvac(name: str, Js: np.ndarray, presents: np.ndarray, out: dict) -> None:
    t_steps, k, d = Js.shape
    phi = np.zeros((k, k))
    ds, ws, phis = [], [], []
    for J, p in zip(Js, presents, strict=True):
        agg = GradVac()
        weighting: GradVacWeighting = agg.gramian_weighting
        kp = int(p.sum())
        weighting._phi_t = _t(phi[np.ix_(p, p)]).clone()
        weighting._state_key = (kp, DTYPE)
        Jp = _t(J[p])
        w = agg.weighting(Jp)  # what agg(Jp) computes before returning w @ Jp
        ds.append((w @ Jp).numpy())
        ws.append(_embed(w, p))
        phi[np.ix_(p, p)] = weighting._phi_t.numpy()
        phis.append(phi.copy())
    out[f"{name}.J"], out[f"{name}.present"] = Js, presents
    out[f"{name}.d"], out[f"{name}.weights"], out[f"{name}.phi"] = (
        np.stack(ds), np.stack(ws), np.stack(phis))


def main() -> None:
    rng = np.random.default_rng(20241203)
    out: dict[str, np.ndarray] = {}
    cases = jacobians(rng)
    for name, (J, present) in cases.items():
        record_case(name, J, present, rng, out)
    real_randperm = torch.randperm
    torch.randperm = lambda n, **kw: torch.arange(n)
    sequences = []
    try:
        for k, d in [(2, 10), (3, 12), (5, 14), (8, 16)]:
            Js = rng.normal(size=(3, k, d)).astype(np.float32)
            Js[:, -1] -= Js[:, 0]  # some conflict at every step
            sequences.append(name := f"gv_k{k}")
            record_gradvac(name, Js, np.ones((3, k), bool), out)
        Js = rng.normal(size=(4, 4, 12)).astype(np.float32)
        presents = np.array([[1, 1, 1, 1], [1, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]], bool)
        sequences.append("gv_k4_absent")
        record_gradvac("gv_k4_absent", Js, presents, out)
    finally:
        torch.randperm = real_randperm
    out["cases"] = np.array(list(cases))
    out["gradvac_sequences"] = np.array(sequences)
    out["versions"] = np.array([f"torch {torch.__version__}", f"torchjd {_version()}"])
    dest = Path(__file__).with_name("weighting_torchjd.npz")
    np.savez_compressed(dest, **out)
    print(f"wrote {dest}: {len(cases)} cases, {len(sequences)} gradvac sequences, "
          f"{len(out)} arrays")


def _version() -> str:
    from importlib.metadata import version

    return getattr(torchjd, "__version__", None) or version("torchjd")


if __name__ == "__main__":
    main()

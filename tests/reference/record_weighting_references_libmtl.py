"""Record LibMTL's and torchjd's weighting methods on small problems -> weighting_libmtl.npz.

Not imported by the tests: run by hand in a PyTorch environment, and commit the npz
that tests/test_weighting_reference_libmtl.py compares mtop_jax.weighting with::

    python tests/reference/record_weighting_references_libmtl.py \\
        --libmtl-src DIR [--out tests/reference/weighting_libmtl.npz]

Needs torch, numpy, torchjd 0.18 (NashMTL, FairGrad), scipy, cvxpy and ECOS (recorded
with torch's environment plus ``pip install --no-deps --target X cvxpy ecos scipy
clarabel osqp scs qdldl`` on ``PYTHONPATH``: cvxpy 1.9.3, ECOS 2.0.14, scipy 1.17.1). ``DIR``
holds the files of ``LibMTL/weighting`` of LibMTL at commit
4336804847eaa5e0b924b743d76beec7ac3fdc97 (2025-05-14; the pip release lacks
DB_MTL, STCH, Nash_MTL and FairGrad), e.g.
``git --git-dir=<LibMTL>/.git show HEAD:LibMTL/weighting/STCH.py > DIR/STCH.py``.

LibMTL's package ``__init__`` imports its trainer, models and torchvision, none of
which a weighting needs: the weighting files are loaded by path under a stub
``LibMTL.weighting`` package (see :func:`load_libmtl`), and each method runs on a
harness that supplies what LibMTL's trainer would (``task_num``, ``device``,
``epoch``, ``rep_grad=False``, the shared parameters). The shared parameter is a
vector ``W = 0`` of D entries and task k's loss is ``G_k . W + c_k``: its loss is
``c_k`` and its gradient exactly the row ``G_k`` the case chose.

Reference per method (tests/test_weighting_reference_libmtl.py says the same):
rlw, gls, stch, dbmtl, gradnorm: LibMTL (the only public code of the five besides
the papers'); nashmtl, fairgrad: torchjd 0.18's aggregators (a weighting of the
Jacobian or its Gramian returning the weights, like mtop_jax's; torchjd's Nash-MTL
is the authors' code, its max-norm clipping applied to the weights; LibMTL's
clips the shared gradient instead, with a 1e-6 guard; both FairGrads are the
authors' ``least_squares`` call). Where a task is absent, the reference is run on
the present tasks alone and the absent task's weight recorded as 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import types

import numpy as np
import torch

D = 12


def load_libmtl(src: str) -> dict[str, type]:
    """The LibMTL weighting classes, loaded by path without LibMTL's package __init__."""
    for name in ("LibMTL", "LibMTL.weighting"):
        mod = types.ModuleType(name)
        mod.__path__ = []  # a package, so that submodules can be registered under it
        sys.modules[name] = mod
    classes = {}
    for fname in ("abstract_weighting", "RLW", "GLS", "STCH", "GradNorm", "DB_MTL",
                  "Nash_MTL", "FairGrad"):
        full = f"LibMTL.weighting.{fname}"
        spec = importlib.util.spec_from_file_location(full, os.path.join(src, f"{fname}.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[full] = mod
        spec.loader.exec_module(mod)
        if fname != "abstract_weighting":
            classes[fname] = getattr(mod, fname)
    return classes


def harness(cls: type, k: int, dim: int = D, **attrs):
    """An instance of LibMTL weighting ``cls`` with what its trainer provides."""

    class Harness(cls):
        def __init__(self):
            super().__init__()
            self.task_num, self.device, self.rep_grad, self.epoch = k, "cpu", False, 0
            self.W = torch.nn.Parameter(torch.zeros(dim, dtype=torch.float32))
            for a, v in attrs.items():
                setattr(self, a, v)

        def get_share_params(self):
            return [self.W]

        # LibMTL's is ``encoder.zero_grad()``, which since torch 2.0 sets the gradients to
        # None, after which ``_reset_grad`` (it skips parameters whose grad is None) writes
        # nothing: zero in place, as under torch 1.x, for which LibMTL was written.
        def zero_grad_share_params(self):
            if self.W.grad is not None:
                self.W.grad.zero_()

    h = Harness()
    h.init_param()
    return h


def losses_of(h, G: np.ndarray, c: np.ndarray) -> torch.Tensor:
    """Task losses with value ``c`` and gradient ``G`` w.r.t. the harness's ``W`` (= 0)."""
    Gt, ct = torch.tensor(G, dtype=torch.float32), torch.tensor(c, dtype=torch.float32)
    return Gt @ h.W + ct


def gradient_cases(rng: np.random.Generator) -> dict[str, tuple]:
    """name -> (G [K, D], losses [K], present [K]): conflicting and aligned, K in 2,3,5,8."""
    cases = {}
    for k in (2, 3, 5, 8):
        G = rng.normal(size=(k, D))
        G[1] = -0.8 * G[0] + 0.3 * G[1]  # at least one conflicting pair
        cases[f"conflict{k}"] = (G, rng.uniform(0.2, 3.0, k), np.ones(k, bool))
        common = rng.normal(size=D)
        G = common + 0.3 * rng.normal(size=(k, D))
        G *= rng.uniform(0.3, 3.0, size=(k, 1))  # aligned, unequal norms
        cases[f"aligned{k}"] = (G, rng.uniform(0.2, 3.0, k), np.ones(k, bool))
    G = rng.normal(size=(5, D))
    G[3] = -0.7 * G[0] + 0.2 * G[3]
    present = np.array([True, True, False, True, True])
    cases["absent5"] = (G, rng.uniform(0.2, 3.0, 5), present)
    # small gradients (the scale matters for FairGrad and Nash-MTL)
    cases["small3"] = (1e-3 * rng.normal(size=(3, D)), rng.uniform(0.2, 3.0, 3),
                       np.ones(3, bool))
    return cases


def on_present(fn, G, L, present):
    """``fn`` on the present tasks, with 0 scattered back for the absent ones."""
    out = np.zeros(len(L))
    out[present] = fn(G[present], L[present])
    return out


def record(src: str, out_path: str) -> None:
    torch.set_default_dtype(torch.float32)
    lib = load_libmtl(src)
    rng = np.random.default_rng(0)
    out: dict[str, np.ndarray] = {}

    # ---- RLW: the same draw z gives softmax(z) (LibMTL draws torch.randn(K) first)
    for i, k in enumerate((2, 3, 5, 8)):
        h = harness(lib["RLW"], k)
        c = rng.uniform(0.2, 3.0, k)
        torch.manual_seed(100 + i)
        z = torch.randn(k)
        torch.manual_seed(100 + i)
        losses = torch.tensor(c, dtype=torch.float32, requires_grad=True)
        w = h.backward(losses)
        out[f"rlw/k{k}/z"], out[f"rlw/k{k}/losses"] = z.numpy(), c
        out[f"rlw/k{k}/weights"], out[f"rlw/k{k}/grad"] = w, losses.grad.numpy()

    # ---- GLS: the total and its gradient w.r.t. the losses
    for k in (2, 3, 5, 8):
        h = harness(lib["GLS"], k)
        c = rng.uniform(0.2, 3.0, k)
        losses = torch.tensor(c, dtype=torch.float32, requires_grad=True)
        total = torch.pow(losses.prod(), 1.0 / k)  # GLS.backward's value (it returns none)
        h.backward(losses)
        out[f"gls/k{k}/losses"], out[f"gls/k{k}/total"] = c, total.detach().numpy()
        out[f"gls/k{k}/grad"] = losses.grad.numpy()

    # ---- STCH over a history: 2 steps an epoch, warm-up epoch 1 (epoch 0 warm-up,
    # epoch 1 the nadir's, then STCH), the gradient of its loss w.r.t. the losses
    for k, mu in ((3, 1.0), (5, 0.5)):
        h = harness(lib["STCH"], k)
        hist = rng.uniform(0.2, 3.0, (8, k)) * np.linspace(1.0, 0.4, 8)[:, None]
        grads = []
        for t, c in enumerate(hist):
            h.epoch = t // 2
            losses = torch.tensor(c, dtype=torch.float32, requires_grad=True)
            h.backward(losses, STCH_mu=mu, STCH_warmup_epoch=1)
            grads.append(losses.grad.numpy())
        out[f"stch/k{k}/losses"], out[f"stch/k{k}/grad"] = hist, np.stack(grads)
        out[f"stch/k{k}/mu"], out[f"stch/k{k}/nadir"] = np.float64(mu), h.nadir_vector.numpy()

    # ---- gradient-based, one step on each case
    cases = gradient_cases(rng)
    for name, (G, L, present) in cases.items():
        out[f"cases/{name}/G"], out[f"cases/{name}/losses"] = G, L
        out[f"cases/{name}/present"] = present
    from torchjd.aggregation import FairGrad, NashMTL

    def fairgrad(alpha):
        def fn(G, L):
            Gt = torch.tensor(G, dtype=torch.float32)
            return FairGrad(alpha=alpha).gramian_weighting(Gt @ Gt.T).numpy()
        return fn

    def nash(G, L):
        Gt = torch.tensor(G, dtype=torch.float32)
        return NashMTL(n_tasks=len(L)).weighting(Gt).numpy()

    def nash_unclipped(G, L):
        Gt = torch.tensor(G, dtype=torch.float32)
        return NashMTL(n_tasks=len(L), max_norm=0.0).weighting(Gt).numpy()

    def libmtl_nash(G, L):  # LibMTL's: the gradient after clip_grad_norm_
        h = harness(lib["Nash_MTL"], len(L))
        h.backward(losses_of(h, G, L), update_weights_every=1, optim_niter=20, max_norm=1.0)
        return h.W.grad.numpy()

    for name, (G, L, present) in cases.items():
        for alpha in (1.0, 0.5, 2.0):
            out[f"fairgrad/a{alpha}/{name}/weights"] = on_present(fairgrad(alpha), G, L, present)
        out[f"nashmtl/{name}/weights"] = on_present(nash, G, L, present)
        out[f"nashmtl_unclipped/{name}/weights"] = on_present(nash_unclipped, G, L, present)
        out[f"nashmtl_libmtl/{name}/d"] = libmtl_nash(G[present], L[present])

    # Nash-MTL over a history with update_weights_every=2: steps 1 and 3 reuse the weights
    agg = NashMTL(n_tasks=3, update_weights_every=2)
    hist = np.stack([cases["conflict3"][0] * s for s in (1.0, 0.5, 2.0, 0.7)])
    hist[2] += 0.3 * rng.normal(size=hist[2].shape)
    out["nashmtl_hist/G"] = hist
    out["nashmtl_hist/weights"] = np.stack(
        [agg.weighting(torch.tensor(g, dtype=torch.float32)).numpy() for g in hist])

    # ---- GradNorm over a history: 2 steps an epoch (epoch 0: the plain sum, whose mean
    # losses are L(0)), then GradNorm with alpha 1.5; loss_scale trained by Adam(lr=0.05)
    for k in (3, 5):
        h = harness(lib["GradNorm"], k)
        opt = torch.optim.Adam([h.loss_scale], lr=0.05)
        Gh = rng.normal(size=(6, k, D)) * rng.uniform(0.3, 3.0, size=(1, k, 1))
        Lh = rng.uniform(0.2, 3.0, (6, k)) * np.linspace(1.0, 0.3, 6)[:, None]
        h.train_loss_buffer = np.zeros((k, 3))
        h.train_loss_buffer[:, 0] = Lh[:2].mean(0)
        ds, ws, scales = [], [], []
        for t in range(6):
            h.epoch = t // 2
            opt.zero_grad()
            h.W.grad = None
            w = h.backward(losses_of(h, Gh[t], Lh[t]), alpha=1.5)
            opt.step()
            ds.append(h.W.grad.numpy().copy())
            ws.append(np.asarray(w, np.float64))
            scales.append(h.loss_scale.detach().numpy().copy())
        out[f"gradnorm/k{k}/G"], out[f"gradnorm/k{k}/losses"] = Gh, Lh
        out[f"gradnorm/k{k}/d"], out[f"gradnorm/k{k}/weights"] = np.stack(ds), np.stack(ws)
        out[f"gradnorm/k{k}/loss_scale"] = np.stack(scales)

    # ---- DB-MTL over a history: the combined shared gradient after each step
    for k, beta, sigma in ((3, 0.9, 0.0), (5, 0.9, 0.5)):
        h = harness(lib["DB_MTL"], k)
        Gh = rng.normal(size=(5, k, D)) * rng.uniform(0.3, 3.0, size=(1, k, 1))
        Lh = rng.uniform(0.2, 3.0, (5, k))
        ds = []
        for t in range(5):
            h.W.grad = None
            h.backward(losses_of(h, Gh[t], Lh[t]), DB_beta=beta, DB_beta_sigma=sigma)
            ds.append(h.W.grad.numpy().copy())
        out[f"dbmtl/k{k}/G"], out[f"dbmtl/k{k}/losses"] = Gh, Lh
        out[f"dbmtl/k{k}/d"] = np.stack(ds)
        out[f"dbmtl/k{k}/beta"], out[f"dbmtl/k{k}/sigma"] = np.float64(beta), np.float64(sigma)

    np.savez_compressed(out_path, **{k: np.asarray(v) for k, v in out.items()})
    print(f"wrote {len(out)} arrays to {out_path}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--libmtl-src", required=True, help="directory of LibMTL/weighting/*.py")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "weighting_libmtl.npz"))
    a = p.parse_args()
    record(a.libmtl_src, a.out)

"""Multi-loss weighting, composable with optax and run inside the jitted train step.

``make_weighting(name, num_tasks, **kwargs)`` builds one of

- loss-based (:class:`LossWeighting`): ``static``, ``uncertainty`` (Kendall et al.
  2018), ``dwa`` (Liu et al. 2019), ``famo`` (Liu et al. 2023);
  ``rlw`` (Lin et al. 2022), ``gls`` (Chennupati et al. 2019), ``stch`` (Lin et al.
  2024), each equal to LibMTL's (tests/test_weighting_reference_libmtl.py);
- gradient-based (:class:`GradWeighting`): ``pcgrad`` (Yu et al. 2020), ``mgda``
  (Sener and Koltun 2018), ``cagrad`` (Liu et al. 2021), ``getmtl`` (Chai et al. 2023);
  ``gradnorm`` (Chen et al. 2018), ``nashmtl`` (Navon et al. 2022), ``fairgrad`` (Ban and
  Ji 2024), ``dbmtl`` (Lin et al. 2023), each equal to LibMTL's or torchjd's
  (tests/test_weighting_reference_libmtl.py). ``dbmtl``'s state is an EMA of the
  shared gradients: ``method.init(grads_like=select_shared(params, is_shared))``;
  and the ports of torchjd 0.18's aggregators (:mod:`mtop_jax.weighting.aggregators`,
  tests/test_weighting_reference.py):
  ``upgrad`` (Quinton and Rey 2024), ``dualproj`` (Lopez-Paz and Ranzato 2017),
  ``imtlg`` (Liu et al. 2021), ``alignedmtl`` (Senushkin et al. 2023),
  ``conflictfree`` (ConFIG, Liu et al. 2025), ``gradvac`` (Wang et al. 2021),
  ``graddrop`` (Chen et al. 2020).

A method is an immutable, hashable object holding hyper-parameters only. Its
*state* (``method.init()``) is a dict of jnp arrays, always with an int32
``"step"``: thread it through the step and save it in checkpoints next to the
optimizer state. Everything is jnp (no host callback, no scipy): the min-norm and
CAGrad problems are solved on the K x K Gram matrix with a fixed number of
Frank-Wolfe steps (:mod:`mtop_jax.weighting.min_norm`), UPGrad's and DualProj's
dual-cone QP with fixed active-set and coordinate-descent steps
(:mod:`mtop_jax.weighting.dual_cone`).

Inputs: ``losses: f32[K]``, each task's mean loss over its labelled examples, and
``present: bool[K]``, whether the batch has a labelled example of the task. An
absent task gets weight 0, its loss is never read (it only has to be finite, e.g.
0) and it does not change the state (each class's docstring says how).
``aux["weights"]`` is always each task's effective weight (the coefficient of its
gradient), for logging.

Loss-based, inside ``jax.jit``::

    method = make_weighting("uncertainty", K)           # or "static", "dwa", "famo"
    wstate, wparams = method.init(), method.init_params()   # wparams == {} but for uncertainty
    opt_state = tx.init((params, wparams))

    def loss_fn(params, wparams, batch):
        losses, present = task_losses(params, batch)     # f32[K], bool[K]
        total, aux = method.combine(losses, present, wstate, wparams)
        return total, (losses, present, aux)

    (_, (losses, present, aux)), grads = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(params, wparams, batch)
    updates, opt_state = tx.update(grads, opt_state, (params, wparams))
    params, wparams = optax.apply_updates((params, wparams), updates)
    wstate = method.update(wstate, losses, present)
    # FAMO as in the paper: the same batch's losses after the step (one more forward)
    #   new_losses, new_present = task_losses(params, batch)
    #   wstate = method.update(wstate, losses, present, new_losses=new_losses,
    #                          new_present=new_present)

``uncertainty``'s learned log-variances are ``wparams = {"log_vars": f32[K]}``: the
trainer differentiates them with the model parameters (``argnums=(0, 1)``) and
updates the pair ``(params, wparams)`` with the same optax chain (mask them out of
weight decay, e.g. ``optax.adamw(..., mask=...)``), or with a second optax
transformation of its own. For the other methods ``wparams`` is ``{}`` and costs
nothing.

Gradient-based, inside ``jax.jit``::

    method = make_weighting("cagrad", K)                 # or "pcgrad", "mgda", "getmtl"
    wstate = method.init()

    (losses, present), grads = per_task_grads(task_losses, params, batch, K, has_aux=True)
    # task_losses(params, batch) -> (losses, present); grads: params' tree, leaves [K, ...]
    grad, wstate, aux = combine_grad_tree(method, grads, losses, present, wstate, key,
                                          shared=is_shared)   # e.g. lambda path, leaf: ...
    updates, opt_state = tx.update(grad, opt_state, params)
    params = optax.apply_updates(params, updates)

``key`` only matters for ``pcgrad`` and ``gradvac`` (their random orders) and
``graddrop`` (its uniforms); pass a fresh
``jax.random.fold_in(key, step)`` per step (the trainer folds the step into a key
of ``train.seed``). A flat gradient matrix ``G: [K, D]`` is the one-leaf tree
``{"g": G}``.

Scales: with equal weights ``static`` gives the sum of the task losses,
``uncertainty`` half of it at init (``0.5 exp(-s)``), ``dwa`` the sum (weights sum
to K), ``famo`` a convex combination of the gradients (``c z_k / L_k`` sums to 1),
``pcgrad`` a sum of projected gradients, ``mgda`` a convex combination, ``cagrad``
and ``getmtl`` K times their normalised direction (the authors' "match the sum
loss"). Each follows its paper or reference code.

Scales of the methods checked against LibMTL/torchjd: ``rlw`` a random convex
combination (softmax of a normal draw keyed by ``seed``, the trainer's ``train.seed``,
and the step), ``gls`` the
geometric mean, ``stch`` the sum of log-losses in warm-up then ``K mu logsumexp``,
``gradnorm`` weights summing to K, ``nashmtl`` the Nash solution clipped to
``|d| <= max_norm`` (1), ``fairgrad`` the unnormalised root of ``G G^T w =
w^(-1/alpha)``, ``dbmtl`` buffers rescaled to the largest norm. ``stch`` and
``gradnorm`` count the references' epochs as ``steps_per_epoch`` steps. As in
torchjd, ``upgrad`` the mean of the projected gradients, ``dualproj`` the projected
mean, ``imtlg`` weights summing to 1, ``alignedmtl`` the mean of the aligned
gradients, ``conflictfree`` the sum of the gradients' projections on its direction,
``gradvac`` and ``graddrop`` sums.
"""

from __future__ import annotations

import dataclasses
import numbers

from mtop_jax.errors import ConfigError
from mtop_jax.weighting.aggregators import (
    IMTLG,
    AlignedMTL,
    ConFIG,
    DualProj,
    GradDrop,
    GradVac,
    UPGrad,
    graddrop_direction,
)
from mtop_jax.weighting.balancing import (
    DBMTL,
    FairGrad,
    GradNorm,
    NashMTL,
    alpha_fair_weights,
)
from mtop_jax.weighting.base import (
    Aux,
    GradWeighting,
    LossWeighting,
    Params,
    State,
    Weighting,
    masked_softmax,
)
from mtop_jax.weighting.dual_cone import pinv_psd, project_dual_cone
from mtop_jax.weighting.gradient_based import MGDA, CAGrad, GetMTL, PCGrad, gradient_scales
from mtop_jax.weighting.grads import (
    combine_grad_tree,
    gram_of_tree,
    per_task_grads,
    select_shared,
)
from mtop_jax.weighting.loss_based import DWA, FAMO, GLS, RLW, STCH, Static, Uncertainty
from mtop_jax.weighting.min_norm import cagrad_simplex, min_norm_simplex

#: name -> class, loss-based first
WEIGHTINGS: dict[str, type[Weighting]] = {
    cls.name: cls for cls in (
        Static, Uncertainty, DWA, FAMO,
        RLW, GLS, STCH,
        PCGrad, MGDA, CAGrad, GetMTL,
        GradNorm, NashMTL, FairGrad, DBMTL,
        UPGrad, DualProj, IMTLG, AlignedMTL, ConFIG, GradVac, GradDrop,
    )
}
LOSS_BASED = tuple(n for n, c in WEIGHTINGS.items() if c.kind == "loss")
GRADIENT_BASED = tuple(n for n, c in WEIGHTINGS.items() if c.kind == "grad")


def make_weighting(name: str, num_tasks: int, **kwargs) -> LossWeighting | GradWeighting:
    """The weighting called ``name`` for ``num_tasks`` tasks, with its hyper-parameters.

    ``kwargs`` are the class's fields (e.g. ``weights`` for static, ``temperature``
    for dwa, ``beta``/``gamma``/``optimizer`` for famo, ``c`` for cagrad, ``alpha``
    for getmtl, ``normalization``/``num_iters`` for mgda, ``pref_vector`` for upgrad,
    dualproj, alignedmtl and conflictfree, ``beta`` for gradvac, ``leak`` for
    graddrop). Raises ``ConfigError`` on
    an unknown name or argument.
    """
    cls = weighting_class(name)
    kwargs = check_weighting_kwargs(name, kwargs)
    try:
        return cls(num_tasks=num_tasks, **kwargs)
    except (TypeError, ValueError) as e:  # a value the class's own checks did not expect
        raise ConfigError(f"weighting {cls.name!r}: {e}") from None


def weighting_class(name: str) -> type[Weighting]:
    """The class registered as ``name``; ``ConfigError`` listing the names if none is."""
    cls = WEIGHTINGS.get(str(name).lower())
    if cls is None:
        raise ConfigError(f"weighting: expected one of {tuple(WEIGHTINGS)}, got {name!r}")
    return cls


def check_weighting_kwargs(name: str, kwargs: dict, prefix: str = "weighting") -> dict:
    """``kwargs`` for method ``name``, once each names one of its fields and has its
    default's type (an int field an integer, a float field a number, given back as
    Python ``int``/``float``; ``None`` defaults are left to the class).

    Here rather than in each class so that a typo or a string where a number belongs fails
    when the config is checked, named as ``<prefix>.<field>`` (the trainer passes
    ``weighting.kwargs``), instead of deep in a jitted step.
    """
    cls = weighting_class(name)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "num_tasks"}
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]}: unknown argument of weighting {cls.name!r}; "
                          f"it takes {sorted(fields)}")
    out = dict(kwargs)
    for key, value in kwargs.items():
        default = fields[key].default
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
            out[key] = int(value) if ok else value
        elif isinstance(default, float):
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
            out[key] = float(value) if ok else value
        elif isinstance(default, str):
            ok = isinstance(value, str)
        else:
            ok = True
        if not ok:
            raise ConfigError(f"{prefix}.{key}: expected {type(default).__name__} for "
                              f"weighting {cls.name!r} (default {default!r}), got {value!r}")
    return out


__all__ = [
    "AlignedMTL",
    "Aux",
    "CAGrad",
    "ConFIG",
    "DBMTL",
    "DWA",
    "DualProj",
    "FAMO",
    "FairGrad",
    "GLS",
    "GRADIENT_BASED",
    "GetMTL",
    "GradDrop",
    "GradNorm",
    "GradVac",
    "GradWeighting",
    "IMTLG",
    "LOSS_BASED",
    "LossWeighting",
    "MGDA",
    "NashMTL",
    "PCGrad",
    "Params",
    "RLW",
    "STCH",
    "State",
    "Static",
    "UPGrad",
    "Uncertainty",
    "WEIGHTINGS",
    "Weighting",
    "alpha_fair_weights",
    "cagrad_simplex",
    "check_weighting_kwargs",
    "combine_grad_tree",
    "graddrop_direction",
    "gradient_scales",
    "gram_of_tree",
    "make_weighting",
    "masked_softmax",
    "min_norm_simplex",
    "per_task_grads",
    "pinv_psd",
    "project_dual_cone",
    "select_shared",
    "weighting_class",
]

"""Weightings that only look at the loss values: static, uncertainty, DWA, FAMO.

Each combines ``losses: f32[K]`` (the mean loss of each task over its labelled
examples) into the scalar the trainer differentiates, inside the differentiated
function; the weights themselves carry no gradient (except ``uncertainty``'s
learned log-variances, which are meant to be trained).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax

from mtop_jax.errors import ConfigError
from mtop_jax.weighting.base import (
    LossWeighting,
    Params,
    State,
    masked_softmax,
    num_present,
)


@dataclasses.dataclass(frozen=True)
class Static(LossWeighting):
    """Fixed weights: ``total = sum_k w_k L_k`` over the present tasks.

    ``weights``: one non-negative number per task (default all 1, the plain sum of
    the task losses). Absent tasks contribute nothing; the state is a step counter.
    """

    weights: tuple[float, ...] | None = None
    name: ClassVar[str] = "static"

    def __post_init__(self):
        super().__post_init__()
        if self.weights is not None:
            w = tuple(float(x) for x in self.weights)
            if len(w) != self.num_tasks or min(w) < 0:
                raise ConfigError(
                    f"weighting.weights: expected {self.num_tasks} non-negative numbers, "
                    f"got {self.weights!r}"
                )
            object.__setattr__(self, "weights", w)

    def _combine(self, losses, mask, state, params):
        w = jnp.ones((self.num_tasks,)) if self.weights is None else jnp.asarray(self.weights)
        w = jnp.where(mask, w.astype(jnp.float32), 0.0)
        return jnp.sum(w * losses), {"weights": w}


@dataclasses.dataclass(frozen=True)
class Uncertainty(LossWeighting):
    """Homoscedastic uncertainty weighting (Kendall, Gal and Cipolla, CVPR 2018).

    ``total = sum_k 0.5 exp(-s_k) L_k + 0.5 s_k`` over the present tasks, with
    learned log-variances ``s_k = log sigma_k^2`` (Kendall's regression form
    ``L / (2 sigma^2) + log sigma``, used for every task as in most public
    implementations). For a constant loss L_k the optimum is ``s_k = log L_k``.

    The ``s_k`` are *learned parameters*: ``init_params()`` returns
    ``{"log_vars": f32[K]}`` (``init_log_var``, default 0), which the trainer passes
    as ``params`` to ``combine`` and differentiates and updates with optax like the
    model's parameters (exclude them from weight decay). Absent tasks: neither
    term is counted, so ``s_k`` gets a zero gradient (a momentum optimizer may
    still move it a little). The state is a step counter.
    """

    init_log_var: float = 0.0
    name: ClassVar[str] = "uncertainty"

    def init_params(self, num_tasks: int | None = None) -> Params:
        super().init_params(num_tasks)
        return {"log_vars": jnp.full((self.num_tasks,), self.init_log_var, jnp.float32)}

    def _combine(self, losses, mask, state, params):
        if params is None or "log_vars" not in params:
            raise ConfigError(
                "weighting 'uncertainty': combine() needs params=method.init_params() "
                "(its learned log-variances), trained with the model"
            )
        s = jnp.asarray(params["log_vars"])
        if s.shape != (self.num_tasks,):
            raise ConfigError(
                f"weighting 'uncertainty': log_vars have shape {s.shape}, "
                f"expected ({self.num_tasks},)"
            )
        s = jnp.where(mask, s, 0.0)
        precision = jnp.where(mask, 0.5 * jnp.exp(-s), 0.0)
        total = jnp.sum(precision * losses + jnp.where(mask, 0.5 * s, 0.0))
        return total, {"weights": precision, "log_vars": s}


@dataclasses.dataclass(frozen=True)
class DWA(LossWeighting):
    """Dynamic Weight Average (Liu, Johns and Davison, CVPR 2019, "MTAN").

    ``w_k = K * softmax_k(r_k / T)`` with ``r_k = L_k(t-1) / L_k(t-2)`` the ratio of
    the task's last two recorded losses, ``T = temperature`` (default 2);
    ``total = sum_k w_k L_k``. A "recorded loss" is whatever the trainer passes to
    ``update`` (every step here; the paper records epoch means, which the trainer
    may do instead by calling ``update`` once per epoch with the means).

    Until a task has two recorded losses its ratio is 1, so the weights are
    uniform (all 1) for the first two steps. Absent tasks: weight 0, the softmax
    and the factor K run over the present tasks only (K is their number), and
    ``update`` leaves their history untouched.

    State: ``prev1`` = L(t-1), ``prev2`` = L(t-2) (f32[K]), ``count`` (i32[K],
    recorded losses per task, saturating at 2), ``step``.
    """

    temperature: float = 2.0
    name: ClassVar[str] = "dwa"

    def __post_init__(self):
        super().__post_init__()
        if not self.temperature > 0:
            raise ConfigError(f"weighting.temperature: must be positive, got {self.temperature}")

    def _init_state(self) -> State:
        k = self.num_tasks
        return {
            "prev1": jnp.ones((k,), jnp.float32),
            "prev2": jnp.ones((k,), jnp.float32),
            "count": jnp.zeros((k,), jnp.int32),
        }

    def ratios(self, state: State) -> jax.Array:
        """``r_k = L_k(t-1) / L_k(t-2)``, 1 until the task has two recorded losses."""
        ok = (state["count"] >= 2) & (state["prev2"] > 0)
        return jnp.where(ok, state["prev1"] / jnp.where(ok, state["prev2"], 1.0), 1.0)

    def _combine(self, losses, mask, state, params):
        r = self.ratios(state)
        w = num_present(mask) * masked_softmax(r / self.temperature, mask)
        w = jax.lax.stop_gradient(w)
        return jnp.sum(w * losses), {"weights": w, "ratios": r}

    def _update(self, state, losses, mask, new_losses, new_mask):
        return {
            **state,
            "prev2": jnp.where(mask, state["prev1"], state["prev2"]),
            "prev1": jnp.where(mask, losses.astype(jnp.float32), state["prev1"]),
            "count": jnp.where(mask, jnp.minimum(state["count"] + 1, 2), state["count"]),
        }


@dataclasses.dataclass(frozen=True)
class FAMO(LossWeighting):
    """Fast Adaptive Multitask Optimization (Liu, Liang, Stone and Liu, NeurIPS 2023).

    Algorithm 1 of the paper, with task logits ``xi`` (state ``"logits"``, init 0):

    - ``combine``: ``z = softmax(xi)``, ``D_k = L_k - min_loss_k + 1e-8``,
      ``c = 1 / sum_k (z_k / D_k)`` (no gradient) and ``total = c sum_k z_k log D_k``,
      whose gradient is ``sum_k (c z_k / D_k) grad L_k``: these coefficients
      (``aux["weights"]``) lie on the simplex. ``total`` is a log-loss, not a loss:
      log the raw losses.
    - ``update``: ``delta_k = log D_k(before step) - log D_k(after step)`` (the
      decrease of each log-loss), ``g = J_softmax(xi)^T delta + gamma xi`` and
      ``xi <- xi - beta g``. A task whose loss drops faster loses weight.

    "After the step": pass ``new_losses`` (the same batch's losses recomputed with
    the updated parameters; one extra forward pass, as the paper and its code do).
    Without ``new_losses`` the update uses the losses of the previous ``update``
    call as "before" and ``losses`` as "after" (the change across consecutive
    batches: no extra forward pass, noisier, not the paper's).

    ``optimizer``: ``None`` applies the paper's plain step ``-beta g``; an optax
    transformation (whose state is kept in ``state["opt_state"]``) is fed ``g``
    instead, e.g. ``optax.adam(0.025)`` with ``gamma=0.01`` reproduces the
    authors' code (``torch.optim.Adam(lr=0.025, weight_decay=0.01)``).
    Defaults ``beta=0.025, gamma=0.01`` are the paper's; with the plain step the
    logits move slowly (``delta`` is a per-step change).

    Absent tasks: weight 0 and the softmax runs over the present tasks; in
    ``update`` only tasks present both before and after take part (the
    softmax Jacobian and the decay are restricted to them), so the logits of the
    others do not move.

    State: ``logits`` (f32[K]), ``prev_losses`` (f32[K]) and ``prev_present``
    (bool[K]) for the update without ``new_losses``, ``step`` (and ``opt_state``).
    """

    beta: float = 0.025
    gamma: float = 0.01
    min_losses: tuple[float, ...] | float = 0.0
    optimizer: Any = None  # optax.GradientTransformation | None
    name: ClassVar[str] = "famo"
    needs_losses_after_step: ClassVar[bool] = True  # the paper's update

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.min_losses, (int, float)):
            m = tuple(float(x) for x in self.min_losses)
            if len(m) != self.num_tasks:
                raise ConfigError(
                    f"weighting.min_losses: expected a number or {self.num_tasks} numbers, "
                    f"got {self.min_losses!r}"
                )
            object.__setattr__(self, "min_losses", m)
        if self.optimizer is not None and not isinstance(
            self.optimizer, optax.GradientTransformation
        ):
            raise ConfigError(
                f"weighting.optimizer: expected an optax GradientTransformation or None, "
                f"got {type(self.optimizer).__name__}"
            )

    def _init_state(self) -> State:
        k = self.num_tasks
        logits = jnp.zeros((k,), jnp.float32)
        state: State = {
            "logits": logits,
            "prev_losses": jnp.zeros((k,), jnp.float32),
            "prev_present": jnp.zeros((k,), bool),
        }
        if self.optimizer is not None:
            state["opt_state"] = self.optimizer.init(logits)
        return state

    def _log_gap(self, losses: jax.Array, mask: jax.Array) -> jax.Array:
        """``log(L - min_loss + 1e-8)`` on present tasks (the gap clamped at 0), 0 elsewhere."""
        gap = jnp.maximum(losses - jnp.asarray(self.min_losses, losses.dtype), 0.0) + 1e-8
        return jnp.where(mask, jnp.log(jnp.where(mask, gap, 1.0)), 0.0)

    def _combine(self, losses, mask, state, params):
        z = masked_softmax(state["logits"], mask)
        gap = jnp.maximum(losses - jnp.asarray(self.min_losses, losses.dtype), 0.0) + 1e-8
        inv = jax.lax.stop_gradient(jnp.where(mask, z / gap, 0.0))
        c = 1.0 / jnp.maximum(jnp.sum(inv), 1e-30)
        total = c * jnp.sum(z * self._log_gap(losses, mask))
        return total, {"weights": c * inv, "z": z}

    def _update(self, state, losses, mask, new_losses, new_mask):
        if new_losses is None:  # the change across consecutive update calls
            before, before_mask = state["prev_losses"], state["prev_present"]
            after, after_mask = losses, mask
        else:  # the paper's: the same batch before and after the step
            before, before_mask = losses, mask
            after, after_mask = new_losses, new_mask
        both = before_mask & after_mask
        delta = self._log_gap(before, both) - self._log_gap(after, both)
        xi = state["logits"]
        z = masked_softmax(xi, both)
        g = z * (delta - jnp.sum(z * delta))  # J_softmax(xi)^T delta
        g = jnp.where(both, g + self.gamma * xi, 0.0)
        new_state = dict(state)
        if self.optimizer is None:
            new_state["logits"] = xi - self.beta * g
        else:
            updates, new_state["opt_state"] = self.optimizer.update(g, state["opt_state"], xi)
            new_state["logits"] = xi + jnp.where(both, updates, 0.0)
        new_state["prev_losses"] = after.astype(jnp.float32)
        new_state["prev_present"] = after_mask
        return new_state


def _loss_mean_of_first_epochs(state: State, losses: jax.Array, mask: jax.Array,
                               collect: jax.Array) -> State:
    """Adds the present tasks' losses to ``loss_sum``/``loss_count`` when ``collect`` holds."""
    add = mask & collect
    return {**state,
            "loss_sum": state["loss_sum"] + jnp.where(add, losses.astype(jnp.float32), 0.0),
            "loss_count": state["loss_count"] + add.astype(jnp.int32)}


def _loss_means(state: State) -> jax.Array:
    """Per-task mean of the collected losses; 1 for a task with none collected."""
    n = state["loss_count"]
    return jnp.where(n > 0, state["loss_sum"] / jnp.maximum(n, 1).astype(jnp.float32), 1.0)


@dataclasses.dataclass(frozen=True)
class RLW(LossWeighting):
    """Random Loss Weighting (Lin et al., "Reasonable Effectiveness of Random
    Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022).

    Reference: LibMTL ``LibMTL/weighting/RLW.py`` (its default distribution,
    ``Normal``): every step draws ``z ~ N(0, I_K)`` and ``w = softmax(z)``,
    ``total = sum_k w_k L_k``. Scale: the weights sum to 1 (a random convex
    combination of the losses, so the update is about 1/K of the summed one).

    Randomness without a key argument: the step's draw is
    ``normal(fold_in(key(seed), state["step"]), (K,))`` (``seed``, default 0; the
    trainer passes ``train.seed`` unless ``weighting.kwargs.seed`` is set), so a
    given state always draws the same weights, and a restored checkpoint draws
    what the uninterrupted run would. :meth:`weights_from_draw` is the
    deterministic part (what the reference test compares). Absent tasks: their
    ``z`` is drawn but ignored, the softmax runs over the present tasks. The state
    is a step counter.
    """

    seed: int = 0
    name: ClassVar[str] = "rlw"

    def draw(self, state: State) -> jax.Array:
        """This step's ``z: f32[K]`` (standard normal), a function of ``seed`` and the step."""
        key = jax.random.fold_in(jax.random.key(self.seed), state["step"])
        return jax.random.normal(key, (self.num_tasks,), jnp.float32)

    @staticmethod
    def weights_from_draw(z: jax.Array, mask: jax.Array) -> jax.Array:
        """``softmax(z)`` over the present tasks (the reference's transform of its draw)."""
        return masked_softmax(z, mask)

    def _combine(self, losses, mask, state, params):
        z = self.draw(state)
        w = jax.lax.stop_gradient(self.weights_from_draw(z, mask))
        return jnp.sum(w * losses), {"weights": w, "z": z}


@dataclasses.dataclass(frozen=True)
class GLS(LossWeighting):
    """Geometric Loss Strategy (Chennupati et al., "MultiNet++", CVPR 2019 workshops).

    Reference: LibMTL ``LibMTL/weighting/GLS.py``: ``total = (prod_k L_k)^(1/K)``,
    the geometric mean of the losses, computed here as ``exp(mean_k log L_k)``
    (the same value; no underflow of the product with many small losses; a loss
    is clamped at 1e-30 before the log). Scale: ``d total / d L_k = total / (K L_k)``,
    which is ``aux["weights"]`` (LibMTL returns ``L_k / (K prod L)`` for logging,
    which is not the gradient's coefficient). No hyper-parameters.

    Absent tasks: the mean runs over the present tasks (K is their number). The
    state is a step counter.
    """

    name: ClassVar[str] = "gls"

    def _total(self, losses: jax.Array, mask: jax.Array) -> jax.Array:
        logs = jnp.where(mask, jnp.log(jnp.maximum(jnp.where(mask, losses, 1.0), 1e-30)), 0.0)
        return jnp.exp(jnp.sum(logs) / jnp.maximum(num_present(mask), 1.0)) * jnp.any(mask)

    def _combine(self, losses, mask, state, params):
        total, w = jax.value_and_grad(self._total)(losses, mask)
        return total, {"weights": jnp.where(mask, w, 0.0)}


@dataclasses.dataclass(frozen=True)
class STCH(LossWeighting):
    """Smooth Tchebycheff scalarisation (Lin et al., ICML 2024), for multi-task learning.

    Reference: LibMTL ``LibMTL/weighting/STCH.py`` (from the authors' STCH_MTL
    code), defaults ``mu=1.0``, ``warmup_epoch=4``. In epochs ``e`` (``e = step //
    steps_per_epoch``; the reference counts the trainer's epochs, so set
    ``steps_per_epoch`` to the trainer's epoch length, default 100):

    - ``e < warmup_epochs``: ``total = sum_k log(L_k + 1e-20)``;
    - ``e == warmup_epochs``: the same, and ``update`` averages each task's losses
      over the epoch: the nadir vector ``z_k``;
    - after: ``l_k = log(L_k / z_k + 1e-20)``, ``m = max_k l_k`` (no gradient),
      ``total = K mu log(sum_k exp((l_k - m) / mu))`` (the reference's value,
      ``m`` included; its gradient is ``K`` times a softmax-weighted sum of the
      ``grad L_k / (L_k + 1e-20 z_k)``).

    Scale: ``aux["weights"] = d total / d L_k`` (``1 / L_k`` in warm-up: a sum of
    log-losses). Absent tasks: left out of the sums and the factor K (their
    number), and not averaged into their nadir (a task never seen while it is
    collected has ``z_k = 1``). State: ``loss_sum`` f32[K], ``loss_count`` i32[K]
    (the nadir's running sum), ``step``.
    """

    mu: float = 1.0
    warmup_epochs: int = 4
    steps_per_epoch: int = 100
    name: ClassVar[str] = "stch"

    def __post_init__(self):
        super().__post_init__()
        if not self.mu > 0:
            raise ConfigError(f"weighting.mu: must be positive, got {self.mu}")
        if self.warmup_epochs < 0 or self.steps_per_epoch < 1:
            raise ConfigError("weighting.warmup_epochs must be >= 0 and steps_per_epoch >= 1, "
                              f"got {self.warmup_epochs}, {self.steps_per_epoch}")

    def _init_state(self) -> State:
        k = self.num_tasks
        return {"loss_sum": jnp.zeros((k,), jnp.float32), "loss_count": jnp.zeros((k,), jnp.int32)}

    def epoch(self, state: State) -> jax.Array:
        """The reference's epoch number for this step."""
        return state["step"] // self.steps_per_epoch

    def _total(self, losses, mask, nadir, warm):
        safe = jnp.where(mask, losses, 1.0)
        log_sum = jnp.sum(jnp.where(mask, jnp.log(safe + 1e-20), 0.0))
        ls = jnp.where(mask, jnp.log(safe / nadir + 1e-20), 0.0)
        m = jax.lax.stop_gradient(jnp.max(jnp.where(mask, ls, -jnp.inf)))
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        e = jnp.where(mask, jnp.exp(jnp.where(mask, ls - m, 0.0) / self.mu), 0.0)
        stch = self.mu * jnp.log(jnp.maximum(jnp.sum(e), 1e-30)) * num_present(mask)
        return jnp.where(warm, log_sum, jnp.where(jnp.any(mask), stch, 0.0))

    def _combine(self, losses, mask, state, params):
        warm = self.epoch(state) <= self.warmup_epochs
        nadir = _loss_means(state)
        total, w = jax.value_and_grad(self._total)(losses, mask, nadir, warm)
        return total, {"weights": jnp.where(mask, w, 0.0), "nadir": nadir}

    def _update(self, state, losses, mask, new_losses, new_mask):
        return _loss_mean_of_first_epochs(state, losses, mask,
                                          self.epoch(state) == self.warmup_epochs)

"""The optax optimizer: AdamW with warmup and decay, global-norm clipping, and a
learning-rate multiplier per parameter group (backbone, prompts, pooler, heads).

A group with multiplier 0 is frozen (``optax.set_to_zero``: no moments kept).
The ``prompts`` stage (DESIGN.md section 5) freezes every *shared* parameter,
i.e. every parameter without a leading ``tasks`` axis, so that the tasks train
independently (N prompt-tuning runs in one).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mtop_jax.errors import ConfigError
from mtop_jax.models.axes import is_per_task
from mtop_jax.models.multitask import PARAM_GROUPS, param_group

FROZEN = "frozen"
STAGES = ("full", "prompts")


SCHEDULES = ("linear", "cosine", "constant")


def check_optim_config(cfg: Any, stage: str) -> None:
    """``config.optim`` and ``train.stage``: names and ranges, before anything is built."""
    if stage not in STAGES:
        raise ConfigError(f"train.stage: {stage!r} not in {list(STAGES)}")
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule: {cfg.schedule!r} not in {list(SCHEDULES)}")
    mults = dict(cfg.lr_mult)
    unknown = sorted(set(mults) - set(PARAM_GROUPS))
    if unknown:
        raise ConfigError(f"optim.lr_mult: unknown groups {unknown}; groups are "
                          f"{list(PARAM_GROUPS)}")
    negative = sorted(g for g, m in mults.items() if float(m) < 0)
    if negative:
        raise ConfigError(f"optim.lr_mult: negative multipliers for {negative}")
    if float(cfg.learning_rate) <= 0:
        raise ConfigError(f"optim.learning_rate: must be > 0, got {cfg.learning_rate!r}")


def schedule(cfg: Any, steps: int, peak: float) -> optax.Schedule:
    """Linear warmup to ``peak``, then linear or cosine decay to ``peak * end_factor``."""
    warmup = min(int(cfg.warmup_steps), steps)
    end = peak * float(cfg.end_factor)
    if cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, end, max(steps - warmup, 1))
    elif cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, max(steps - warmup, 1),
                                            alpha=float(cfg.end_factor))
    elif cfg.schedule == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ConfigError(f"optim.schedule: {cfg.schedule!r} not in {list(SCHEDULES)}")
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def param_labels(params: nnx.State, stage: str) -> nnx.State:
    """The optimizer label of every parameter: its group, or ``frozen``."""
    if stage not in STAGES:
        raise ConfigError(f"train.stage: {stage!r} not in {list(STAGES)}")

    def label(path, var) -> str:
        if stage == "prompts" and not is_per_task(var):
            return FROZEN
        return param_group(path)

    flat = nnx.to_flat_state(params)
    return nnx.from_flat_state([(p, v.replace(label(p, v))) for p, v in flat])


def _decay_mask(params: nnx.State) -> nnx.State:
    """Weight decay on matrices only: not on biases, LayerNorm or per-slot vectors."""
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(cfg: Any, steps: int, params: nnx.State, stage: str = "full"
                   ) -> tuple[optax.GradientTransformation, dict[str, optax.Schedule]]:
    """(the optax transformation, the learning-rate schedule of each trained group)."""
    check_optim_config(cfg, stage)
    mults = dict(cfg.lr_mult)
    schedules: dict[str, optax.Schedule] = {}
    transforms: dict[str, optax.GradientTransformation] = {FROZEN: optax.set_to_zero()}
    for group in PARAM_GROUPS:
        mult = float(mults.get(group, 1.0))
        if mult == 0.0:
            transforms[group] = optax.set_to_zero()
            continue
        schedules[group] = schedule(cfg, steps, float(cfg.learning_rate) * mult)
        transforms[group] = optax.adamw(
            schedules[group], b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
            weight_decay=cfg.weight_decay, mask=_decay_mask)
    labels = param_labels(params, stage)
    parts = []
    if cfg.clip_norm:
        # Zero the frozen gradients first (the stage's and the groups with multiplier 0,
        # as frozen_mask), so that they do not count in the clipping norm.
        keep = {k: optax.identity() if k in schedules else optax.set_to_zero()
                for k in transforms}
        parts += [optax.multi_transform(keep, labels),
                  optax.clip_by_global_norm(float(cfg.clip_norm))]
    parts.append(optax.multi_transform(transforms, labels))
    return optax.chain(*parts), schedules


def frozen_mask(params: nnx.State, stage: str, lr_mult: dict[str, float]) -> nnx.State:
    """True for every parameter the optimizer never changes (frozen by the stage, or its
    group's multiplier is 0). The train step takes no gradient of these
    (``steps.make_train_step``'s ``frozen``)."""
    labels = param_labels(params, stage)
    return jax.tree.map(lambda lab: lab == FROZEN or float(lr_mult.get(lab, 1.0)) == 0.0,
                        labels)


def trainable_count(params: nnx.State, stage: str, lr_mult: dict[str, float]) -> int:
    """Number of parameters the optimizer will change."""
    frozen = jax.tree.leaves(frozen_mask(params, stage, lr_mult))
    return int(sum(jnp.size(x) for x, f in zip(jax.tree.leaves(params), frozen, strict=True)
                   if not f))

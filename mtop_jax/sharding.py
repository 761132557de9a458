"""Logical axis names and their mapping onto the device mesh (DESIGN.md section 8).

Model code names the axes of every parameter and activation with the logical
names below and never a mesh axis. A config maps logical names onto the mesh
axes ``data``, ``fsdp`` and ``tensor``; changing the parallelism is a config
change, not a model change (the maxtext pattern).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

# Logical axes used by the model code.
BATCH = "batch"  # examples of a batch
LENGTH = "length"  # token positions
EMBED = "embed"  # hidden width H
HEADS = "heads"  # attention heads (the fused heads * head_dim width of q/k/v)
MLP = "mlp"  # feed-forward width
VOCAB = "vocab"  # vocabulary rows of the word embedding
TASKS = "tasks"  # the leading task axis of prompts, heads, per-task encoders
PROMPTS = "prompts"  # prompt slots P of one task
CLASSES = "classes"  # (padded) classes of a head
LAYERS = "layers"  # encoder layers (deep prompts, prefixes)

MESH_AXES = ("data", "fsdp", "tensor")

#: Default logical -> mesh rules: data parallel over ``data`` and ``fsdp``,
#: parameters sharded over ``fsdp`` on their hidden axis, Megatron-style
#: tensor parallelism over heads and the feed-forward width.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    (BATCH, ("data", "fsdp")),
    (EMBED, "fsdp"),
    (HEADS, "tensor"),
    (MLP, "tensor"),
    (VOCAB, "tensor"),
    (LENGTH, None),
    (TASKS, None),
    (PROMPTS, None),
    (CLASSES, None),
    (LAYERS, None),
)


def param_init(init: nnx.Initializer, *names: str | None) -> nnx.Initializer:
    """Wrap an initializer so that the parameter carries logical axis ``names``.

    Eager sharding is off: models are built unsharded (or abstractly) and then
    placed with ``jax.jit(..., out_shardings=...)`` from these names.
    """
    return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


def logical_axes(var: nnx.Variable) -> tuple[str | None, ...]:
    """The logical axis names a variable was created with (empty if none)."""
    return tuple(var.get_metadata().get("out_sharding") or ())


def is_per_task(var: nnx.Variable) -> bool:
    """True for a variable that belongs to the tasks one by one (leading ``tasks`` axis)."""
    axes = logical_axes(var)
    return bool(axes) and axes[0] == TASKS


def make_mesh(shape: dict[str, int] | Sequence[int], devices: Sequence | None = None) -> Mesh:
    """A mesh over ``data``, ``fsdp``, ``tensor``; one size may be -1 (fill).

    ``shape`` is a mapping axis -> size (missing axes are 1) or a sequence of
    three sizes in ``MESH_AXES`` order.
    """
    from mtop_jax.errors import ConfigError

    devices = list(jax.devices() if devices is None else devices)
    if isinstance(shape, dict):
        unknown = set(shape) - set(MESH_AXES)
        if unknown:
            raise ConfigError(f"mesh: unknown axes {sorted(unknown)}; allowed {list(MESH_AXES)}")
        sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    else:
        sizes = [int(s) for s in shape]
        if len(sizes) != len(MESH_AXES):
            raise ConfigError(f"mesh: expected {len(MESH_AXES)} sizes {MESH_AXES}, got {sizes}")
    if sizes.count(-1) > 1:
        raise ConfigError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ConfigError(
                f"mesh: {len(devices)} devices do not divide by the fixed axes "
                f"{dict(zip(MESH_AXES, sizes))}"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ConfigError(
            f"mesh: {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
            f"have {len(devices)}"
        )
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def state_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.State:
    """NamedShardings for every variable of ``state`` from its logical names."""
    with nnx.logical_axis_rules(rules):
        specs = nnx.get_partition_spec(state)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)


def shard_model(model: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.Module:
    """Place every variable of ``model`` on ``mesh`` by its logical names (in place)."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    nnx.update(model, jax.device_put(state, shardings))
    return model

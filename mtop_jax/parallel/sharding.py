"""The device mesh, and how logical axis names map onto it (DESIGN.md section 8).

Model code names the axes of every parameter with the logical names of
``mtop_jax.models.axes`` and never a mesh axis. A config maps logical names onto
the mesh axes ``data``, ``fsdp`` and ``tensor`` (``config.rules``); changing the
parallelism is a config change, not a model change (the maxtext pattern).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mtop_jax.errors import ConfigError
from mtop_jax.models.axes import (
    BATCH,
    CLASSES,
    EMBED,
    HEADS,
    LAYERS,
    MLP,
    PROMPTS,
    TASKS,
    VOCAB,
)

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
    (TASKS, None),
    (PROMPTS, None),
    (CLASSES, None),
    (LAYERS, None),
)


def make_mesh(shape: dict[str, int] | Sequence[int], devices: Sequence | None = None) -> Mesh:
    """A mesh over ``data``, ``fsdp``, ``tensor``; one size may be -1 (fill).

    ``shape`` is a mapping axis -> size (missing axes are 1) or a sequence of
    three sizes in ``MESH_AXES`` order.
    """
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



def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    """Where a batch's rows go: the leading axis split as the ``batch`` rule says."""
    batch_axes = dict((k, v) for k, v in rules).get(BATCH)
    batch_axes = tuple(batch_axes) if isinstance(batch_axes, list) else batch_axes
    return NamedSharding(mesh, PartitionSpec(batch_axes))


def data_parallel_ways(mesh: Mesh, sharding: NamedSharding) -> int:
    """Into how many parts ``sharding`` splits a batch's rows."""
    spec = sharding.spec[0]
    axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
    return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding,
              keys: Iterable[str]) -> dict[str, jax.Array]:
    """This process's rows of ``keys`` -> global arrays over the mesh (multi-host ready)."""
    return {k: jax.make_array_from_process_local_data(sharding, batch[k]) for k in keys}


def placed(abstract, sharding):
    """``jax.ShapeDtypeStruct`` leaves of ``abstract`` placed by ``sharding`` (one for
    every leaf, or a tree of them like ``abstract``): a restore target."""
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                        abstract, sharding)

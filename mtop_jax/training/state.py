"""The train state and how it is created on the mesh.

``TrainState`` is a plain pytree (a ``flax.struct`` dataclass) so that the
train step is a pure function ``(state, batch) -> (state, metrics)`` that
``jax.jit`` donates, and so that orbax saves and restores it whole. The model's
structure (``nnx.GraphDef``) lives outside it; what rebuilds it is the
:class:`~mtop_jax.models.spec.ModelSpec`.

Both the model and the state are created sharded, the big_vision way: the
abstract model gives the logical shardings and ``jax.jit(init,
out_shardings=...)`` creates every array in place on its devices.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mtop_jax.models.multitask import MultiTaskModel, load_backbone
from mtop_jax.models.spec import ModelSpec
from mtop_jax.parallel.sharding import state_shardings


@struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State  # the model's nnx.Param variables
    rest: nnx.State  # its other variables (dropout RNG streams)
    opt_state: Any
    weighting: Any  # the loss-weighting method's state
    nonfinite_run: jax.Array  # consecutive steps whose loss was not finite (skipped)


def create_model(spec: ModelSpec, mesh: Mesh, rules, *, seed: int,
                 backbone: dict | None = None) -> MultiTaskModel:
    """A model initialised in one compiled program with its params already on ``mesh``
    (one program instead of hundreds of eager initialiser calls), then the pretrained
    ``backbone`` written in if given."""
    create = lambda: MultiTaskModel(spec.encoder, spec.model, spec.head_tasks,
                                    rngs=nnx.Rngs(seed))
    graphdef, abstract = nnx.split(nnx.eval_shape(create))
    shardings = state_shardings(abstract, mesh, rules)
    model = nnx.merge(graphdef, jax.jit(lambda: nnx.state(create()),
                                        out_shardings=shardings)())
    if backbone is not None:
        load_backbone(model, backbone)
    return model


def split_model(model: MultiTaskModel) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, params, the other variables)."""
    return nnx.split(model, nnx.Param, ...)


def create_state(model: MultiTaskModel, tx: optax.GradientTransformation,
                 weighting_state: Any, mesh: Mesh, rules) -> tuple[TrainState, Any]:
    """(the train state on ``mesh``, its shardings) around a (sharded) model."""
    _, params, rest = split_model(model)
    param_sh = state_shardings(params, mesh, rules)
    rest_sh = state_shardings(rest, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())

    def init(params, rest):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                          opt_state=tx.init(params), weighting=weighting_state,
                          nonfinite_run=jnp.zeros((), jnp.int32))

    # Optimizer moments take their parameter's sharding by propagation; every
    # other leaf (counters, the weighting state) is replicated.
    state = jax.jit(init, in_shardings=(param_sh, rest_sh))(params, rest)
    shardings = jax.tree.map(
        lambda x: x.sharding if isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
        else replicated, state)
    shardings = shardings.replace(step=replicated, params=param_sh, rest=rest_sh,
                                  nonfinite_run=replicated)
    state = jax.device_put(state, shardings)
    return state, shardings

"""The train state and how it is created: model, pretrained weights, optimizer,
weighting state, all placed on the mesh by their logical axis names.

``TrainState`` is a plain pytree (a ``flax.struct`` dataclass) so that the
train step is a pure function ``(state, batch) -> (state, metrics)`` that
``jax.jit`` donates, and so that orbax saves and restores it whole. The model's
structure (``nnx.GraphDef``) lives outside it, in :class:`ModelSpec`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mtop_jax.data.tasks import TaskSpec
from mtop_jax.errors import ConfigError, MtopError
from mtop_jax.models import pretrained
from mtop_jax.models.config import PRESETS, EncoderConfig
from mtop_jax.models.multitask import ModelConfig, MultiTaskModel, build_model, load_backbone
from mtop_jax.sharding import state_shardings

FORMAT_VERSION = 1


@struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State  # the model's nnx.Param variables
    rest: nnx.State  # its other variables (dropout RNG streams)
    opt_state: Any
    weighting: Any  # the loss-weighting method's state
    nonfinite_run: jax.Array  # consecutive steps whose loss was not finite (skipped)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything static about a model: enough to rebuild it around saved params."""

    encoder: EncoderConfig
    model: ModelConfig
    tasks: tuple[TaskSpec, ...]

    @property
    def head_tasks(self) -> list[tuple[str, int]]:
        return [(t.name, t.num_classes) for t in self.tasks]

    @property
    def regression(self) -> np.ndarray:
        return np.array([t.is_regression for t in self.tasks])

    def to_json(self) -> str:
        return json.dumps({
            "format_version": FORMAT_VERSION,
            "encoder": self.encoder.to_hf_dict(),
            "model": dataclasses.asdict(self.model),
            "tasks": [t.to_dict() for t in self.tasks],
        }, indent=2)

    @classmethod
    def from_json(cls, text: str, source: str = "model.json") -> ModelSpec:
        try:
            d = json.loads(text)
            version = d.get("format_version")
            if version != FORMAT_VERSION:
                raise MtopError(f"{source}: format_version {version!r}, this mtop-jax reads "
                                f"{FORMAT_VERSION}")
            return cls(encoder=EncoderConfig.from_hf_dict(d["encoder"], source),
                       model=ModelConfig.from_dict(d["model"]),
                       tasks=tuple(TaskSpec.from_dict(t) for t in d["tasks"]))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise MtopError(f"{source}: not a mtop-jax model description ({e})") from None


def resolve_encoder(config: Any, tokenizer: Any) -> tuple[EncoderConfig, dict | None]:
    """(encoder config, pretrained params or None) for ``config.encoder``."""
    source = config.encoder
    if source.startswith("random:"):
        preset = source.split(":", 1)[1]
        if preset not in PRESETS:
            raise ConfigError(f"config.encoder: unknown preset {preset!r}; "
                              f"presets are {sorted(PRESETS)}")
        return PRESETS[preset].replace(vocab_size=len(tokenizer)), None
    model_dir = pretrained.resolve_model_dir(source)
    cfg = pretrained.load_config(model_dir)
    return cfg, pretrained.encoder_params(cfg, pretrained.read_safetensors(model_dir),
                                          source=str(model_dir))


def load_tokenizer(config: Any):
    source = config.tokenizer or config.encoder
    if source.startswith("random:"):
        source = pretrained.DEFAULT_MODEL
    return pretrained.load_tokenizer(source)


def create_model(spec: ModelSpec, mesh: Mesh, rules, *, seed: int,
                 backbone: dict | None = None) -> MultiTaskModel:
    """A model with its params on ``mesh`` (and the pretrained backbone if given)."""
    model = build_model(spec.encoder, spec.model, spec.head_tasks, seed=seed, mesh=mesh,
                        rules=rules)
    if backbone is not None:
        load_backbone(model, backbone)
    return model


def split_model(model: MultiTaskModel) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
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


def write_model_files(workdir: Path, spec: ModelSpec, tokenizer: Any, config_json: str) -> None:
    """``model.json``, ``config.json`` and ``tokenizer/`` in the workdir (atomically)."""
    import tempfile

    from mtop_jax.files import as_path, atomic_write_text, is_remote

    workdir = as_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(workdir / "model.json", spec.to_json())
    atomic_write_text(workdir / "config.json", config_json)
    tok_dir = workdir / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file():
        return
    if is_remote(workdir):  # save_pretrained writes local files: save, then copy them up
        with tempfile.TemporaryDirectory() as local:
            tokenizer.save_pretrained(local)
            tok_dir.mkdir(parents=True, exist_ok=True)
            names = sorted(p.name for p in Path(local).iterdir())  # tokenizer.json last
            names.sort(key=lambda name: name == "tokenizer.json")
            for name in names:
                (tok_dir / name).write_bytes((Path(local) / name).read_bytes())
        return
    tmp = workdir / "tokenizer.tmp"
    tokenizer.save_pretrained(str(tmp))
    tmp.replace(tok_dir)


def read_model_spec(workdir: Path) -> ModelSpec:
    from mtop_jax.files import as_path

    path = as_path(workdir) / "model.json"
    if not path.is_file():
        raise MtopError(f"{workdir}: not a mtop-jax workdir or model (no model.json)")
    return ModelSpec.from_json(path.read_text(), source=str(path))

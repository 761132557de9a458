"""``ModelSpec``: everything static about a trained model, saved as ``model.json``.

A workdir and an exported model directory both hold one; with the saved
parameters it rebuilds the model anywhere (``mtop_jax.load``, ``mtop-jax eval``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtop_jax.data.tasks import TaskSpec, output_scales
from mtop_jax.errors import MtopError
from mtop_jax.models.config import EncoderConfig
from mtop_jax.models.multitask import ModelConfig, MultiTaskModel

FORMAT_VERSION = 1
MODEL_FILE = "model.json"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Encoder config, model config and task specs: enough to rebuild a model around
    saved parameters."""

    encoder: EncoderConfig
    model: ModelConfig
    tasks: tuple[TaskSpec, ...]

    @property
    def head_tasks(self) -> list[tuple[str, int]]:
        """(name, number of classes) per task, as the heads are built."""
        return [(t.name, t.num_classes) for t in self.tasks]

    @property
    def regression(self) -> np.ndarray:
        """bool [N]: which tasks are regression tasks."""
        return np.array([t.is_regression for t in self.tasks])

    @property
    def output_scales(self) -> tuple[np.ndarray, np.ndarray]:
        """(target_mean [N], target_std [N]): a regression head's output * std + mean is
        its prediction (``TaskSpec.value``)."""
        return output_scales(self.tasks)

    def to_json(self) -> str:
        return json.dumps({
            "format_version": FORMAT_VERSION,
            "encoder": self.encoder.to_hf_dict(),
            "model": dataclasses.asdict(self.model),
            "tasks": [t.to_dict() for t in self.tasks],
        }, indent=2)

    @classmethod
    def from_json(cls, text: str, source: str = MODEL_FILE) -> ModelSpec:
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


def read_model_spec(directory: str | Path) -> ModelSpec:
    """The ``model.json`` of a workdir or an exported model."""
    from mtop_jax.files import as_path

    path = as_path(directory) / MODEL_FILE
    if not path.is_file():
        raise MtopError(f"{directory}: not a mtop-jax workdir or model (no {MODEL_FILE})")
    return ModelSpec.from_json(path.read_text(), source=str(path))


def abstract_model(spec: ModelSpec, *, eval_mode: bool = False) -> MultiTaskModel:
    """The model's structure and shapes with no memory allocated (``nnx.eval_shape``)."""
    model = nnx.eval_shape(lambda: MultiTaskModel(spec.encoder, spec.model, spec.head_tasks,
                                                  rngs=nnx.Rngs(0)))
    if eval_mode:
        model.eval()
    return model


def placeholder_rest(abstract_rest: nnx.State) -> nnx.State:
    """Values for the non-parameter variables (dropout RNG streams, unused in eval mode),
    so that a model can be evaluated from its parameters alone."""

    def make(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.split(jax.random.key(0), x.shape) if x.shape else jax.random.key(0)
        return jnp.zeros(x.shape, x.dtype)

    return jax.tree.map(make, abstract_rest)

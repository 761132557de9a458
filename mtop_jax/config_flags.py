"""Load ``configs/*.py`` files the big_vision way.

``--config configs/glue.py:mode=shared,steps=100`` imports the file and calls
its ``get_config(arg)`` with the text after the colon; ``--config.a.b=value``
then overrides single fields. Values are parsed as Python literals where they
can be (``3``, ``0.1``, ``True``, ``(64, 128)``, ``None``) and as strings
otherwise; a field must exist, and a new value must have the field's type.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from mtop_jax.errors import ConfigError


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """``path.py`` or ``path.py:arg`` -> the ConfigDict its ``get_config`` returns."""
    path, _, arg = spec.partition(":")
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config: {path} is not a file")
    module_spec = importlib.util.spec_from_file_location(f"mtop_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # a broken config file: name it, keep the cause
        raise ConfigError(f"{path}: could not be imported ({type(e).__name__}: {e})") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: defines no get_config()")
    takes_arg = bool(inspect.signature(module.get_config).parameters)
    if arg and not takes_arg:
        raise ConfigError(f"{path}: get_config() takes no argument, got ':{arg}'")
    config = module.get_config(arg or None) if takes_arg else module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict")
    return config


def parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Set ``config.<key>`` (dotted) from its command-line text."""
    *parents, leaf = key.split(".")
    node = config
    for i, part in enumerate(parents):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            where = ".".join(parents[:i]) or "config"
            known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            raise ConfigError(f"--config.{key}: {where} has no field {part!r}; known {known}")
        node = node[part]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        where = ".".join(parents) or "config"
        known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise ConfigError(f"--config.{key}: {where} has no field {leaf!r}; known {known}")
    value = parse_value(text)
    current = node[leaf]
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if current is not None and isinstance(value, str) and not isinstance(current, str):
        raise ConfigError(f"--config.{key}: {text!r} is not a {type(current).__name__}")
    try:
        node[leaf] = value
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"--config.{key}: {text!r} does not fit the field's type "
            f"{type(current).__name__} ({e})") from None


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The config of ``spec`` with ``--config.a.b=v`` style ``overrides`` applied."""
    config = load_config_file(spec)
    for item in overrides:
        if not item.startswith("--config."):
            raise ConfigError(f"unrecognised argument {item!r}; overrides look like "
                              "--config.train.steps=100")
        body = item[len("--config."):]
        key, sep, text = body.partition("=")
        if not sep:
            raise ConfigError(f"{item}: expected --config.{key}=VALUE")
        apply_override(config, key, text)
    return config

"""Load ``configs/*.py`` files the big_vision way.

``--config configs/glue.py:mode=shared,steps=100`` imports the file and calls
its ``get_config(arg)`` with the text after the colon, which the file reads
with :func:`parse_arg` into the options it declares (a bare word sets its
first option: ``configs/glue.py:shared``). ``--config.a.b=value`` then
overrides single fields. Values are parsed as Python literals where they can
be (``3``, ``0.1``, ``True``, ``(64, 128)``, ``None``); a ``str`` field takes
the raw text. A field must exist, and a new value must have the field's type;
only ``weighting.kwargs`` takes new keys (the method's hyper-parameters).
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
    try:
        config = module.get_config(arg or None) if takes_arg else module.get_config()
    except ConfigError as e:  # a bad ':arg': name the file it was given to
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict")
    return config


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _from_text(text: str, current: Any) -> Any:
    """The value ``text`` stands for in a field whose value is ``current``: a ``str``
    field takes the raw text; otherwise a Python literal, an int becoming a float for a
    float field and a list a tuple for a tuple field."""
    if isinstance(current, str):
        return text
    value = parse_value(text)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    return value


def _typed(text: str, default: Any, where: str) -> Any:
    """``text`` as a value of ``default``'s type (bools also as true/false, yes/no, 1/0)."""
    if isinstance(default, bool):
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ConfigError(f"{where}: {text!r} is not a bool (true/false)")
    value = _from_text(text, default)
    if default is not None and type(value) is not type(default):
        raise ConfigError(f"{where}: {text!r} is not a {type(default).__name__}")
    return value


def parse_arg(arg: str | None, **options: Any) -> ml_collections.ConfigDict:
    """A config file's argument ``"key=value,key2=value2"`` -> its ``options``.

    ``options`` are the keys the file accepts, with their defaults (which fix the
    types). A bare word sets the first option (``"shared"`` is ``"mode=shared"``
    when ``mode`` comes first), or turns on a ``bool`` option of that name.
    Unknown keys and values of the wrong type raise :class:`ConfigError`.
    """
    out = ml_collections.ConfigDict(dict(options))
    names = list(options)
    for i, item in enumerate(x.strip() for x in (arg or "").split(",")):
        if not item:
            continue
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            if isinstance(options.get(key), bool):
                out[key] = True
                continue
            if i > 0 or not names:
                raise ConfigError(f"config arg {item!r}: expected key=value; keys are {names}")
            key, text = names[0], item
        if key not in options:
            raise ConfigError(f"config arg {key!r}: unknown; this config takes {names}")
        out[key] = _typed(text.strip(), options[key], f"config arg {key}")
    return out


def parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


#: Sections whose keys are not fixed by ``base_config``: an override may add a key there
#: (``--config.weighting.kwargs.beta=0.1``); the method's own fields are checked when
#: the config is (``mtop_jax.training.setup.build_weighting``).
OPEN_SECTIONS = ("weighting.kwargs",)


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
    if ".".join(parents) in OPEN_SECTIONS and isinstance(node, ml_collections.ConfigDict) \
            and leaf not in node:
        node[leaf] = parse_value(text)  # checked by its consumer (make_weighting)
        return
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        where = ".".join(parents) or "config"
        known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise ConfigError(f"--config.{key}: {where} has no field {leaf!r}; known {known}")
    current = node[leaf]
    value = _from_text(text, current)  # '--config.tokenizer=123' is "123", not 123
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

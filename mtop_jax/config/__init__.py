"""Configs: every field with its default (``defaults``), and ``configs/*.py`` files
with their command-line overrides (``loading``)."""

from mtop_jax.config.defaults import base_config, check_config
from mtop_jax.config.loading import load_config, parse_arg

__all__ = ["base_config", "check_config", "load_config", "parse_arg"]

"""Serving a trained model (DESIGN.md section 10): ``load`` and the :class:`Predictor`
(``predictor``), model directories and StableHLO (``export``), adding and removing
tasks (``task_edit``), and the HTTP server ``mtop-jax serve`` (``server``, with its
``batcher``, request ``schema`` and ``metrics``; needs the ``serve`` extra)."""

from mtop_jax.serving.predictor import Predictor, load

__all__ = ["Predictor", "load"]

"""mtop-jax: one-forward-pass multi-task text classification (MTOP) in JAX/Flax NNX."""

__version__ = "0.1.0"


def load(path, **kwargs):
    """A predictor from a training workdir or an exported model (``mtop_jax.serving.load``)."""
    from mtop_jax.serving.predictor import load as _load

    return _load(path, **kwargs)

"""A tiny random-weight MTOP model on a slice of the demo data: for tests and smoke runs.

    mtop-jax train --config configs/tiny.py --workdir /tmp/tiny

Runs in well under a minute on a 2-core CPU. The arg switches the mode:
``configs/tiny.py:shared`` (or ``prefix``, ``single``), and sets the steps and
seed: ``configs/tiny.py:mode=shared,steps=4,seed=1``.
"""

from mtop_jax.config import base_config, parse_arg
from mtop_jax.data.demo import debian_packages_config


def get_config(arg: str | None = None):
    """``arg``: ``mode=<mtop|shared|prefix|single>,steps=N,seed=S`` (a bare word is the mode)."""
    arg = parse_arg(arg, mode="mtop", steps=12, seed=0)
    c = base_config()
    c.encoder = "random:tiny"  # a 2-layer, 64-wide BERT with the MiniLM tokenizer's vocab
    c.model.mode = arg.mode
    c.model.num_prompts = 2
    c.data = debian_packages_config()
    c.data.max_examples = 256
    c.data.max_length = 32
    c.data.buckets = None
    c.data.batch_size = 16
    c.data.eval_batch_size = 32
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 2
    c.train.steps = arg.steps
    c.train.seed = arg.seed
    c.train.log_every = 4
    c.train.eval_every = 6
    c.train.checkpoint_every = 6
    c.train.async_checkpointing = True
    c.predict_examples = 2
    return c

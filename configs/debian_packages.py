"""The demo: MTOP on the embedded debian-packages set, offline MiniLM weights, 2-core CPU.

    make demo
    # = mtop-jax train --config configs/debian_packages.py --workdir workdirs/demo

Four tasks of one package description (section 41 classes, role 8,
implemented_in 6, interface 3; sparse labels) served by one forward pass.
The arg picks the mode for the baselines with the same budget:
``configs/debian_packages.py:shared``, ``:single``, ``:prefix``.

Result (this config, 2-core CPU): see the README's "Results" section, which
gives the exact figures with the commands that produced them.
"""

from mtop_jax.data.demo import debian_packages_config
from mtop_jax.defaults import base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.encoder = "all-MiniLM-L6-v2"
    c.model.mode = arg or "mtop"
    c.model.num_prompts = 4
    c.model.prompt_depth = "input"
    c.model.pooler = "conditional"

    c.data = debian_packages_config()
    c.data.max_length = 48  # the synopsis and the start of the description
    c.data.buckets = (32, 48)
    c.data.batch_size = 32
    c.data.eval_batch_size = 128

    c.optim.learning_rate = 2e-4
    c.optim.lr_mult.prompts = 10.0
    c.optim.lr_mult.heads = 10.0
    c.optim.lr_mult.pooler = 10.0
    c.optim.warmup_steps = 20
    c.optim.schedule = "linear"

    c.train.steps = 250  # one epoch of the 8,000 training texts
    c.train.log_every = 25
    c.train.eval_every = 125
    c.train.checkpoint_every = 125
    c.train.best_metric = "score"
    c.predict_examples = 3
    return c

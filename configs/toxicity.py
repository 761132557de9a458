"""One comment, six toxicity subtypes: TFDS ``wikipedia_toxicity_subtypes``, same-text
multi-task (every example labelled for all six tasks), for TPU/GPU.

    mtop-jax train --config configs/toxicity.py --workdir gs://BUCKET/mtop-toxicity
    mtop-jax train --config configs/toxicity.py:single --workdir ...   # six encoders

Needs ``pip install -e '.[tfds]'`` and the TFDS download (internet).

Result: not run yet (no accelerator and no internet on the development
machine); the note will give the command and figures when it is.
"""

from mtop_jax.config import base_config, parse_arg


def get_config(arg: str | None = None):
    """``arg``: ``mode=<mtop|shared|prefix|single>,steps=N,seed=S`` (a bare word is the mode)."""
    arg = parse_arg(arg, mode="mtop", steps=10000, seed=0)
    c = base_config()
    c.encoder = "google-bert/bert-base-uncased"
    c.model.mode = arg.mode
    c.model.num_prompts = 4
    c.model.dtype = "bfloat16"

    c.data.source = "tfds"
    c.data.name = "wikipedia_toxicity_subtypes"
    c.data.splits = {"train": "train[:95%]", "validation": "train[95%:]", "test": "test"}
    c.data.max_length = 256
    c.data.buckets = (64, 128, 256)
    c.data.batch_size = 128
    c.data.eval_batch_size = 512
    c.data.mixing = "proportional"
    c.data.seed = 0
    c.data.cache = True
    c.data.cache_dir = ""
    c.data.max_examples = None

    c.optim.learning_rate = 3e-5
    c.optim.lr_mult.prompts = 20.0
    c.optim.lr_mult.heads = 20.0
    c.optim.warmup_steps = 500

    c.train.steps = arg.steps
    c.train.seed = arg.seed
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    c.train.best_metric = "score"
    return c

"""The paper's GLUE multi-task setting: BERT-base, all nine tasks, one model, for TPU/GPU.

    mtop-jax train --config configs/glue.py --workdir gs://BUCKET/mtop-glue
    mtop-jax train --config configs/glue.py:shared --workdir ...   # the MT-DNN baseline

GLUE is a heterogeneous mixture: every example is labelled for its own task
only, so batches mix sources (``data.mixing``: temperature sampling here) and
losses skip missing labels. Validation is GLUE's dev sets (MNLI: matched).
Needs ``pip install -e '.[tfds]'`` and the TFDS GLUE download (internet).

Result: not run yet (no accelerator and no internet on the development
machine); the note will give the command and figures when it is.
"""

from mtop_jax.config import base_config, parse_arg


def get_config(arg: str | None = None):
    """``arg``: ``mode=<mtop|shared|prefix|single>,steps=N,seed=S`` (a bare word is the mode)."""
    arg = parse_arg(arg, mode="mtop", steps=30000, seed=0)
    c = base_config()
    c.encoder = "google-bert/bert-base-uncased"
    c.model.mode = arg.mode
    c.model.num_prompts = 8
    c.model.prompt_depth = "deep"
    c.model.dtype = "bfloat16"

    c.data.source = "tfds"
    c.data.name = "glue"
    c.data.splits = {"train": "train", "validation": "validation", "test": "validation"}
    c.data.max_length = 128
    c.data.buckets = (64, 128)
    c.data.batch_size = 256
    c.data.eval_batch_size = 512
    c.data.mixing = "temperature"
    c.data.temperature = 2.0
    c.data.seed = 0
    c.data.cache = True
    c.data.cache_dir = ""
    c.data.max_examples = None

    c.optim.learning_rate = 5e-5
    c.optim.lr_mult.prompts = 20.0
    c.optim.lr_mult.heads = 20.0
    c.optim.lr_mult.pooler = 1.0
    c.optim.warmup_steps = 1000
    c.optim.schedule = "linear"

    c.train.steps = arg.steps
    c.train.seed = arg.seed
    c.train.log_every = 100
    c.train.eval_every = 2000
    c.train.checkpoint_every = 2000
    c.train.test_split = ""
    c.mesh.data = -1
    return c

"""The demo: MTOP on the embedded debian-packages set, offline MiniLM weights, 2-core CPU.

    make demo
    # = mtop-jax train --config configs/debian_packages.py --workdir workdirs/demo

Four tasks of one package description (section 41 classes, role 8,
implemented_in 6, interface 3; sparse labels) served by one forward pass.
The arg picks the mode for the baselines with the same budget:
``configs/debian_packages.py:shared``, ``:single``, ``:prefix``; and the
steps and seed: ``configs/debian_packages.py:mode=shared,steps=100,seed=1``.

Results (``benchmarks/quality.py``; benchmarks/README.md has the commands, per-task
tables, the validation split and the ablation behind the recipe). ``full`` (three epochs,
750 steps, about 28 min a run on this 2-core CPU), seeds 0, 1, 2, test:

    mode    section  role   implemented_in  interface  mean acc
    mtop    0.774    0.864  0.840           0.775      0.813 +- 0.003
    shared  0.779    0.857  0.840           0.767      0.811 +- 0.007
    TF-IDF + logistic regression (same run)            0.758

Validation 0.836 +- 0.005 against 0.830 +- 0.005. The demo's 1,000 test texts resolve
about 1.7 points on a mean of four (paired 95% interval of `mtop` - `shared`: -1.0 to
+1.5 points); on ``debian-packages-dev`` (3,000 test texts, the same budget)
`mtop` 0.871 +- 0.004, `shared` 0.861 +- 0.003, TF-IDF 0.844. ``make demo`` (one
epoch, about 10 min): `mtop` 0.797 +- 0.007, `shared` 0.806 +- 0.011.
"""

from mtop_jax.config import base_config, parse_arg
from mtop_jax.data.demo import debian_packages_config


def get_config(arg: str | None = None):
    """``arg``: ``mode=<mtop|shared|prefix|single>,steps=N,seed=S,full`` (a bare word is
    the mode, or ``full``: three epochs instead of one)."""
    arg = parse_arg(arg, mode="mtop", steps=0, seed=0, full=False)
    c = base_config()
    c.encoder = "all-MiniLM-L6-v2"
    c.model.mode = arg.mode
    # One prompt token per task: P=4 was no better (benchmarks/README.md, third part), and
    # each prompt token adds a query row per task to every layer.
    c.model.num_prompts = 1
    # Deep: each task adds its own offset to its prompt state before every layer. With the
    # prompt at the input only, MiniLM's upper layers erased the tasks' differences (3e-5 of
    # the texts' after layer 6: every task read one vector, i.e. `shared`);
    # benchmarks/README.md, "Why mtop equalled shared".
    c.model.prompt_depth = "deep"
    # Each task reads the text through its first prompt, which starts as a copy of [CLS]
    # (init.prompts below): at step 0 every task sees what `shared`'s [CLS] sees.
    c.model.pooler = "prompt"

    c.data = debian_packages_config()
    # 82% of the texts are longer than 48 tokens (median 79): length 48 cut off most of
    # the description and cost 4-7 points on section and role (benchmarks/README.md).
    c.data.max_length = 128
    c.data.buckets = (32, 64, 96, 128)
    # Batches drawn from groups of 16 batches sorted by length hold texts of similar
    # length, so most pad to a bucket below 128.
    c.data.length_groups = 16
    c.data.batch_size = 32
    c.data.eval_batch_size = 128

    c.optim.learning_rate = 2e-4
    c.optim.lr_mult.prompts = 10.0
    c.optim.lr_mult.heads = 10.0
    c.optim.lr_mult.pooler = 10.0
    c.optim.warmup_steps = 20
    c.optim.schedule = "linear"

    # 250 steps: one epoch of the 8,000 training texts (make demo, ~10 min here); full:
    # three epochs (~28 min), where both task sets' validation curves flatten.
    c.train.steps = arg.steps or (750 if arg.full else 250)
    # Sparse labels: a task's loss summed over its labelled rows / sqrt(its labelled rows
    # x the batch's rows), so a task with 2 labels in a batch of 32 weighs 1/4 of
    # `section` with 32: "labelled" (weight 1) let sparse tasks' noise crowd out the dense
    # ones, "batch" (2/32) starved them (benchmarks/README.md, the ablation).
    c.train.task_loss = "sqrt"
    c.init.prompts = "cls"
    c.train.seed = arg.seed
    c.train.log_every = 25
    c.train.eval_every = 125
    c.train.checkpoint_every = 125
    c.train.best_metric = "score"
    c.predict_examples = 3
    return c

"""The full set of config fields, with defaults. ``configs/*.py`` start from here.

Every field a config may set exists in :func:`base_config`; a config or an
override that names anything else is rejected before any compile
(:func:`check_config`). ``data`` is the data pipeline's own section
(``mtop_jax.data.pipeline``) and is checked there.
"""

from __future__ import annotations

import ml_collections

from mtop_jax.errors import ConfigError
from mtop_jax.parallel.sharding import DEFAULT_RULES


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Pretrained encoder: 'all-MiniLM-L6-v2', a local HF directory, an org/name on the
    # hub, or 'random:<preset>' (tiny, minilm, bert-base, bert-large) for random weights.
    c.encoder = "all-MiniLM-L6-v2"
    c.tokenizer = ""  # "": the encoder's own; needed for 'random:' encoders

    c.model = ml_collections.ConfigDict(dict(
        mode="mtop", num_prompts=4, prompt_depth="input", pooler="conditional",
        attention="fast", prefix_mlp_hidden=0, dtype="float32"))

    c.data = ml_collections.ConfigDict()  # filled by each config (mtop_jax.data.pipeline)

    c.optim = ml_collections.ConfigDict(dict(
        learning_rate=5e-5, schedule="linear", warmup_steps=0, end_factor=0.0,
        weight_decay=0.01, clip_norm=1.0, b1=0.9, b2=0.999, eps=1e-8,
        # Learning-rate multiplier per parameter group; 0 freezes the group.
        lr_mult=ml_collections.ConfigDict(dict(backbone=1.0, prompts=1.0, pooler=1.0,
                                               heads=1.0))))

    c.weighting = ml_collections.ConfigDict(dict(
        method="static",
        weights=ml_collections.config_dict.placeholder(tuple),  # static: one per task
        kwargs=ml_collections.ConfigDict(),  # method-specific options (mtop_jax.weighting)
        learning_rate=1e-2))  # Adam for learned weighting parameters (uncertainty)

    c.train = ml_collections.ConfigDict(dict(
        steps=1000,
        stage="full",  # "prompts": only per-task parameters train (DESIGN.md section 5)
        seed=0,
        log_every=20,
        eval_every=200,
        eval_split="validation",
        test_split="test",  # evaluated once at the end ("" to skip)
        checkpoint_every=200,
        keep_checkpoints=2,  # the last k, plus the best by best_metric
        best_metric="score",  # an eval metric name; "score" is the tasks' average
        async_checkpointing=True,
        max_nonfinite_steps=3,  # stop after this many non-finite losses in a row
        # A task's loss: "labelled", the mean over its labelled rows of the batch (each
        # task weighs the same); "batch", their sum over the batch's rows (a sparse
        # task weighs by its share of labels). mtop_jax.training.losses.
        task_loss="labelled",
    ))

    c.init = ml_collections.ConfigDict(dict(
        params_from="",  # a workdir: start every parameter from its latest checkpoint
        tasks_from=ml_collections.ConfigDict(),  # task -> workdir trained on it alone
        # mtop's prompts start "random" (normal 0.02), or as the "cls" token plus that
        # noise (mtop_jax.models.prompts.TaskPrompts.start_from_token).
        prompts="random",
    ))

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.rules = [list(r) if isinstance(r[1], tuple) else r for r in DEFAULT_RULES]
    c.predict_examples = 3  # texts the demo predicts at the end
    return c


def check_config(config: ml_collections.ConfigDict) -> None:
    """Reject fields that :func:`base_config` does not have (typos), naming them."""

    def walk(got, ref, prefix):
        for key in got:
            path = f"{prefix}.{key}" if prefix else key
            if key not in ref:
                raise ConfigError(f"config.{path}: unknown field; {prefix or 'config'} has "
                                  f"{sorted(ref.keys())}")
            if prefix == "" and key in ("data",):
                continue
            if path in ("init.tasks_from", "weighting.kwargs"):
                continue
            if isinstance(ref[key], ml_collections.ConfigDict):
                if not isinstance(got[key], ml_collections.ConfigDict):
                    raise ConfigError(f"config.{path}: expected a section, got {got[key]!r}")
                walk(got[key], ref[key], path)

    walk(config, base_config(), "")

"""Everything a run is built from, in one place: config checks, mesh, tokenizer,
model (created sharded), optimizer, weighting, train state and the jitted steps.

``check_before_data`` runs every config check that needs no data: ``train``
calls it first, so a mistake fails in a second, before any file is read or
anything compiled. ``setup`` then builds a :class:`Run`; the trainer, the
benchmarks and the tests take their train and eval steps from it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
from jax.sharding import Mesh, NamedSharding

from mtop_jax.config.defaults import check_config
from mtop_jax.errors import ConfigError
from mtop_jax.files import as_path
from mtop_jax.models import pretrained
from mtop_jax.models.config import PRESETS, EncoderConfig
from mtop_jax.models.multitask import ModelConfig
from mtop_jax.models.prompts import PROMPT_INITS
from mtop_jax.models.spec import ModelSpec
from mtop_jax.parallel.sharding import batch_sharding, data_parallel_ways, make_mesh
from mtop_jax.training import optim
from mtop_jax.training.losses import NORMALIZE
from mtop_jax.training.state import TrainState, create_model, create_state, split_model
from mtop_jax.training.steps import (
    jit_eval_step,
    jit_train_step,
    shared_mask,
    weighting_optimizer,
)
from mtop_jax.weighting import (
    GradWeighting,
    LossWeighting,
    check_weighting_kwargs,
    make_weighting,
    select_shared,
    weighting_class,
)


@dataclasses.dataclass
class Run:
    """What ``train`` and the benchmarks build from a config."""

    config: ml_collections.ConfigDict
    mesh: Mesh
    rules: list
    data_sharding: NamedSharding
    tokenizer: Any
    spec: ModelSpec
    state: TrainState
    state_shardings: TrainState
    train_graphdef: Any
    eval_graphdef: Any
    tx: Any
    schedules: dict
    weighting: LossWeighting | GradWeighting
    weighting_tx: Any
    train_step: Any  # jitted (state, batch) -> (state, metrics), the state donated
    eval_step: Any  # jitted (params, rest, batch) -> predictions, loss sums, counts


# ---------------------------------------------------------------------------- checks


def checked_mesh(config: Any, devices=None) -> tuple[Mesh, list, NamedSharding]:
    """(mesh, logical axis rules, batch sharding), once the mesh fits the devices and the
    batch divides over it."""
    mesh = make_mesh(dict(config.mesh), devices)
    rules = [(k, tuple(v) if isinstance(v, list) else v) for k, v in config.rules]
    data_sharding = batch_sharding(mesh, rules)
    ways = data_parallel_ways(mesh, data_sharding)
    for key in ("batch_size", "eval_batch_size"):
        size = config.data.get(key) or config.data.batch_size
        if size % ways:
            raise ConfigError(f"data.{key}={size} does not divide over the {ways} data-parallel "
                              f"devices of mesh {dict(mesh.shape)}")
    return mesh, rules, data_sharding


def build_weighting(cfg: ml_collections.ConfigDict, num_tasks: int, *, seed: int = 0
                    ) -> LossWeighting | GradWeighting:
    """``config.weighting`` -> a method of ``mtop_jax.weighting``.

    ``seed`` (``train.seed``) goes to a method with a ``seed`` field (rlw's draws) unless
    ``weighting.kwargs.seed`` sets one, so that runs with different train seeds draw
    different weights, as they draw different orders for pcgrad and gradvac.
    """
    kwargs = check_weighting_kwargs(cfg.method, dict(cfg.kwargs), prefix="weighting.kwargs")
    if "seed" in {f.name for f in dataclasses.fields(weighting_class(cfg.method))}:
        kwargs.setdefault("seed", int(seed))
    if cfg.weights is not None:
        if cfg.method != "static":
            raise ConfigError(f"weighting.weights: only for method 'static', not {cfg.method!r}")
        if len(cfg.weights) != num_tasks:
            raise ConfigError(f"weighting.weights: {len(cfg.weights)} weights for "
                              f"{num_tasks} tasks")
        kwargs["weights"] = tuple(float(w) for w in cfg.weights)
    return make_weighting(cfg.method, num_tasks, **kwargs)


def _configured_task_count(config: Any) -> int | None:
    tasks = config.data.get("tasks")
    if isinstance(tasks, (ml_collections.ConfigDict, dict, list, tuple)) and len(tasks):
        return len(tasks)
    return None


def check_before_data(config: ml_collections.ConfigDict, devices=None) -> None:
    """Every check that needs no data: field names, model, optimizer, stage, weighting,
    encoder preset, mesh against devices and batch. Raises :class:`ConfigError`."""
    check_config(config)
    ModelConfig.from_dict(dict(config.model))
    optim.check_optim_config(config.optim, config.train.stage)
    for key in ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                "max_nonfinite_steps"):
        value = config.train[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"train.{key}: expected a positive integer, got {value!r}")
    num_tasks = _configured_task_count(config)
    if num_tasks is None:  # tasks known only once the data is read: the method's own checks
        num_tasks = len(config.weighting.weights) if config.weighting.weights else 2
    build_weighting(config.weighting, num_tasks, seed=config.train.seed)
    if config.init.prompts not in PROMPT_INITS:
        raise ConfigError(f"init.prompts: expected one of {list(PROMPT_INITS)}, got "
                          f"{config.init.prompts!r}")
    if config.train.task_loss not in NORMALIZE:
        raise ConfigError(f"train.task_loss: expected one of {list(NORMALIZE)}, got "
                          f"{config.train.task_loss!r}")
    random_preset(config.encoder)
    checked_mesh(config, devices)


# ---------------------------------------------------------------------------- pieces


def load_tokenizer(config: Any):
    """The tokenizer of ``config.tokenizer``, else of the encoder (MiniLM's for random ones)."""
    source = config.tokenizer or config.encoder
    if source.startswith("random:"):
        source = pretrained.DEFAULT_MODEL
    return pretrained.load_tokenizer(source)


def random_preset(source: str) -> EncoderConfig | None:
    """The preset of a ``random:<preset>`` encoder (None for pretrained ones)."""
    if not source.startswith("random:"):
        return None
    preset = source.split(":", 1)[1]
    if preset not in PRESETS:
        raise ConfigError(f"config.encoder: unknown preset {preset!r}; "
                          f"presets are {sorted(PRESETS)}")
    return PRESETS[preset]


def resolve_encoder(config: Any, tokenizer: Any) -> tuple[EncoderConfig, dict | None]:
    """(encoder config, pretrained params or None) for ``config.encoder``."""
    source = config.encoder
    preset = random_preset(source)
    if preset is not None:
        return preset.replace(vocab_size=len(tokenizer)), None
    model_dir = pretrained.resolve_model_dir(source)
    cfg = pretrained.load_config(model_dir)
    return cfg, pretrained.encoder_params(cfg, pretrained.read_safetensors(model_dir),
                                          source=str(model_dir))


def init_from(config: Any, spec: ModelSpec, model, tokenizer=None) -> None:
    """``init.prompts``, then ``init.params_from`` (all params) and ``init.tasks_from``
    (per-task params), which overwrite it."""
    from mtop_jax.training.transfer import copy_params_from, copy_task_params_from

    if config.init.prompts == "cls" and spec.model.mode == "mtop":
        model.prompts.start_from_token(model.encoder.embeddings, tokenizer.cls_token_id)
    if config.init.params_from:
        copy_params_from(model, as_path(config.init.params_from))
    for task, source in dict(config.init.tasks_from).items():
        copy_task_params_from(model, spec, task, as_path(source))


# ---------------------------------------------------------------------------- setup


def setup(config: ml_collections.ConfigDict, tasks, tokenizer, *, devices=None) -> Run:
    """Mesh (over ``devices``, default all), model (created sharded, pretrained weights
    and ``init.*`` written in), optimizer, train state and the jitted steps."""
    tcfg = config.train
    mesh, rules, data_sharding = checked_mesh(config, devices)
    weighting = build_weighting(config.weighting, len(tasks), seed=tcfg.seed)
    encoder_cfg, backbone = resolve_encoder(config, tokenizer)
    spec = ModelSpec(encoder=encoder_cfg, model=ModelConfig.from_dict(dict(config.model)),
                     tasks=tuple(tasks))
    model = create_model(spec, mesh, rules, seed=tcfg.seed, backbone=backbone)
    init_from(config, spec, model, tokenizer)
    model.train()
    train_graphdef, params, _ = split_model(model)
    model.eval()
    eval_graphdef, _, _ = split_model(model)
    tx, schedules = optim.make_optimizer(config.optim, tcfg.steps, params, tcfg.stage)
    weighting_tx = weighting_optimizer(config.weighting.learning_rate)
    wparams = weighting.init_params() if weighting.kind == "loss" else {}
    if weighting.kind == "grad" and weighting.needs_grad_buffer:  # dbmtl's gradient buffers
        wstate = weighting.init(grads_like=select_shared(params, shared_mask(params)))
    else:
        wstate = weighting.init()
    weighting_state = {"state": wstate, "params": wparams,
                       "opt": weighting_tx.init(wparams)}
    state, state_shardings = create_state(model, tx, weighting_state, mesh, rules)
    train_step = jit_train_step(train_graphdef, tx, weighting, spec.regression, weighting_tx,
                                seed=tcfg.seed, state_shardings=state_shardings,
                                data_sharding=data_sharding, task_loss=tcfg.task_loss,
                                output_scales=spec.output_scales,
                                frozen=optim.frozen_mask(params, tcfg.stage,
                                                         dict(config.optim.lr_mult)))
    eval_step = jit_eval_step(eval_graphdef, spec.regression,
                              param_shardings=state_shardings.params,
                              rest_shardings=state_shardings.rest, data_sharding=data_sharding,
                              output_scales=spec.output_scales)
    return Run(config, mesh, rules, data_sharding, tokenizer, spec, state, state_shardings,
               train_graphdef, eval_graphdef, tx, schedules, weighting, weighting_tx,
               train_step, eval_step)

"""The MTOP model and its baselines: DESIGN.md section 3's invariants and the modes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from model_helpers import TINY, assert_fast_equals_dense, make_model, make_tasks, shard_model

from mtop_jax.errors import ConfigError
from mtop_jax.models import pretrained
from mtop_jax.models.heads import MASKED_LOGIT
from mtop_jax.models.multitask import (
    MODES,
    PARAM_GROUPS,
    ModelConfig,
    MultiTaskModel,
    load_backbone,
    param_group,
    param_labels,
    params_per_task,
)
from mtop_jax.parallel.sharding import DEFAULT_RULES, state_shardings

#: `single` (N encoders, 13-18 s a test here) in make test-all; the other modes in make test.
MODES_SINGLE_SLOW = [pytest.param(m, marks=pytest.mark.slow) if m == "single" else m
                     for m in MODES]


def make_batch(batch=3, length=12, seed=0, vocab=TINY.vocab_size):
    rng = np.random.RandomState(seed)
    ids = rng.randint(1, vocab, (batch, length)).astype(np.int32)
    lengths = np.linspace(length, 3, batch).astype(int)  # row 0 full, the others padded
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    ids = ids * mask
    return jnp.asarray(ids), jnp.asarray(mask)


# ------------------------------------------------------------------ fast == dense


# Every pair of (tasks, prompts, depth) values occurs in `make test`; `make test-all` runs
# the whole 3 x 2 x 2 grid.
PAIRWISE = {(1, 1, "input"), (1, 4, "deep"), (3, 1, "deep"), (3, 4, "input"), (8, 1, "input"),
            (8, 4, "deep")}


@pytest.mark.parametrize("num_tasks, num_prompts, depth", [
    pytest.param(n, p, d, marks=() if (n, p, d) in PAIRWISE else pytest.mark.slow)
    for n in (1, 3, 8) for p in (1, 4) for d in ("input", "deep")])
def test_fast_path_equals_dense_reference(num_tasks, num_prompts, depth):
    fast = make_model(num_tasks, num_prompts=num_prompts, prompt_depth=depth)
    assert_fast_equals_dense(fast, *make_batch())


def test_dense_mask_structure():
    from mtop_jax.models.prompt_attention import block_mask

    mask = block_mask(jnp.array([[1, 1, 0]]), num_tasks=2, num_prompts=2)[0]
    expected = np.array([
        # keys: x0 x1 x2(pad) t0 t0 t1 t1
        [1, 1, 0, 0, 0, 0, 0],  # input queries
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 0, 1, 1, 0, 0],  # task 0 prompts
        [1, 1, 0, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 1, 1],  # task 1 prompts
        [1, 1, 0, 0, 0, 1, 1],
    ], bool)
    np.testing.assert_array_equal(mask, expected)


# ------------------------------------------------------------------ I1 and I2


@pytest.mark.parametrize("depth", ["input", "deep"])
def test_I1_input_states_do_not_depend_on_tasks(depth):
    full = make_model(5, prompt_depth=depth)
    ids, mask = make_batch()
    states = jax.jit(lambda m, i, k: m.mtop_states(i, k)[0])
    x_full = states(full, ids, mask)
    for subset in (["task2"], ["task4", "task0"], ["task1", "task2", "task3"]):
        np.testing.assert_array_equal(states(full.select_tasks(subset), ids, mask), x_full)


@pytest.mark.parametrize("pooler", ["conditional", "prompt"])
def test_I1_adding_a_task_leaves_other_logits_bit_identical(pooler):
    full = make_model(4, pooler=pooler, prompt_depth="deep")
    fewer = full.select_tasks(["task0", "task1", "task2"])
    ids, mask = make_batch()
    out_full = jax.jit(lambda m, i, k: m(i, k))(full, ids, mask)
    out_fewer = jax.jit(lambda m, i, k: m(i, k))(fewer, ids, mask)
    for name in out_fewer:
        np.testing.assert_array_equal(out_fewer[name], out_full[name], err_msg=name)


@pytest.mark.parametrize("mode", MODES_SINGLE_SLOW)
def test_I2_task_alone_equals_task_among_all(mode):
    full = make_model(4, mode=mode, prompt_depth="deep")
    ids, mask = make_batch()
    out_full = jax.jit(lambda m, i, k: m(i, k))(full, ids, mask)
    for name in full.task_names:
        alone = jax.jit(lambda m, i, k: m(i, k))(full.select_tasks([name]), ids, mask)
        np.testing.assert_allclose(alone[name], out_full[name], atol=1e-5, rtol=0,
                                   err_msg=name)


# ------------------------------------------------------------------ I3: cost


def compiled_flops(model: MultiTaskModel, batch: int, length: int) -> float:
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, i, k: nnx.merge(graphdef, s).logits(i, k))
    cost = fn.lower(state, ids, ids).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def abstract_model(n, **kw) -> MultiTaskModel:
    return nnx.eval_shape(lambda: MultiTaskModel(TINY, ModelConfig(**kw), make_tasks(n),
                                                 rngs=nnx.Rngs(0)))


def test_I3_cost_is_linear_in_tasks_at_about_P_tokens_per_task():
    batch, length, num_prompts = 2, 32, 4
    flops = {n: compiled_flops(abstract_model(n, num_prompts=num_prompts), batch, length)
             for n in (1, 8, 32)}
    slope_low = (flops[8] - flops[1]) / 7
    slope_high = (flops[32] - flops[8]) / 24
    # No (N P)^2 term: the cost per added task is the same at N = 1..8 and 8..32.
    assert slope_high == pytest.approx(slope_low, rel=0.01)
    # One more task costs about P tokens of encoder work (plus its pooler and head).
    shared = compiled_flops(abstract_model(1, mode="shared"), batch, length)
    per_token = shared / (batch * length)
    ratio = slope_low / (batch * num_prompts * per_token)
    assert 0.9 < ratio < 1.3, ratio
    # The input part is one plain pass: at N = 1 mtop costs shared + about one task.
    assert flops[1] == pytest.approx(shared + slope_low, rel=0.05)


def test_dense_reference_is_quadratic_so_the_cost_test_can_fail():
    batch, length = 2, 32
    flops = {n: compiled_flops(abstract_model(n, attention="dense"), batch, length)
             for n in (1, 8, 32)}
    assert (flops[32] - flops[8]) / 24 > 1.3 * (flops[8] - flops[1]) / 7


# ------------------------------------------------------------------ meshes


@pytest.mark.parametrize("mode", MODES_SINGLE_SLOW)
def test_every_mode_same_outputs_on_1_and_8_devices(mode, devices):
    from mtop_jax.parallel.sharding import make_mesh

    ids, mask = make_batch(batch=4)
    outputs = []
    for mesh in (make_mesh({"data": 1}, devices[:1]), make_mesh({"data": 2, "tensor": 4})):
        m = make_model(3, mode=mode, prompt_depth="deep", mesh=mesh)
        graphdef, state = nnx.split(m)
        batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
        fn = jax.jit(lambda s, i, k, g=graphdef: nnx.merge(g, s).logits(i, k),
                     in_shardings=(state_shardings(state, mesh), batch_sharding, batch_sharding),
                     out_shardings=batch_sharding)
        out = fn(state, jax.device_put(ids, batch_sharding), jax.device_put(mask, batch_sharding))
        assert len(out.sharding.device_set) == mesh.size
        outputs.append(np.asarray(out))
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-5, rtol=0)


def test_tensor_parallel_params_are_really_sharded(devices):
    from mtop_jax.parallel.sharding import make_mesh

    mesh = make_mesh({"data": 2, "tensor": 4})
    m = shard_model(make_model(3), mesh)
    kernel = m.encoder.layers[0].ffn.intermediate.kernel.get_value()
    assert kernel.sharding.spec == PartitionSpec("fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (TINY.hidden_size,
                                                        TINY.intermediate_size // 4)


# ------------------------------------------------------------------ heads, groups, config


def test_padded_classes_are_masked_and_dict_output_has_task_widths():
    model = make_model(4)
    ids, mask = make_batch()
    padded = model.logits(ids, mask)
    widths = [c for _, c in model.tasks]
    assert padded.shape == (3, 4, max(widths))
    for t, c in enumerate(widths):
        assert np.all(np.asarray(padded[:, t, c:]) == MASKED_LOGIT)
        assert np.all(np.asarray(padded[:, t, :c]) > MASKED_LOGIT / 2)
    out = model(ids, mask)
    assert {k: v.shape for k, v in out.items()} == {n: (3, c) for n, c in model.tasks}


@pytest.mark.parametrize("mode", MODES)
def test_param_groups_cover_every_parameter(mode):
    model = make_model(2, mode=mode, prefix_mlp_hidden=16 if mode == "prefix" else 0)
    labels = jax.tree.leaves(param_labels(model))
    assert set(labels) <= set(PARAM_GROUPS)
    expected = {"mtop": set(PARAM_GROUPS), "prefix": set(PARAM_GROUPS),
                "shared": {"backbone", "pooler", "heads"},
                "single": {"backbone", "pooler", "heads"}}[mode]
    assert set(labels) == expected
    assert param_group(("encoder", "pooler", "dense", "kernel")) == "pooler"
    assert param_group(("encoder", "layers", 0, "ffn", "output", "kernel")) == "backbone"


def test_prefix_mlp_reparameterisation_runs_and_is_per_task():
    model = make_model(3, mode="prefix", prefix_mlp_hidden=16)
    ids, mask = make_batch()
    full = model(ids, mask)
    alone = model.select_tasks(["task1"])(ids, mask)
    np.testing.assert_allclose(alone["task1"], full["task1"], atol=1e-5)


def test_config_and_task_errors():
    with pytest.raises(ConfigError, match="model.mode: 'bogus'"):
        ModelConfig(mode="bogus")
    with pytest.raises(ConfigError, match="unknown keys"):
        ModelConfig.from_dict({"mode": "mtop", "promts": 3})
    with pytest.raises(ConfigError, match="unknown tasks"):
        make_model(2).select_tasks(["nope"])
    with pytest.raises(ConfigError, match="duplicate task names"):
        MultiTaskModel(TINY, ModelConfig(), [("a", 2), ("a", 3)], rngs=nnx.Rngs(0))


# ------------------------------------------------------------------ real weights


@functools.lru_cache(maxsize=1)
def minilm_params():
    model_dir = pretrained.default_model_dir()
    cfg = pretrained.load_config(model_dir)
    return cfg, pretrained.encoder_params(cfg, pretrained.read_safetensors(model_dir))


def test_mtop_input_states_equal_the_bare_pretrained_encoder():
    cfg, params = minilm_params()
    encoder, _ = pretrained.load_encoder()
    model = MultiTaskModel(cfg, ModelConfig(num_prompts=4, prompt_depth="deep"),
                           make_tasks(3), rngs=nnx.Rngs(0))
    load_backbone(model, params)
    model.eval()
    tok = pretrained.load_tokenizer()
    batch = tok(["a package of shared libraries for parsing XML", "a game"],
                padding="max_length", max_length=16, return_tensors="np")
    ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    x, _ = jax.jit(lambda m, i, k: m.mtop_states(i, k))(model, ids, mask)
    hidden, _ = jax.jit(lambda e, i, k: e(i, k))(encoder, ids, mask)
    np.testing.assert_array_equal(x, hidden)


def test_create_model_creates_params_already_sharded(devices):
    from mtop_jax.data.tasks import TaskSpec
    from mtop_jax.models.spec import ModelSpec
    from mtop_jax.parallel.sharding import make_mesh
    from mtop_jax.training.state import create_model

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    tasks = tuple(TaskSpec(name, labels=tuple(f"c{i}" for i in range(c)))
                  for name, c in make_tasks(2))
    model = create_model(ModelSpec(TINY, ModelConfig(), tasks), mesh, DEFAULT_RULES, seed=0)
    kernel = model.encoder.layers[0].attention.query.kernel.get_value()
    assert kernel.sharding.spec == PartitionSpec("fsdp", "tensor")
    prompts = model.prompts.embedding.get_value()
    assert prompts.sharding.spec == PartitionSpec(None, None, "fsdp")
    eager = MultiTaskModel(TINY, ModelConfig(), make_tasks(2), rngs=nnx.Rngs(0))
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                    jax.tree.leaves(nnx.state(eager, nnx.Param)), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-7, rtol=0)  # same draws, ulp rounding


def test_params_per_task_counts_what_one_more_task_adds():
    h, p = TINY.hidden_size, 4
    model = abstract_model(2, num_prompts=p)  # tasks of 2 and 3 classes: heads padded to 3
    assert params_per_task(model) == p * h + h + (h * 3 + 3)  # prompts, query, head


def test_prompts_started_from_cls_enter_layer_0_as_the_cls_token_does():
    """``init.prompts=cls``: with the random part zeroed, every task's every prompt
    enters layer 0 exactly as the input's [CLS] at position 0 does; with it, the slots
    and tasks stay apart (else they would get identical gradients)."""
    model = make_model(3, num_prompts=2)
    cls_id = 101
    ids = jnp.array([[cls_id, 7, 8]])
    cls_state = model.encoder.embeddings(ids)[0, 0]
    before = model.prompts.embedding[...]
    model.prompts.start_from_token(model.encoder.embeddings, cls_id)
    states = model.prompts.initial_states(model.encoder.embeddings, 1)[0]  # [N, P, H]
    assert float(jnp.abs(states - cls_state).max()) > 1e-2  # the random part is kept
    assert float(jnp.abs(states[0, 0] - states[0, 1]).max()) > 1e-2
    np.testing.assert_allclose(model.prompts.embedding[...] - before,
                               jnp.broadcast_to(model.prompts.embedding[...][0, 0] - before[0, 0],
                                                before.shape), atol=1e-6)
    model.prompts.embedding[...] = jnp.zeros_like(before)
    model.prompts.slot_position[...] = jnp.zeros_like(model.prompts.slot_position[...])
    model.prompts.start_from_token(model.encoder.embeddings, cls_id)
    states = model.prompts.initial_states(model.encoder.embeddings, 1)[0]
    np.testing.assert_allclose(states, jnp.broadcast_to(cls_state, states.shape), atol=1e-5)


def test_prompt_dropout_is_drawn_for_every_row():
    """In training, each row's prompts get their own dropout mask, as its tokens do."""
    model = make_model(2, num_prompts=2)
    model.train()
    states = model.prompts.initial_states(model.encoder.embeddings, 4)  # [B, N, P, H]
    dropped = states == 0
    assert dropped.any() and not (dropped[0] == dropped[1]).all()
    model.eval()
    states = model.prompts.initial_states(model.encoder.embeddings, 4)
    np.testing.assert_array_equal(states[0], states[3])

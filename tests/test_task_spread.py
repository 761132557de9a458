"""Task spread: how far apart the tasks' prompt states are, layer by layer
(``mtop_jax.models.task_spread``): the check that mtop's prompts condition anything."""

import jax.numpy as jnp
import numpy as np
import pytest
from model_helpers import TINY, make_model
from test_multitask import make_batch

from mtop_jax.errors import ConfigError
from mtop_jax.models.task_spread import spread, task_spread


def test_spread_is_std_across_tasks_over_std_across_texts():
    texts = np.array([[0.0], [2.0]])  # [B=2, H=1]: std across texts 1
    same = np.broadcast_to(texts[:, None], (2, 3, 1))  # every task reads the same vector
    assert spread(same) == 0.0
    apart = same + np.array([[[-0.5], [0.0], [0.5]]])  # tasks differ by std sqrt(1/6)
    assert spread(apart) == pytest.approx(np.sqrt(1 / 6))


def test_equal_prompts_give_zero_spread_and_the_trace_leaves_outputs_alone():
    model = make_model(3, pooler="prompt")
    ids, mask = make_batch(batch=4)
    got = task_spread(model, ids, mask)
    assert len(got["layers"]) == TINY.num_layers  # after each layer
    assert all(s > 0 for s in got["layers"])
    # the traced pass pools what the model's own forward pools
    assert got["features"] == pytest.approx(spread(model.features(ids, mask)), rel=1e-6)

    emb = model.prompts.embedding[...]
    model.prompts.embedding[...] = jnp.broadcast_to(emb[:1], emb.shape)
    got = task_spread(model, ids, mask)
    assert got["layers"] == [0.0] * TINY.num_layers and got["features"] == 0.0
    # the conditional pooler's task queries pool the same states apart
    conditional = make_model(3, pooler="conditional")
    emb = conditional.prompts.embedding[...]
    conditional.prompts.embedding[...] = jnp.broadcast_to(emb[:1], emb.shape)
    got = task_spread(conditional, ids, mask)
    assert got["layers"] == [0.0] * TINY.num_layers and got["features"] > 0


def test_deep_offsets_condition_the_layer_they_enter():
    """Tasks equal but for the last layer's deep offset: apart only after that layer."""
    model = make_model(3, prompt_depth="deep", pooler="prompt")
    emb = model.prompts.embedding[...]
    model.prompts.embedding[...] = jnp.broadcast_to(emb[:1], emb.shape)
    offset = model.prompts.deep_offset[...]
    model.prompts.deep_offset[...] = offset.at[:, :-1].set(offset[:1, :-1])
    got = task_spread(model, *make_batch(batch=4))
    assert got["layers"][:-1] == [0.0] * (TINY.num_layers - 1)
    assert got["layers"][-1] > 0 and got["features"] > 0


def test_task_spread_errors_name_the_field():
    ids, mask = make_batch(batch=4)
    with pytest.raises(ConfigError, match="model.mode.*'shared'"):
        task_spread(make_model(3, mode="shared"), ids, mask)
    with pytest.raises(ConfigError, match="two tasks and two texts, got 3 and 1"):
        task_spread(make_model(3), ids[:1], mask[:1])

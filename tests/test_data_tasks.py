"""Task specs: label indexing, validation, saving with the model, merging sources."""

import numpy as np
import pytest

from mtop_jax.data.tasks import (
    TaskSpec,
    load_task_specs,
    merge_task_specs,
    save_task_specs,
    task_specs_from_json,
)
from mtop_jax.errors import ConfigError, DataError


def test_classification_and_regression_specs():
    t = TaskSpec("section", "classification", ("libs", "net", "games"))
    assert t.num_classes == 3 and not t.is_regression
    assert t.index("net") == 1
    r = TaskSpec("stsb", "regression")
    assert r.num_classes == 1 and r.is_regression and r.labels == ()


def test_unknown_label_lists_the_allowed_ones():
    t = TaskSpec("role", "classification", ("program", "shared-lib"))
    with pytest.raises(DataError, match=r"'daemon'.*\['program', 'shared-lib'\]"):
        t.index("daemon")


@pytest.mark.parametrize("kwargs", [
    {"name": ""},
    {"name": "t", "kind": "ranking", "labels": ("a",)},
    {"name": "t", "kind": "classification", "labels": ()},
    {"name": "t", "kind": "classification", "labels": ("a", "a")},
    {"name": "t", "kind": "regression", "labels": ("a",)},
    {"name": "t", "kind": "classification", "labels": (1, 2)},
    {"name": "t", "kind": "regression", "target_std": 0.0},
    {"name": "t", "kind": "regression", "target_mean": float("nan")},
    {"name": "t", "kind": "classification", "labels": ("a",), "target_mean": 2.0},
])
def test_invalid_specs(kwargs):
    with pytest.raises(ConfigError):
        TaskSpec(**kwargs)


def test_save_and_load_round_trip(tmp_path):
    specs = (TaskSpec("section", labels=("libs", "net")),
             TaskSpec("stsb", "regression", target_mean=2.5, target_std=1.5))
    save_task_specs(specs, tmp_path / "tasks.json")
    assert load_task_specs(tmp_path / "tasks.json") == specs


def test_regression_standardisation():
    """Mean and sd of the finite targets; a constant or one-value target keeps sd 1; a
    spec written before standardisation existed reads as mean 0, sd 1 (raw units)."""
    t = TaskSpec("size", "regression").standardized(np.array([1.0, 3.0, np.nan, 5.0]))
    assert (t.target_mean, t.target_std) == pytest.approx((3.0, np.sqrt(8 / 3)))
    assert t.value(0.5) == pytest.approx(3.0 + 0.5 * np.sqrt(8 / 3))
    assert TaskSpec("c", "regression").standardized(np.array([2.0, 2.0])).target_std == 1.0
    assert TaskSpec("c", "regression").standardized(np.array([2.0])).target_mean == 0.0
    old = task_specs_from_json('{"tasks": [{"name": "stsb", "kind": "regression"}]}')[0]
    assert (old.target_mean, old.target_std) == (0.0, 1.0)
    assert "target_mean" not in TaskSpec("a", labels=("x",)).to_dict()


def test_load_rejects_a_broken_file(tmp_path):
    (tmp_path / "tasks.json").write_text('{"tasks": [{"kind": "classification"}]')
    with pytest.raises(DataError, match="tasks.json"):
        load_task_specs(tmp_path / "tasks.json")
    with pytest.raises(DataError):
        load_task_specs(tmp_path / "absent.json")
    with pytest.raises(ConfigError, match="unique"):
        task_specs_from_json('{"tasks": [{"name": "a", "kind": "regression"},'
                             ' {"name": "a", "kind": "regression"}]}')


def test_merge_unions_sources_in_first_seen_order():
    a = (TaskSpec("sentiment", labels=("neg", "pos")), TaskSpec("topic", labels=("x",)))
    b = (TaskSpec("sentiment", labels=("neg", "pos", "neutral")), TaskSpec("stsb", "regression"))
    merged = merge_task_specs([a, b])
    assert [t.name for t in merged] == ["sentiment", "topic", "stsb"]
    assert merged[0].labels == ("neg", "pos", "neutral")
    with pytest.raises(ConfigError, match="regression"):
        merge_task_specs([a, (TaskSpec("topic", "regression"),)])

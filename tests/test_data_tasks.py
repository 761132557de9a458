"""Task specs: label indexing, validation, saving with the model, merging sources."""

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
])
def test_invalid_specs(kwargs):
    with pytest.raises(ConfigError):
        TaskSpec(**kwargs)


def test_save_and_load_round_trip(tmp_path):
    specs = (TaskSpec("section", labels=("libs", "net")), TaskSpec("stsb", "regression"))
    save_task_specs(specs, tmp_path / "tasks.json")
    assert load_task_specs(tmp_path / "tasks.json") == specs


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

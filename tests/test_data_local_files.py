"""Local JSONL/CSV sources: the demo set, sparse labels, and every kind of bad input."""

import contextlib
import csv
import functools
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtop_jax.data.demo import DEBIAN_PACKAGES_DIR, DEBIAN_PACKAGES_LABELS, debian_packages_config
from mtop_jax.data.local_files import load_local, read_examples
from mtop_jax.data.tasks import TaskSpec
from mtop_jax.data.tokenization import tokenize
from mtop_jax.errors import ConfigError, DataError


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_csv(path: Path, rows) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return path


@functools.lru_cache(maxsize=1)
def minilm_tokenizer():
    from mtop_jax.models.pretrained import load_tokenizer

    return load_tokenizer()


# ------------------------------------------------------------------ the demo set


def test_debian_packages_load_with_sparse_labels():
    cfg = debian_packages_config()
    train = load_local(cfg, "train")
    assert len(train) == 8000 and train.ids[0] == "0ad-data-common"
    # a ConfigDict mapping comes back sorted by name
    assert train.task_names == ("implemented_in", "interface", "role", "section")
    assert [t.num_classes for t in train.tasks] == [6, 3, 8, 41]
    counts = train.label_counts()
    assert counts["section"] > 7500 and counts["interface"] < 1000  # sparse, not a class
    assert np.isnan(train.labels).any()
    first = dict(zip(train.task_names, train.labels[0], strict=True))
    assert train.tasks[3].labels[int(first["section"])] == "games" and np.isnan(first["role"])
    test = load_local(cfg, "test", specs=train.tasks)
    assert len(test) == 1000 and test.tasks == train.tasks


def test_labels_inferred_from_train_reject_a_new_label_in_test():
    # the demo's test split has section 'tasks' (tasksel's task-* packages); train has none
    cfg = {"source": "jsonl", "path": str(DEBIAN_PACKAGES_DIR),
           "tasks": {"section": "labels.section"}}
    train = load_local(cfg, "train")
    assert train.tasks[0].labels == tuple(x for x in DEBIAN_PACKAGES_LABELS["section"]
                                          if x != "tasks")
    assert len(load_local(cfg, "validation")) == 1000
    with pytest.raises(DataError, match=r"test\.jsonl:924: .*'tasks'.*allowed labels"):
        load_local(cfg, "test")


# ------------------------------------------------------------------ good input


def test_jsonl_sparse_null_absent_and_dotted_fields(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [
        {"text": "a", "labels": {"topic": "x", "mood": 1}},
        {"text": "", "labels": {"topic": None}},  # empty text is a valid example
        {"text": "c", "labels": {"mood": 0}, "score": 2.5},
        {"text": "d", "labels": {"topic": "y", "mood": True}, "score": None},
    ])
    ex = read_examples(path, [{"name": "topic", "field": "labels.topic"},
                              {"name": "mood", "field": "labels.mood"},
                              {"name": "score", "field": "score", "kind": "regression"}])
    assert ex.texts == ["a", "", "c", "d"]
    assert ex.tasks[0].labels == ("x", "y")
    assert ex.tasks[1].labels == ("0", "1", "true")
    np.testing.assert_array_equal(ex.labels[:, 0], [0, np.nan, np.nan, 1])
    np.testing.assert_array_equal(ex.labels[:, 2], [np.nan, np.nan, 2.5, np.nan])


def test_integer_labels_sort_numerically(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "t", "y": y} for y in (10, 2, 1, 2.0)])
    ex = read_examples(path, {"y": "y"})
    assert ex.tasks[0].labels == ("1", "2", "10")
    np.testing.assert_array_equal(ex.labels[:, 0], [2, 1, 0, 1])


def test_csv_with_pairs_regression_and_empty_cells(tmp_path):
    path = write_csv(tmp_path / "train.csv", [
        ["sentence1", "sentence2", "label", "score"],
        ["a man", "a person", "entail", "4.5"],
        ["line\nbreak, \"quoted\"", "", "", "0"],
        ["x", "y", "contra", ""],
    ])
    ex = read_examples(path, {"label": "label",
                              "score": {"field": "score", "kind": "regression"}},
                       text_field="sentence1", pair_field="sentence2")
    assert ex.texts[1] == 'line\nbreak, "quoted"' and ex.pairs == ["a person", "", "y"]
    np.testing.assert_array_equal(ex.labels, [[1, 4.5], [np.nan, 0], [0, np.nan]])


def test_split_files_from_a_directory_or_a_mapping(tmp_path):
    write_csv(tmp_path / "train.csv", [["text", "y"], ["a", "p"], ["b", "q"]])
    write_csv(tmp_path / "dev.csv", [["text", "y"], ["c", "q"]])
    cfg = {"source": "csv", "path": str(tmp_path), "tasks": {"y": "y"},
           "splits": {"validation": "dev.csv"}}
    assert load_local(cfg, "validation").labels.tolist() == [[1.0]]
    with pytest.raises(DataError, match="no file for split 'test'"):
        load_local(cfg, "test")


def test_tsv(tmp_path):
    (tmp_path / "train.tsv").write_text("text\ty\nhello, world\tpos\n", encoding="utf-8")
    ex = read_examples(tmp_path / "train.tsv", {"y": "y"})
    assert ex.texts == ["hello, world"]


# ------------------------------------------------------------------ bad input


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "ok", "y": "a"}\n\n{"text": "broken", "y": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.jsonl:3: malformed JSON"):
        read_examples(path, {"y": "y"})


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "ok", "y": "a"}\n["text"]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"t\.jsonl:2: expected a JSON object"):
        read_examples(path, {"y": "y"})


def test_jsonl_invalid_utf8(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"text": "ok", "y": "a"}\n{"text": "\xff", "y": "a"}\n')
    with pytest.raises(DataError, match=r"t\.jsonl:2: not UTF-8"):
        read_examples(path, {"y": "y"})


@pytest.mark.parametrize("rows, line", [
    ([["text", "y"], ["a", "p"], ["b", "q", "extra"]], 3),
    ([["text", "y"], ["a", "p"], ["only one field"]], 3),
])
def test_malformed_csv_row_names_file_and_line(tmp_path, rows, line):
    path = write_csv(tmp_path / "train.csv", rows)
    with pytest.raises(DataError, match=rf"train\.csv:{line}: malformed row"):
        read_examples(path, {"y": "y"})


def test_csv_unterminated_quote(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('text,y\na,p\n"never closed,q\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.csv:\d+: malformed CSV"):
        read_examples(path, {"y": "y"})


def test_missing_text_field_names_it_and_the_fields_that_exist(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "y": "p"},
                                              {"body": "b", "labels": {"y": "q"}}])
    with pytest.raises(DataError, match=r"t\.jsonl:2: no field 'text'.*'body', 'labels', "
                                        r"'labels\.y'"):
        read_examples(path, {"y": "y"})
    csv_path = write_csv(tmp_path / "t.csv", [["body", "y"], ["a", "p"]])
    with pytest.raises(DataError, match=r"no column 'text'; the columns are \['body', 'y'\]"):
        read_examples(csv_path, {"y": "y"})


def test_task_field_absent_from_the_whole_file(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "labels": {"topic": "x"}},
                                              {"text": "b", "labels": {"topic": None}}])
    with pytest.raises(DataError, match=r"field 'labels\.mood' of task mood is in no record; "
                                        r"the fields are \['text', 'labels', 'labels\.topic'\]"):
        read_examples(path, {"topic": "labels.topic", "mood": "labels.mood"})
    csv_path = write_csv(tmp_path / "t.csv", [["text", "topic"], ["a", "x"]])
    with pytest.raises(DataError, match=r"no column 'mood'; the columns are \['text', 'topic'\]"):
        read_examples(csv_path, {"topic": "topic", "mood": "mood"})


def test_label_outside_the_configured_set_lists_the_allowed_labels(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "y": "pos"},
                                              {"text": "b", "y": "meh"}])
    with pytest.raises(DataError, match=r"t\.jsonl:2: .*'meh'.*allowed labels \['neg', 'pos'\]"):
        read_examples(path, {"y": {"field": "y", "labels": ["neg", "pos"]}})
    # the same check against specs that come from a saved model
    with pytest.raises(DataError, match=r"t\.jsonl:2: .*'meh'.*\['neg', 'pos'\]"):
        read_examples(path, {"y": "y"}, specs=[TaskSpec("y", labels=("neg", "pos"))])


@pytest.mark.parametrize("value, kind", [(7, "int"), (None, "NoneType"), (["a"], "list")])
def test_non_string_text_names_the_line(tmp_path, value, kind):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "fine", "y": "a"},
                                              {"text": value, "y": "a"}])
    with pytest.raises(DataError, match=rf"t\.jsonl:2: field 'text' must be a string, got {kind}"):
        read_examples(path, {"y": "y"})


@pytest.mark.parametrize("label", [{"a": 1}, [1], 1.5])
def test_unusable_classification_label(tmp_path, label):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "y": label}])
    with pytest.raises(DataError, match=r"t\.jsonl:1: task y"):
        read_examples(path, {"y": "y"})


@pytest.mark.parametrize("target", ["high", True, "nan", 1e300])
def test_bad_regression_target(tmp_path, target):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "y": target}])
    with pytest.raises(DataError, match=r"t\.jsonl:1: task y .*regression target"):
        read_examples(path, {"y": {"field": "y", "kind": "regression"}})


def test_lone_surrogate_is_a_data_error(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "bad \\ud800 text", "y": "a"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"t\.jsonl:1: field 'text' is not valid Unicode"):
        read_examples(path, {"y": "y"})


def test_empty_file_and_bad_config(tmp_path):
    (tmp_path / "t.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="no examples"):
        read_examples(tmp_path / "t.jsonl", {"y": "y"})
    (tmp_path / "t.csv").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="header"):
        read_examples(tmp_path / "t.csv", {"y": "y"})
    with pytest.raises(DataError, match="no such file"):
        read_examples(tmp_path / "absent.jsonl", {"y": "y"})
    with pytest.raises(ConfigError, match="data.tasks"):
        read_examples(tmp_path / "t.jsonl", None)
    with pytest.raises(ConfigError, match="kind"):
        read_examples(tmp_path / "t.jsonl", {"y": {"field": "y", "kind": "ordinal"}})


def test_train_split_without_any_label_of_a_task(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "y": None}])
    with pytest.raises(DataError, match="no labels to infer"):
        read_examples(path, {"y": "y"})


# ------------------------------------------------------------------ property-based

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=2)
                           | st.dictionaries(st.text(max_size=3), inner, max_size=2),
                           max_leaves=4)
RECORDS = st.lists(st.fixed_dictionaries(
    {"text": st.text() | JSON_VALUES},
    optional={"labels": st.dictionaries(st.sampled_from(["a", "b", "c"]),
                                        st.sampled_from(["x", "y", "", None, 3, 2.0]) | JSON_VALUES,
                                        max_size=3),
              "score": JSON_VALUES}),
    max_size=6)


def _load_and_tokenize(path, tasks):
    ex = read_examples(path, tasks)
    encoded = tokenize(ex.texts, minilm_tokenizer(), 16, pairs=ex.pairs)
    assert len(encoded) == len(ex) and ex.labels.shape == (len(ex), len(ex.tasks))
    present = ~np.isnan(ex.labels)
    for j, spec in enumerate(ex.tasks):
        if not spec.is_regression:
            assert np.all(ex.labels[present[:, j], j] < spec.num_classes)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=RECORDS, ensure_ascii=st.booleans())
def test_arbitrary_jsonl_loads_or_raises_data_error(records, ensure_ascii):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.jsonl"
        lines = [json.dumps(r, ensure_ascii=ensure_ascii) for r in records]
        try:
            path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
        except UnicodeEncodeError:
            return
        tasks = [{"name": "a", "field": "labels.a"}, {"name": "b", "field": "labels.b"},
                 {"name": "score", "field": "score", "kind": "regression"}]
        with contextlib.suppress(DataError):
            _load_and_tokenize(path, tasks)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(st.lists(st.text(max_size=12), min_size=1, max_size=4), max_size=6),
       raw=st.binary(max_size=40))
def test_arbitrary_csv_loads_or_raises_data_error(rows, raw):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.csv"
        try:
            write_csv(path, [["text", "y", "z"], *rows])
        except UnicodeEncodeError:
            return
        with contextlib.suppress(DataError):
            _load_and_tokenize(path, {"y": "y", "z": {"field": "z", "kind": "regression"}})
        path.write_bytes(raw)  # arbitrary bytes: never a crash either
        with contextlib.suppress(DataError):
            _load_and_tokenize(path, {"y": "y"})


@settings(max_examples=40, deadline=None)
@given(text=st.text(), label=st.sampled_from(["neg", "pos"]))
def test_any_unicode_text_round_trips(text, label):
    """Every valid string comes back unchanged; a lone surrogate is a DataError."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.jsonl"
        path.write_text(json.dumps({"text": text, "y": label}) + "\n", encoding="utf-8")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            with pytest.raises(DataError):
                read_examples(path, {"y": "y"})
            return
        ex = read_examples(path, {"y": "y"})
        assert ex.texts == [text] and not math.isnan(ex.labels[0, 0])


def test_task_order_of_a_list_and_a_frozen_demo_config(tmp_path):
    import ml_collections

    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "z": "1", "a": "2"}])
    ex = read_examples(path, [{"name": "z", "field": "z"}, {"name": "a", "field": "a"}])
    assert ex.task_names == ("z", "a")
    frozen = ml_collections.FrozenConfigDict(debian_packages_config())
    assert load_local(frozen, "validation").task_names[-1] == "section"

"""TFDS sources, offline: ``tfds.testing.mock_data`` generates the examples, nothing downloads."""

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("tensorflow")

from mtop_jax.data import build_dataset  # noqa: E402
from mtop_jax.data.tfds_sources import (  # noqa: E402
    BINARY_LABELS,
    CIVIL_COMMENTS_TASKS,
    GLUE_TASKS,
    TOXICITY_TASKS,
    load_tfds,
)
from mtop_jax.errors import ConfigError  # noqa: E402

N = 12


@pytest.fixture(scope="module", autouse=True)
def mocked():
    with tfds.testing.mock_data(num_examples=N):
        yield


@pytest.fixture(scope="module")
def glue_train():
    return load_tfds("glue", "train")


def test_glue_is_a_heterogeneous_mixture(glue_train):
    assert [s.name for s in glue_train] == [f"glue/{t}" for t in GLUE_TASKS]
    tasks = glue_train[0].tasks
    assert [t.name for t in tasks] == list(GLUE_TASKS)
    assert all(s.tasks == tasks for s in glue_train)
    by_name = {t.name: t for t in tasks}
    assert by_name["stsb"].is_regression
    assert by_name["mnli"].labels == ("entailment", "neutral", "contradiction")
    assert by_name["cola"].labels == ("unacceptable", "acceptable")
    for j, s in enumerate(glue_train):
        assert len(s) == N
        present = ~np.isnan(s.labels)
        assert present[:, j].all() and present.sum() == N  # its own task only
        assert (s.pairs is None) == (GLUE_TASKS[tasks[j].name][1] is None)
        assert all(isinstance(t, str) for t in s.texts)


def test_glue_subsets_and_splits():
    (cola,) = load_tfds("glue/cola", "validation")
    assert cola.task_names == ("cola",)
    two = load_tfds("glue", "validation", tasks=["mnli", "stsb"])  # mnli: validation_matched
    assert [s.name for s in two] == ["glue/mnli", "glue/stsb"]
    with pytest.raises(ConfigError, match="glue has the tasks"):
        load_tfds("glue", "train", tasks=["squad"])


def test_wikipedia_toxicity_subtypes_is_same_text_multi_task():
    (s,) = load_tfds("wikipedia_toxicity_subtypes", "train")
    assert s.task_names == TOXICITY_TASKS and len(s.tasks) == 6
    assert all(t.labels == BINARY_LABELS for t in s.tasks)
    assert not np.isnan(s.labels).any() and set(np.unique(s.labels)) <= {0.0, 1.0}
    (sub,) = load_tfds("wikipedia_toxicity_subtypes", "train", tasks=["insult", "threat"])
    assert sub.task_names == ("insult", "threat")


def test_goemotions_civil_comments_ag_news():
    (go,) = load_tfds("goemotions", "train")
    assert len(go.tasks) == 28 and {"joy", "neutral", "admiration"} <= set(go.task_names)
    (cc,) = load_tfds("civil_comments", "validation", max_examples=5)
    assert cc.task_names == CIVIL_COMMENTS_TASKS and len(cc) == 5
    (ag,) = load_tfds("ag_news_subset", "test")
    assert ag.tasks[0].labels == ("World", "Sports", "Business", "Sci/Tech")
    assert all("\n" in t for t in ag.texts)  # title and description


def test_unsupported_dataset():
    with pytest.raises(ConfigError, match="not supported"):
        load_tfds("imdb_reviews", "train")


def test_glue_through_the_pipeline(tmp_path):
    from mtop_jax.models.pretrained import load_tokenizer

    cfg = {"source": "tfds", "name": "glue", "max_length": 32, "batch_size": 18,
           "buckets": (16, 32), "mixing": "temperature", "temperature": 2.0,
           "cache_dir": str(tmp_path)}
    train = build_dataset(cfg, load_tokenizer(), "train")
    assert len(train.source_names) == 9 and len(train) == 9 * N
    it = train.train_iterator(process_index=0, process_count=1)
    batch = next(it)
    assert batch["labels"].shape == (18, 9)
    assert ((batch["labels"] >= 0).sum(1) == 1).all()  # each example: its own task only
    stsb = [t.name for t in train.tasks].index("stsb")
    own = batch["labels"][:, stsb] >= 0
    np.testing.assert_array_equal(batch["targets"][own, stsb],
                                  train.examples.labels[batch["index"][own], stsb])

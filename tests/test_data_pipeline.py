"""The one entry point: demo set end to end, multi-source mixing, multi-host slices, resume."""

import json

import numpy as np
import pytest

from mtop_jax.data import build_dataset, debian_packages_config, load_examples
from mtop_jax.data.pipeline import source_configs
from mtop_jax.errors import ConfigError

KEYS = {"input_ids", "attention_mask", "token_type_ids", "labels", "targets", "weights", "index"}


@pytest.fixture(scope="module")
def tok():
    from mtop_jax.models.pretrained import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="module")
def demo(tok, tmp_path_factory):
    cfg = debian_packages_config()
    cfg.cache_dir = str(tmp_path_factory.mktemp("tokens"))
    cfg.batch_size = 8
    return cfg, build_dataset(cfg, tok, "train")


def test_demo_train_split(demo, tok):
    cfg, train = demo
    assert len(train) == 8000 and not train.encoded.from_cache
    assert [t.name for t in train.tasks] == ["implemented_in", "interface", "role", "section"]
    stats = train.stats()
    assert 0 < stats["truncated"] < 8000 and stats["labelled"]["section"] > 7500
    assert "truncated to 128 tokens" in train.summary()
    again = build_dataset(cfg, tok, "train")
    assert again.encoded.from_cache
    np.testing.assert_array_equal(again.encoded.input_ids, train.encoded.input_ids)


def test_demo_batches(demo):
    _, train = demo
    it = train.train_iterator(process_index=0, process_count=1)
    for _ in range(20):
        batch = next(it)
        assert set(batch) == KEYS and batch["input_ids"].shape[0] == 8
        assert batch["input_ids"].shape[1] in (64, 128)
        assert batch["labels"].shape == (8, 4) and batch["labels"].min() >= -1
        assert (batch["labels"] == -1).any()  # sparse tasks are missing, not a class
        assert (batch["labels"].max(0) < [t.num_classes for t in train.tasks]).all()


def test_demo_eval_splits_with_the_train_tasks(demo, tok):
    cfg, train = demo
    test = build_dataset(cfg, tok, "test", tasks=train.tasks)
    assert test.tasks == train.tasks and len(test) == 1000
    batches = list(test.eval_batches(process_index=0, process_count=1))
    assert len(batches) == test.num_eval_batches == 16  # 1000 / 64, last one padded
    index = np.concatenate([b["index"][b["weights"] > 0] for b in batches])
    assert sorted(index.tolist()) == list(range(1000))
    lengths = test.encoded.lengths[index]
    assert (np.diff(lengths) >= 0).all()  # shortest first (the demo config has buckets)
    assert test.examples.ids[923].startswith("task-")


def test_processes_partition_the_global_batch(demo):
    _, train = demo
    whole = train.train_iterator(seed=5, process_index=0, process_count=1)
    parts = [train.train_iterator(seed=5, process_index=p, process_count=2) for p in range(2)]
    for _ in range(10):
        b = next(whole)
        p0, p1 = next(parts[0]), next(parts[1])
        assert p0["input_ids"].shape == p1["input_ids"].shape == (4, b["input_ids"].shape[1])
        for key in KEYS:
            np.testing.assert_array_equal(np.concatenate([p0[key], p1[key]]), b[key])
    with pytest.raises(ConfigError, match="divisible"):
        train.train_iterator(process_index=0, process_count=3)


def test_resume_yields_exactly_the_next_batch(demo):
    _, train = demo
    it = train.train_iterator(seed=1, process_index=1, process_count=2)
    for _ in range(1003):  # past the end of the first epoch (1000 global batches)
        next(it)
    state = json.loads(json.dumps(it.state_dict()))
    expected = [next(it) for _ in range(3)]
    resumed = train.train_iterator(seed=1, process_index=1, process_count=2)
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        for key in KEYS:
            np.testing.assert_array_equal(got[key], want[key])


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def two_sources(tmp_path):
    a, b = tmp_path / "reviews", tmp_path / "pairs"
    a.mkdir()
    b.mkdir()
    for split, n in (("train", 30), ("validation", 5)):
        write(a / f"{split}.jsonl", [{"text": f"review {i}", "stars": str(1 + i % 5),
                                      "spam": ["no", "yes"][i % 2]} for i in range(n)])
        write(b / f"{split}.jsonl", [{"s1": f"left {i}", "s2": f"right {i}",
                                      "similarity": i / n * 5} for i in range(3 * n)])
    return {
        "sources": [
            {"source": "jsonl", "path": str(a), "tasks": {"stars": "stars", "spam": "spam"}},
            {"source": "jsonl", "path": str(b), "text_field": "s1", "pair_field": "s2",
             "tasks": {"similarity": {"field": "similarity", "kind": "regression"}}},
        ],
        "max_length": 16, "batch_size": 12, "buckets": (8,), "cache": False,
        "mixing": "uniform", "seed": 3,
    }


def test_heterogeneous_sources_label_their_own_tasks_only(tok, two_sources):
    data = build_dataset(two_sources, tok, "train")
    assert [t.name for t in data.tasks] == ["stars", "spam", "similarity"]
    assert data.source_sizes == (30, 90) and data.source_names == ("reviews", "pairs")
    assert data.source_tasks == (("stars", "spam"), ("similarity",))
    it = data.train_iterator(process_index=0, process_count=1)
    rows = []
    for _ in range(50):
        batch = next(it)
        from_a = batch["index"] < 30
        assert (batch["labels"][from_a, 2] == -1).all()
        assert (batch["labels"][~from_a, :2] == -1).all()
        assert (batch["labels"][~from_a, 2] == 0).all()  # regression: present, value in targets
        np.testing.assert_allclose(batch["targets"][~from_a, 2],
                                   (batch["index"][~from_a] - 30) / 30 * 5, rtol=1e-6)
        pairs = batch["token_type_ids"][~from_a].sum(1)
        assert (pairs > 0).all() and (batch["token_type_ids"][from_a] == 0).all()
        rows.append(from_a.mean())
    assert abs(np.mean(rows) - 0.5) < 0.06  # uniform over two sources despite 30 vs 90
    assert it.probabilities() == {"reviews": 0.5, "pairs": 0.5}


def test_regression_targets_standardised_by_the_train_split(tok, two_sources):
    """The train split's regression task carries its labelled targets' mean and sd
    (the other source's rows, unlabelled, are left out); batches keep raw targets (the
    loss standardises); a validation split built with these specs keeps them."""
    data = build_dataset(two_sources, tok, "train")
    similarity = data.tasks[2]
    raw = np.arange(90) / 30 * 5  # the fixture: i / n * 5 for 3n rows
    assert similarity.target_mean == pytest.approx(raw.mean())
    assert similarity.target_std == pytest.approx(raw.std())
    assert (data.tasks[0].target_mean, data.tasks[0].target_std) == (0.0, 1.0)
    assert similarity.value(1.0) == pytest.approx(raw.mean() + raw.std())
    assert build_dataset(two_sources, tok, "validation", tasks=data.tasks).tasks == data.tasks


def test_dynamic_mixing_through_the_iterator(tok, two_sources):
    data = build_dataset({**two_sources, "mixing": "dynamic"}, tok, "train")
    it = data.train_iterator(process_index=0, process_count=1)
    it.update_losses({"stars": 1.6, "spam": 0.7, "similarity": 2.0})
    it.update_losses({"stars": 0.16, "spam": 0.07, "similarity": 2.0})
    probs = it.probabilities()
    assert probs["pairs"] == pytest.approx(1 / 1.1)
    share = np.mean([(next(it)["index"] >= 30).mean() for _ in range(100)])
    assert share == pytest.approx(1 / 1.1, abs=0.05)


def test_validation_of_a_mixture_uses_the_train_tasks(tok, two_sources):
    train = build_dataset(two_sources, tok, "train")
    val = build_dataset(two_sources, tok, "validation", tasks=train.tasks)
    assert val.tasks == train.tasks and val.source_sizes == (5, 15)


def test_max_examples_and_config_checks(two_sources):
    specs, sets = load_examples({**two_sources, "max_examples": 4}, "train")
    assert [len(s) for s in sets] == [4, 4]
    assert all(s.tasks == specs for s in sets)
    with pytest.raises(ConfigError, match="whole mixture"):
        source_configs({"sources": [{"source": "jsonl", "batch_size": 4}]})
    with pytest.raises(ConfigError, match="data.source"):
        load_examples({"source": "parquet"}, "train")


def test_length_groups_shorten_the_padded_batches(demo, tok):
    """``data.length_groups`` reaches the sampler: the same texts, shorter buckets."""
    cfg, train = demo
    grouped_cfg = cfg.copy_and_resolve_references()
    grouped_cfg.length_groups = 16
    grouped = build_dataset(grouped_cfg, tok, "train")

    def padded(dataset):
        it = dataset.train_iterator(seed=1, process_index=0, process_count=1)
        batches = [next(it) for _ in range(200)]
        rows = np.concatenate([b["index"] for b in batches])
        return sum(b["input_ids"].shape[1] for b in batches), rows

    plain_tokens, plain_rows = padded(train)
    grouped_tokens, grouped_rows = padded(grouped)
    assert grouped_tokens < 0.9 * plain_tokens
    assert len(set(grouped_rows.tolist())) == len(grouped_rows)  # still without replacement
    bad = cfg.copy_and_resolve_references()
    bad.length_groups = -2
    with pytest.raises(ConfigError, match="data.length_groups"):
        build_dataset(bad, tok, "train")


def test_repeat_threshold_repeats_the_sparse_tasks_texts(demo, tok):
    """``data.repeat_threshold`` reaches the sampler: in 8,000 draws the demo's sparsest
    task (``interface``, 5% of the texts) is drawn about sqrt(0.2 / 0.05) = 2 times as
    often as its share; the dense ``section`` keeps nearly its share."""
    cfg, _ = demo
    repeated_cfg = cfg.copy_and_resolve_references()
    repeated_cfg.repeat_threshold = 0.2
    repeated = build_dataset(repeated_cfg, tok, "train")
    j = [t.name for t in repeated.tasks].index("interface")
    it = repeated.train_iterator(seed=1, process_index=0, process_count=1)
    rows = np.concatenate([next(it)["index"] for _ in range(1000)])
    labelled = ~np.isnan(repeated.examples.labels)
    share = labelled[:, j].mean()
    assert 1.6 * share < labelled[rows, j].mean() < 2.4 * share
    dense = [t.name for t in repeated.tasks].index("section")
    assert labelled[rows, dense].mean() > labelled[:, dense].mean() - 0.03
    bad = cfg.copy_and_resolve_references()
    bad.repeat_threshold = 2.0
    with pytest.raises(ConfigError, match="data.repeat_threshold"):
        build_dataset(bad, tok, "train")

"""Mixing strategies, determinism, epochs, dynamic re-weighting and exact resumption."""

import json

import numpy as np
import pytest

from mtop_jax.data.mixing import STRATEGIES, SourceSampler, mixing_probabilities, repeat_factors
from mtop_jax.errors import ConfigError, DataError

SIZES = [100, 400, 1600]


def test_static_probabilities():
    np.testing.assert_allclose(mixing_probabilities(SIZES, "proportional"),
                               [1 / 21, 4 / 21, 16 / 21])
    np.testing.assert_allclose(mixing_probabilities(SIZES, "temperature", temperature=2.0),
                               [10 / 70, 20 / 70, 40 / 70])
    np.testing.assert_allclose(mixing_probabilities(SIZES, "temperature", temperature=1.0),
                               mixing_probabilities(SIZES, "proportional"))
    np.testing.assert_allclose(mixing_probabilities(SIZES, "uniform"), [1 / 3] * 3)
    np.testing.assert_allclose(mixing_probabilities(SIZES, "dynamic"), [1 / 3] * 3)
    with pytest.raises(ConfigError, match="mixing"):
        mixing_probabilities(SIZES, "round_robin")
    with pytest.raises(ConfigError, match="temperature"):
        mixing_probabilities(SIZES, "temperature", temperature=0.0)


def source_of(rows):
    return np.searchsorted(np.cumsum(SIZES), rows, side="right")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_empirical_mix_follows_the_probabilities(strategy):
    s = SourceSampler(SIZES, 64, strategy=strategy, temperature=2.0, seed=3)
    rows = np.concatenate([s.next_rows() for _ in range(200)])
    freq = np.bincount(source_of(rows), minlength=3) / len(rows)
    np.testing.assert_allclose(freq, s.probabilities(), atol=0.02)


def test_deterministic_for_a_seed():
    a = [SourceSampler(SIZES, 16, seed=7).next_rows() for _ in range(2)]
    np.testing.assert_array_equal(a[0], a[1])
    b = SourceSampler(SIZES, 16, seed=8).next_rows()
    assert not np.array_equal(a[0], b)


def test_every_example_once_per_epoch():
    s = SourceSampler([10, 7], 3, strategy="uniform", seed=0)
    rows = np.concatenate([s.next_rows() for _ in range(40)])
    first = rows[rows < 10][:20]
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:]) == list(range(10))
    assert first[:10].tolist() != first[10:].tolist()  # reshuffled each epoch
    second = rows[rows >= 10][:14]
    assert sorted(second[:7]) == list(range(10, 17)) == sorted(second[7:])


def test_state_resumes_at_exactly_the_next_batch():
    s = SourceSampler([5, 13, 29], 8, strategy="temperature", seed=11,
                      source_tasks=[["a"], ["b"], ["c"]])
    s.strategy = "dynamic"
    s.update_losses({"a": 2.0, "b": 1.0, "c": 4.0})
    for _ in range(9):  # crosses several epochs of the small sources
        s.next_rows()
    s.update_losses({"a": 1.0, "b": 0.9, "c": 1.0})
    state = json.loads(json.dumps(s.state_dict()))  # a checkpoint stores it as JSON
    expected = [s.next_rows() for _ in range(12)]
    r = SourceSampler([5, 13, 29], 8, strategy="dynamic", seed=0,
                      source_tasks=[["a"], ["b"], ["c"]])
    r.load_state_dict(state)
    for want in expected:
        np.testing.assert_array_equal(r.next_rows(), want)


def test_state_from_other_data_is_rejected():
    state = SourceSampler([5, 13], 4).state_dict()
    with pytest.raises(DataError, match="not the same data"):
        SourceSampler([5, 14], 4).load_state_dict(state)
    with pytest.raises(DataError, match="not a data iterator state"):
        SourceSampler([5, 13], 4).load_state_dict({"version": 1})


def test_dynamic_follows_the_remaining_loss_ratio():
    s = SourceSampler([100, 100, 100], 32, strategy="dynamic",
                      source_tasks=[["a"], ["b"], ["c", "d"]])
    s.update_losses({"a": 2.0, "b": 1.0, "c": 1.0, "d": 1.0})  # L_t(start)
    np.testing.assert_allclose(s.probabilities(), [1 / 3] * 3)
    s.update_losses({"a": 0.2, "b": 0.8, "c": 0.5, "d": float("nan")})
    # ratios: a 0.1, b 0.8, c 0.5 (d keeps 1.0: a NaN loss is ignored) -> source c: 0.75
    np.testing.assert_allclose(s.probabilities(), np.array([0.1, 0.8, 0.75]) / 1.65)
    assert s.start_losses["a"] == 2.0
    s.update_losses({"a": 0.0})  # a solved task is still sampled, rarely
    assert 0 < s.probabilities()[0] < 0.01


def test_bad_arguments():
    with pytest.raises(ConfigError, match="batch_size"):
        SourceSampler([3], 0)
    with pytest.raises(ConfigError, match="seed"):
        SourceSampler([3], 2, seed=-1)
    with pytest.raises(ConfigError, match="mixing"):
        SourceSampler([3], 2, strategy="bogus")
    with pytest.raises(DataError, match="at least one example"):
        SourceSampler([3, 0], 2)


def test_length_groups_batch_texts_of_like_length():
    lengths = np.random.default_rng(0).integers(1, 200, size=256)
    plain = SourceSampler([256], 8, seed=3)
    grouped = SourceSampler([256], 8, seed=3, lengths=[lengths], length_groups=8)
    a = np.stack([plain.next_rows() for _ in range(32)])
    b = np.stack([grouped.next_rows() for _ in range(32)])
    assert sorted(b.ravel()) == list(range(256))  # still every text once an epoch
    # A batch pads to its longest text: far less padding than random batches of 8 ...
    assert lengths[b].max(1).sum() < 0.75 * lengths[a].max(1).sum()
    # ... yet batches are not in length order, and the next epoch groups other texts.
    assert not np.all(np.diff(lengths[b].max(1)) <= 0)
    c = np.stack([grouped.next_rows() for _ in range(32)])
    assert {tuple(sorted(r)) for r in b} != {tuple(sorted(r)) for r in c}


def test_length_groups_resume_at_exactly_the_next_batch():
    lengths = [np.arange(37) % 11, np.arange(50) % 7]
    s = SourceSampler([37, 50], 4, seed=5, lengths=lengths, length_groups=3)
    for _ in range(30):
        s.next_rows()
    state = json.loads(json.dumps(s.state_dict()))
    expected = [s.next_rows() for _ in range(10)]
    r = SourceSampler([37, 50], 4, seed=0, lengths=lengths, length_groups=3)
    r.load_state_dict(state)
    for want in expected:
        np.testing.assert_array_equal(r.next_rows(), want)


def test_length_groups_checks():
    with pytest.raises(ConfigError, match="length_groups"):
        SourceSampler([3], 2, lengths=[np.ones(3)], length_groups=-1)
    with pytest.raises(DataError, match="token lengths"):
        SourceSampler([3], 2, length_groups=2)


def test_repeat_factors_follow_the_sparsest_task_of_each_text():
    # 100 texts: task 0 labels all of them, task 1 the first 4 (f = 0.04), task 2 the
    # first 25 (f = 0.25, above the threshold: no repeats of its own).
    labelled = np.zeros((100, 3), bool)
    labelled[:, 0], labelled[:4, 1], labelled[:25, 2] = True, True, True
    r = repeat_factors(labelled, 0.16)
    np.testing.assert_allclose(r[:4], 2.0)  # sqrt(0.16 / 0.04)
    np.testing.assert_allclose(r[4:], 1.0)
    np.testing.assert_allclose(repeat_factors(labelled, 0.0), 1.0)
    np.testing.assert_allclose(repeat_factors(np.zeros((3, 2), bool), 0.5), 1.0)  # no labels
    with pytest.raises(ConfigError, match="repeat_threshold"):
        repeat_factors(labelled, 1.5)


def test_repeated_epochs_hold_every_text_its_factor_times_and_resume_exactly():
    factors = np.ones(60)
    factors[:6] = 3.0  # whole repeats: exactly 3 a epoch
    factors[6:12] = 1.5  # 1 or 2 a epoch, 1.5 on average
    lengths = np.arange(60) % 13
    s = SourceSampler([60], 4, seed=2, lengths=[lengths], length_groups=2,
                      repeat_factors=[factors])
    epoch_rows = int(np.floor(factors).sum())  # at least, before the coin flips
    rows = np.concatenate([s.next_rows() for _ in range(400)])  # ~19 epochs of ~84 rows
    counts = np.bincount(rows, minlength=60) / s.epochs[0]
    assert s.epochs[0] > 15 and len(rows) / s.epochs[0] > epoch_rows
    np.testing.assert_allclose(counts[:6], 3.0, atol=0.25)
    np.testing.assert_allclose(counts[6:12].mean(), 1.5, atol=0.15)
    np.testing.assert_allclose(counts[12:], 1.0, atol=0.15)
    state = json.loads(json.dumps(s.state_dict()))
    expected = [s.next_rows() for _ in range(40)]
    r = SourceSampler([60], 4, seed=0, lengths=[lengths], length_groups=2,
                      repeat_factors=[factors])
    r.load_state_dict(state)
    for want in expected:
        np.testing.assert_array_equal(r.next_rows(), want)
    with pytest.raises(DataError, match="repeat_factors"):
        SourceSampler([60], 4, repeat_factors=[np.zeros(60)])

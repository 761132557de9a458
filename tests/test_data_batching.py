"""Fixed-shape batches: buckets, the label array, eval padding, per-process slices."""

import numpy as np
import pytest

from mtop_jax.data.batching import (
    bucket_length,
    eval_batches,
    make_batch,
    process_slice,
    resolve_buckets,
)
from mtop_jax.data.tokenization import Encoded
from mtop_jax.errors import ConfigError


def fake_encoded(lengths, max_length=16, pad_id=0):
    n = len(lengths)
    ids = np.full((n, max_length), pad_id, np.uint16)
    types = np.zeros((n, max_length), np.int8)
    for i, k in enumerate(lengths):
        ids[i, :k] = np.arange(1, k + 1) + 100 * i
        types[i, k // 2:k] = 1
    return Encoded(ids, types, np.asarray(lengths, np.int32), np.zeros(n, bool),
                   max_length, pad_id)


# two tasks: a 3-way classification and a regression
LABELS = np.array([[0, 1.5], [2, np.nan], [np.nan, -0.5], [1, np.nan], [np.nan, np.nan]],
                  np.float32)
REGRESSION = np.array([False, True])


def test_resolve_buckets():
    assert resolve_buckets(128, None) == (128,)
    assert resolve_buckets(128, (64, 32, 64)) == (32, 64, 128)
    assert resolve_buckets(128, [32, 128]) == (32, 128)
    for bad in ([0, 64], [256], ["x"]):
        with pytest.raises(ConfigError, match="buckets"):
            resolve_buckets(128, bad)


def test_bucket_length():
    buckets = (32, 64, 128)
    assert [bucket_length(n, buckets) for n in (1, 32, 33, 64, 100, 128)] == \
        [32, 32, 64, 64, 128, 128]


def test_make_batch_labels_targets_and_masks():
    enc = fake_encoded([3, 5, 2, 8, 1])
    batch = make_batch(enc, LABELS, REGRESSION, np.array([0, 1, 2, 3]), 8)
    assert {k: v.shape for k, v in batch.items()} == {
        "input_ids": (4, 8), "attention_mask": (4, 8), "token_type_ids": (4, 8),
        "labels": (4, 2), "targets": (4, 2), "weights": (4,), "index": (4,)}
    assert all(batch[k].dtype == np.int32 for k in ("input_ids", "attention_mask",
                                                     "token_type_ids", "labels", "index"))
    assert batch["labels"].tolist() == [[0, 0], [2, -1], [-1, 0], [1, -1]]
    np.testing.assert_allclose(batch["targets"][:, 1], [1.5, 0, -0.5, 0])
    assert batch["attention_mask"].sum(1).tolist() == [3, 5, 2, 8]
    np.testing.assert_array_equal(batch["input_ids"][1], [101, 102, 103, 104, 105, 0, 0, 0])
    assert batch["token_type_ids"][3].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert batch["weights"].tolist() == [1, 1, 1, 1]


def test_padding_rows():
    enc = fake_encoded([3, 5, 2, 8, 1], pad_id=7)
    batch = make_batch(enc, LABELS, REGRESSION, np.array([4, -1]), 4)
    assert batch["weights"].tolist() == [1, 0] and batch["index"].tolist() == [4, -1]
    assert batch["labels"][1].tolist() == [-1, -1]
    assert batch["input_ids"][1].tolist() == [7, 7, 7, 7]
    assert batch["attention_mask"][1].tolist() == [1, 0, 0, 0]  # no empty attention row


@pytest.mark.parametrize("batch_size", [1, 2, 4, 5, 8])
def test_eval_covers_every_row_once(batch_size):
    enc = fake_encoded([3, 5, 2, 16, 1])
    seen, lengths = [], set()
    for batch in eval_batches(enc, LABELS, REGRESSION, batch_size, (4, 8, 16)):
        assert batch["input_ids"].shape[0] == batch_size
        lengths.add(batch["input_ids"].shape[1])
        seen.extend(batch["index"][batch["weights"] > 0].tolist())
        assert (batch["index"][batch["weights"] == 0] == -1).all()
    assert sorted(seen) == [0, 1, 2, 3, 4]
    assert seen == [4, 2, 0, 1, 3]  # shortest first: batches pad to short buckets
    assert lengths <= {4, 8, 16}


def test_eval_in_order_with_one_bucket():
    enc = fake_encoded([3, 5, 2, 16, 1])
    seen = [i for b in eval_batches(enc, LABELS, REGRESSION, 2, (16,)) for i in b["index"]]
    assert seen == [0, 1, 2, 3, 4, -1]


def test_process_slices_partition_eval_batches():
    enc = fake_encoded([3, 5, 2, 16, 1, 4, 9])
    labels = np.concatenate([LABELS, LABELS[:2]])
    whole = list(eval_batches(enc, labels, REGRESSION, 4, (8, 16)))
    parts = [list(eval_batches(enc, labels, REGRESSION, 4, (8, 16), process_index=p,
                               process_count=2)) for p in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(whole) == 2
    for b, (p0, p1) in zip(whole, zip(*parts, strict=True), strict=True):
        for key in b:
            np.testing.assert_array_equal(np.concatenate([p0[key], p1[key]]), b[key])


def test_process_slice_checks():
    assert process_slice(8, 1, 4) == slice(2, 4)
    with pytest.raises(ConfigError, match="divisible"):
        process_slice(6, 0, 4)
    with pytest.raises(ConfigError, match="process_index"):
        process_slice(8, 2, 2)

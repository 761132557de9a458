"""Fixed-shape batches: what the jitted train and eval steps receive.

A batch is a dict of numpy arrays with B rows (this process's slice of the
global batch) and T tasks:

- ``input_ids``, ``attention_mask``, ``token_type_ids``: int32 [B, L], L a
  bucket length: the smallest of ``buckets`` that holds the longest text of
  the *global* batch, so all processes agree on the shape and the step compiles
  once per bucket, not once per length;
- ``labels``: int32 [B, T], the class index, or -1 where the label is missing.
  Regression tasks read 0 where present (so ``labels >= 0`` is the mask for
  every task) and take their value from ``targets``;
- ``targets``: float32 [B, T], regression targets (class index for
  classification), 0 where missing;
- ``weights``: float32 [B], 0 for the rows that pad the last eval batch
  (their input is one unmasked pad token, so no attention row is empty);
- ``index``: int32 [B], the example's row in the split (-1 for padding rows).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from mtop_jax.data.tokenization import Encoded
from mtop_jax.errors import ConfigError


def resolve_buckets(max_length: int, buckets: Sequence[int] | None) -> tuple[int, ...]:
    """Sorted bucket lengths ending with ``max_length``; ``None``: pad to ``max_length``."""
    if not buckets:
        return (max_length,)
    try:
        out = sorted({int(b) for b in buckets})
    except (TypeError, ValueError):
        raise ConfigError(f"data.buckets: expected integers, got {buckets!r}") from None
    if out[0] < 1 or out[-1] > max_length:
        raise ConfigError(f"data.buckets: lengths must be in 1..max_length={max_length}, "
                          f"got {list(buckets)}")
    if out[-1] != max_length:
        out.append(max_length)
    return tuple(out)


def bucket_length(longest: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``longest`` tokens."""
    i = int(np.searchsorted(np.asarray(buckets), longest, side="left"))
    return int(buckets[min(i, len(buckets) - 1)])


def process_slice(global_size: int, process_index: int, process_count: int) -> slice:
    """The contiguous rows of a global batch that one process feeds."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ConfigError(f"process_index {process_index} is not in 0..{process_count - 1}")
    if global_size % process_count:
        raise ConfigError(f"batch size {global_size} is not divisible by the {process_count} "
                          "processes")
    per = global_size // process_count
    return slice(process_index * per, (process_index + 1) * per)


def make_batch(encoded: Encoded, labels: np.ndarray, regression: np.ndarray,
               rows: np.ndarray, length: int) -> dict[str, np.ndarray]:
    """Rows ``rows`` (-1: a padding row) cut to ``length`` tokens.

    ``labels``: the split's float32 [n, T] labels (NaN missing); ``regression``:
    bool [T], which tasks are regression.
    """
    rows = np.asarray(rows, np.int64)
    real = rows >= 0
    safe = np.where(real, rows, 0)
    input_ids = encoded.input_ids[safe, :length].astype(np.int32)
    token_type_ids = encoded.token_type_ids[safe, :length].astype(np.int32)
    attention_mask = (np.arange(length)[None, :] < encoded.lengths[safe, None]).astype(np.int32)
    values = labels[safe]
    present = ~np.isnan(values) & real[:, None]
    int_labels = np.where(present, np.where(regression[None, :], 0, values), -1)
    if not real.all():
        pad = ~real
        input_ids[pad] = encoded.pad_id
        token_type_ids[pad] = 0
        attention_mask[pad] = 0
        attention_mask[pad, 0] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids,
        "labels": int_labels.astype(np.int32),
        "targets": np.where(present, values, 0).astype(np.float32),
        "weights": real.astype(np.float32),
        "index": np.where(real, rows, -1).astype(np.int32),
    }


def global_length(encoded: Encoded, rows: np.ndarray, buckets: Sequence[int]) -> int:
    """Bucket length for a global batch (padding rows count as length 1)."""
    rows = np.asarray(rows)
    real = rows[rows >= 0]
    longest = int(encoded.lengths[real].max()) if len(real) else 1
    return bucket_length(longest, buckets)


def eval_batches(encoded: Encoded, labels: np.ndarray, regression: np.ndarray,
                 batch_size: int, buckets: Sequence[int], *, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Every row exactly once; the last global batch padded (weight 0). With several
    buckets the rows go shortest first, so most batches pad to a short bucket (``index``
    says where each row's prediction belongs)."""
    part = process_slice(batch_size, process_index, process_count)
    n = len(encoded)
    order = (np.argsort(encoded.lengths, kind="stable") if len(buckets) > 1
             else np.arange(n))
    for start in range(0, n, batch_size):
        rows = np.full(batch_size, -1, np.int64)
        chunk = order[start:start + batch_size]
        rows[:len(chunk)] = chunk
        length = global_length(encoded, rows, buckets)
        yield make_batch(encoded, labels, regression, rows[part], length)


def num_batches(n: int, batch_size: int) -> int:
    return -(-n // batch_size)

"""Batched tokenisation: same ids as the tokenizer's own call, truncation counted, disk cache."""

import numpy as np
import pytest

from mtop_jax.data.tokenization import data_fingerprint, tokenize, tokenizer_fingerprint
from mtop_jax.errors import ConfigError, DataError

TEXTS = ["A short package description.", "", "naïve café — 東京 🙂",
         "word " * 300, "Two\nlines\tand tabs"]


@pytest.fixture(scope="module")
def tok():
    from mtop_jax.models.pretrained import load_tokenizer

    return load_tokenizer()


def test_ids_match_the_tokenizers_own_call(tok):
    enc = tokenize(TEXTS, tok, 32)
    ref = tok(TEXTS, truncation=True, max_length=32, padding="max_length", return_tensors="np")
    np.testing.assert_array_equal(enc.input_ids, ref["input_ids"])
    np.testing.assert_array_equal(enc.token_type_ids, ref["token_type_ids"])
    np.testing.assert_array_equal(enc.lengths, ref["attention_mask"].sum(1))
    assert enc.input_ids.shape == (5, 32) and enc.input_ids.dtype == np.uint16
    assert enc.lengths[1] == 2  # empty text: [CLS] [SEP]


def test_pairs_match_and_mix_with_single_texts(tok):
    texts, pairs = ["first", "premise " * 40, "alone"], ["second", "hypothesis " * 40, None]
    enc = tokenize(texts, tok, 24, pairs=pairs)
    ref = tok(texts[:2], pairs[:2], truncation=True, max_length=24, padding="max_length",
              return_tensors="np")
    np.testing.assert_array_equal(enc.input_ids[:2], ref["input_ids"])
    np.testing.assert_array_equal(enc.token_type_ids[:2], ref["token_type_ids"])
    assert enc.token_type_ids[2].sum() == 0
    assert enc.truncated.tolist() == [False, True, False]


def test_truncation_is_counted(tok):
    full = [len(tok(t)["input_ids"]) for t in TEXTS]
    enc = tokenize(TEXTS, tok, 8)
    assert enc.truncated.tolist() == [n > 8 for n in full]
    assert enc.num_truncated == sum(n > 8 for n in full)
    assert enc.lengths.max() == 8


def test_second_run_reads_the_cache_and_does_not_tokenise(tok, tmp_path):
    first = tokenize(TEXTS, tok, 16, cache_dir=tmp_path)
    assert not first.from_cache
    (cache,) = tmp_path.glob("tokens-*.npz")
    second = tokenize(TEXTS, tok, 16, cache_dir=tmp_path)
    assert second.from_cache
    for name in ("input_ids", "token_type_ids", "lengths", "truncated"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    # The ids come from the file, not from tokenising again: a marker written into it
    # comes back.
    with np.load(cache) as z:
        arrays = dict(z)
    arrays["input_ids"][0, 1] = 4242
    np.savez(cache, **arrays)
    third = tokenize(TEXTS, tok, 16, cache_dir=tmp_path)
    assert third.from_cache and third.input_ids[0, 1] == 4242 != first.input_ids[0, 1]


def test_cache_key_covers_tokenizer_data_and_max_length(tok, tmp_path):
    from tokenizers import Tokenizer

    tokenize(TEXTS, tok, 16, cache_dir=tmp_path)
    assert not tokenize(TEXTS, tok, 17, cache_dir=tmp_path).from_cache
    assert not tokenize(TEXTS[:-1] + ["changed"], tok, 16, cache_dir=tmp_path).from_cache
    other = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    other.add_tokens(["debhelper"])
    assert not tokenize(TEXTS, other, 16, cache_dir=tmp_path).from_cache
    assert tokenize(TEXTS, tok, 16, cache_dir=tmp_path).from_cache
    assert len(list(tmp_path.glob("tokens-*.npz"))) == 4


def test_fingerprints(tok):
    from tokenizers import Tokenizer

    padded = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    padded.enable_padding(length=99)
    assert tokenizer_fingerprint(padded) == tokenizer_fingerprint(tok)  # settings don't count
    assert data_fingerprint(["ab", "c"]) != data_fingerprint(["a", "bc"])
    assert data_fingerprint(["a"], ["b"]) != data_fingerprint(["a"], [None])
    assert data_fingerprint(["a"]) != data_fingerprint(["a"], [""])


def test_corrupt_cache_file_is_rebuilt(tok, tmp_path):
    tokenize(TEXTS, tok, 16, cache_dir=tmp_path)
    (path,) = tmp_path.glob("tokens-*.npz")
    path.write_bytes(b"not a zip")
    again = tokenize(TEXTS, tok, 16, cache_dir=tmp_path)
    assert not again.from_cache
    assert tokenize(TEXTS, tok, 16, cache_dir=tmp_path).from_cache


def test_bad_arguments(tok):
    with pytest.raises(ConfigError, match="max_length"):
        tokenize(TEXTS, tok, 2)
    with pytest.raises(DataError, match="pairs"):
        tokenize(TEXTS, tok, 16, pairs=["x"])
    with pytest.raises(ConfigError, match="fast tokenizer"):
        tokenize(TEXTS, object(), 16)

"""Tokenisation: batched calls to the fast (Rust) tokenizer, cached on disk.

Texts are tokenised once per (tokenizer, data, max length): the result is an
``.npz`` in the cache directory named by a hash of the tokenizer's full
definition (vocabulary, normaliser, special tokens; the ``tokenizers``
version), of the texts, and of ``max_length``. A second run loads it instead
of tokenising again. Texts longer than ``max_length`` tokens are truncated
(pairs longest-first), counted, and reported.

Token ids are stored right-padded to ``max_length`` (uint16 when the vocabulary
fits, to halve the memory of large splits); batches cut them to their bucket.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mtop_jax.errors import ConfigError, DataError

log = logging.getLogger(__name__)

CACHE_VERSION = 1
_CHUNK = 4096  # texts per call: big enough for the Rust thread pool, small for the progress bar


@dataclasses.dataclass(frozen=True, eq=False)
class Encoded:
    """Token ids of n texts, right-padded with ``pad_id`` to ``max_length``."""

    input_ids: np.ndarray  # [n, max_length] uint16 or int32
    token_type_ids: np.ndarray  # [n, max_length] int8
    lengths: np.ndarray  # [n] int32, tokens before padding
    truncated: np.ndarray  # [n] bool
    max_length: int
    pad_id: int
    from_cache: bool = False
    seconds: float = 0.0  # wall time of the tokenize() call, cache look-up included

    def __len__(self) -> int:
        return len(self.lengths)

    def __repr__(self) -> str:
        return (f"Encoded({len(self)} texts x {self.max_length} tokens, "
                f"{self.num_truncated} truncated{', from cache' if self.from_cache else ''})")

    @property
    def num_truncated(self) -> int:
        return int(self.truncated.sum())

    @staticmethod
    def concatenate(parts: Sequence[Encoded]) -> Encoded:
        if not parts:
            raise DataError("nothing to concatenate")
        if len({(p.max_length, p.pad_id) for p in parts}) != 1:
            raise DataError("encoded parts differ in max_length or pad id")
        if len(parts) == 1:
            return parts[0]
        dtype = np.result_type(*[p.input_ids.dtype for p in parts])
        return Encoded(
            np.concatenate([p.input_ids.astype(dtype, copy=False) for p in parts]),
            np.concatenate([p.token_type_ids for p in parts]),
            np.concatenate([p.lengths for p in parts]),
            np.concatenate([p.truncated for p in parts]),
            parts[0].max_length, parts[0].pad_id,
            all(p.from_cache for p in parts), sum(p.seconds for p in parts))


def default_cache_dir() -> Path:
    """``$MTOP_JAX_CACHE/tokens``, else ``~/.cache/mtop_jax/tokens``."""
    root = os.environ.get("MTOP_JAX_CACHE") or Path.home() / ".cache" / "mtop_jax"
    return Path(root) / "tokens"


def tokenize(texts: Sequence[str], tokenizer: Any, max_length: int, *,
             pairs: Sequence[str | None] | None = None, cache_dir: str | Path | None = None,
             name: str = "texts") -> Encoded:
    """Token ids of ``texts`` (with ``pairs`` as second segments where not None).

    ``tokenizer``: a transformers fast tokenizer or a ``tokenizers.Tokenizer``.
    ``cache_dir=None`` disables the cache.
    """
    if pairs is not None and len(pairs) != len(texts):
        raise DataError(f"{name}: {len(pairs)} pairs for {len(texts)} texts")
    start = time.perf_counter()
    backend = _backend(tokenizer)
    specials = backend.num_special_tokens_to_add(pairs is not None)
    if not isinstance(max_length, int) or max_length <= specials + 1:
        raise ConfigError(f"data.max_length: must be an integer above {specials + 1} "
                          f"(the tokenizer adds {specials} special tokens), got {max_length!r}")
    pad_id = _pad_id(tokenizer, backend)
    path = None
    if cache_dir is not None:
        key = {"version": CACHE_VERSION, "tokenizer": _fingerprint(backend),
               "data": data_fingerprint(texts, pairs), "max_length": max_length, "pad": pad_id}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        path = Path(cache_dir) / f"tokens-{digest[:32]}.npz"
        cached = _load(path, max_length, pad_id, len(texts))
        if cached is not None:
            log.info("%s: %d texts from the token cache %s", name, len(texts), path)
            return dataclasses.replace(cached, seconds=time.perf_counter() - start)
    encoded = _encode(backend, texts, pairs, max_length, pad_id, name)
    encoded = dataclasses.replace(encoded, seconds=time.perf_counter() - start)
    log.info("%s: tokenised %d texts in %.1f s (%.0f texts/s); %d (%.1f%%) truncated to %d "
             "tokens", name, len(texts), encoded.seconds,
             len(texts) / max(encoded.seconds, 1e-9), encoded.num_truncated,
             100 * encoded.num_truncated / max(len(texts), 1), max_length)
    if path is not None:
        _save(path, encoded)
    return encoded


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's definition, without its padding and truncation settings."""
    return _fingerprint(_backend(tokenizer))


def _fingerprint(backend) -> str:
    from tokenizers import __version__ as version

    # to_str() is deterministic (the vocabulary is written in id order).
    blob = f"tokenizers {version}\n{backend.to_str()}"
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()


def data_fingerprint(texts: Sequence[str], pairs: Sequence[str | None] | None = None) -> str:
    """sha256 of the texts (and pairs); lengths first, so boundaries are unambiguous."""
    h = hashlib.sha256()
    for seq in (texts, pairs):
        if seq is None:
            h.update(b"none")
            continue
        h.update(np.array([-1 if t is None else len(t) for t in seq], np.int64).tobytes())
        h.update("\x00".join(t or "" for t in seq).encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def _encode(backend, texts, pairs, max_length, pad_id, name) -> Encoded:
    from tqdm.auto import tqdm

    n = len(texts)
    dtype = np.uint16 if backend.get_vocab_size(with_added_tokens=True) <= 1 << 16 else np.int32
    input_ids = np.full((n, max_length), pad_id, dtype)
    token_type_ids = np.zeros((n, max_length), np.int8)
    lengths = np.zeros(n, np.int32)
    truncated = np.zeros(n, bool)
    backend.enable_truncation(max_length=max_length)
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    quiet = True if n < 20_000 else None  # None: tqdm shows a bar on a terminal only
    with tqdm(total=n, desc=f"tokenising {name}", unit="texts", disable=quiet, leave=False) as bar:
        for start in range(0, n, _CHUNK):
            chunk = list(texts[start:start + _CHUNK])
            if pairs is not None:
                chunk = [t if p is None else (t, p)
                         for t, p in zip(chunk, pairs[start:start + _CHUNK], strict=True)]
            try:
                encodings = encode(chunk)
            except Exception as e:  # the Rust side raises plain Exceptions
                raise DataError(f"{name}: the tokenizer failed on texts {start}.."
                                f"{start + len(chunk) - 1} ({type(e).__name__}: {e})") from None
            for i, enc in enumerate(encodings, start):
                ids = enc.ids
                k = len(ids)
                input_ids[i, :k] = ids
                token_type_ids[i, :k] = enc.type_ids
                lengths[i] = k
                truncated[i] = bool(enc.overflowing)
            bar.update(len(chunk))
    return Encoded(input_ids, token_type_ids, lengths, truncated, max_length, pad_id)


def _load(path: Path, max_length: int, pad_id: int, n: int) -> Encoded | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("input_ids", "token_type_ids", "lengths", "truncated")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        log.warning("%s: unreadable token cache (%s); tokenising again", path, e)
        return None
    if arrays["input_ids"].shape != (n, max_length) or arrays["lengths"].shape != (n,):
        log.warning("%s: token cache of the wrong shape; tokenising again", path)
        return None
    return Encoded(**arrays, max_length=max_length, pad_id=pad_id, from_cache=True)


def _save(path: Path, e: Encoded) -> None:
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, input_ids=e.input_ids, token_type_ids=e.token_type_ids,
                     lengths=e.lengths, truncated=e.truncated)
        os.replace(tmp, path)  # atomic: concurrent processes never read half a file
    except OSError as err:
        log.warning("%s: cannot write the token cache (%s); continuing without it", path, err)
        tmp.unlink(missing_ok=True)


def _backend(tokenizer: Any):
    """A private copy of the Rust tokenizer, with no padding or truncation set."""
    from tokenizers import Tokenizer

    backend = tokenizer if isinstance(tokenizer, Tokenizer) else getattr(
        tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"{type(tokenizer).__name__}: need a fast tokenizer (transformers "
                          "'*TokenizerFast' or tokenizers.Tokenizer), with a tokenizer.json")
    clone = Tokenizer.from_str(backend.to_str())
    clone.no_padding()
    clone.no_truncation()
    return clone


def _pad_id(tokenizer: Any, backend) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None and getattr(tokenizer, "padding", None):
        pad = tokenizer.padding.get("pad_id")
    for token in ("[PAD]", "<pad>"):
        if pad is None:
            pad = backend.token_to_id(token)
    return int(pad or 0)

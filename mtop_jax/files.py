"""Files written whole or not at all: a temporary file in the same directory,
flushed, then renamed over the destination."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
    """A gs:// (or other URI) path: written through etils.epath, as orbax does."""
    return "://" in str(path)


def as_path(path: str | os.PathLike) -> Path | epath.Path:
    """pathlib for local paths; etils.epath for gs:// (pathlib would turn it into gs:/...)."""
    return epath.Path(path) if is_remote(path) else Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    if is_remote(path):  # an object store replaces an object whole
        epath.Path(path).write_bytes(data)
        return
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_npz(path: str | os.PathLike, **arrays) -> None:
    """``np.savez`` written whole or not at all."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())

"""The files a training workdir holds beside its checkpoints: ``model.json`` (the
:class:`~mtop_jax.models.spec.ModelSpec`), ``config.json`` (the run's config) and
``tokenizer/``, each written whole or not at all."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import ml_collections

from mtop_jax.errors import MtopError
from mtop_jax.files import as_path, atomic_write_text, is_remote
from mtop_jax.models.spec import MODEL_FILE, ModelSpec

CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"


def write_model_files(workdir: str | Path, spec: ModelSpec, tokenizer: Any,
                      config_json: str) -> None:
    """``model.json``, ``config.json`` and ``tokenizer/`` in the workdir (atomically)."""
    workdir = as_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(workdir / MODEL_FILE, spec.to_json())
    atomic_write_text(workdir / CONFIG_FILE, config_json)
    tok_dir = workdir / TOKENIZER_DIR
    if (tok_dir / "tokenizer.json").is_file():
        return
    if is_remote(workdir):  # save_pretrained writes local files: save, then copy them up
        with tempfile.TemporaryDirectory() as local:
            tokenizer.save_pretrained(local)
            tok_dir.mkdir(parents=True, exist_ok=True)
            names = sorted(p.name for p in Path(local).iterdir())  # tokenizer.json last
            names.sort(key=lambda name: name == "tokenizer.json")
            for name in names:
                (tok_dir / name).write_bytes((Path(local) / name).read_bytes())
        return
    tmp = workdir / f"{TOKENIZER_DIR}.tmp"
    tokenizer.save_pretrained(str(tmp))
    tmp.replace(tok_dir)


def read_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The config a workdir was trained with."""
    path = as_path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise MtopError(f"{workdir}: not a training workdir (no {CONFIG_FILE})")
    return ml_collections.ConfigDict(json.loads(path.read_text()))

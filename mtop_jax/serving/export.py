"""Inference-only model directories, and a StableHLO artifact for serving without Python
model code.

An exported model directory holds ``model.json`` (encoder config, model config,
task specs, format version, serving max length), ``tokenizer/`` and ``params/``
(orbax, parameters only: no optimizer state). ``mtop_jax.load`` reads it like
a workdir. ``--format stablehlo`` also writes ``predict.stablehlo``: a
serialized ``jax.export`` of ``(input_ids, attention_mask, token_type_ids) ->
logits [B, N, C]`` with the weights inside and a symbolic batch size.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from mtop_jax.errors import MtopError
from mtop_jax.serving.predictor import EXPORT_PARAMS, Predictor

STABLEHLO_FILE = "predict.stablehlo"


def save_model_dir(predictor: Predictor, out: str | Path, *, stablehlo: bool = False) -> Path:
    """Write ``predictor`` as a self-contained model directory, whole or not at all."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise MtopError(f"{out}: exists and is not empty; choose a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    try:
        spec = json.loads(predictor.spec.to_json())
        spec["serving"] = {"max_length": predictor.max_length}
        spec["mtop_jax_version"] = __import__("mtop_jax").__version__
        (tmp / "model.json").write_text(json.dumps(spec, indent=2))
        predictor.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save((tmp / EXPORT_PARAMS).absolute(), predictor.params)
        if stablehlo:
            (tmp / STABLEHLO_FILE).write_bytes(serialize_stablehlo(predictor))
        if out.exists():
            out.rmdir()
        tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def serialize_stablehlo(predictor: Predictor) -> bytes:
    """``jax.export`` of the one-pass forward at the serving length, batch size symbolic."""
    graphdef, params, rest = predictor.graphdef, predictor.params, predictor.rest

    def forward(input_ids, attention_mask, token_type_ids):
        # Fresh Variables in this trace; the weights become constants of the export.
        p, r = jax.tree.map(lambda x: x, (params, rest))
        return nnx.merge(graphdef, p, r).logits(input_ids, attention_mask, token_type_ids)

    (batch,) = jax.export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct((batch, predictor.max_length), jnp.int32)
    exported = jax.export.export(jax.jit(forward))(spec, spec, spec)
    return bytes(exported.serialize())


def load_stablehlo(path: str | Path) -> jax.export.Exported:
    """The exported forward; call it as ``exported.call(ids, mask, types)``."""
    path = Path(path)
    file = path / STABLEHLO_FILE if path.is_dir() else path
    if not file.is_file():
        raise MtopError(f"{file}: no StableHLO export (run mtop-jax export --format stablehlo)")
    return jax.export.deserialize(bytearray(file.read_bytes()))



"""The Flax encoder against Hugging Face's PyTorch BertModel, and weight-loading errors."""

import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtop_jax.errors import WeightsError
from mtop_jax.models import pretrained
from mtop_jax.models.config import PRESETS, EncoderConfig
from mtop_jax.models.encoders.bert import Encoder

REFERENCE = Path(__file__).parent / "reference" / "minilm_reference.npz"


@pytest.fixture(scope="module")
def minilm():
    return pretrained.load_encoder()


def test_parity_with_pytorch_bert(minilm):
    """Last hidden states and pooler within 1e-4 of transformers' BertModel (fp32)."""
    encoder, _ = minilm
    ref = np.load(REFERENCE)
    hidden, pooled = jax.jit(lambda m, *a: m(*a))(
        encoder, jnp.asarray(ref["input_ids"]), jnp.asarray(ref["attention_mask"]),
        jnp.asarray(ref["token_type_ids"]))
    assert ref["attention_mask"].min() == 0, "the reference batch must contain padding"
    np.testing.assert_allclose(hidden, ref["last_hidden_state"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(pooled, ref["pooler_output"], atol=1e-4, rtol=0)


def test_tokenizer_matches_reference():
    ref = np.load(REFERENCE)
    tok = pretrained.load_tokenizer()
    batch = tok([str(t) for t in ref["texts"]], padding=True, return_tensors="np")
    np.testing.assert_array_equal(batch["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(batch["attention_mask"], ref["attention_mask"])


def test_padding_does_not_change_real_tokens(minilm):
    encoder, _ = minilm
    ids = jnp.array([[101, 7592, 2088, 102]])
    h_short, p_short = encoder(ids)
    padded = jnp.concatenate([ids, jnp.zeros((1, 6), ids.dtype)], axis=1)
    mask = (padded != 0).astype(jnp.int32)
    h_long, p_long = encoder(padded, mask)
    np.testing.assert_allclose(h_long[:, :4], h_short, atol=1e-5)
    np.testing.assert_allclose(p_long, p_short, atol=1e-5)


def test_bf16_compute_keeps_fp32_params_and_stays_close(minilm):
    encoder, cfg = minilm
    ref = np.load(REFERENCE)
    bf16 = Encoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    nnx.update(bf16, nnx.state(encoder))
    bf16.eval()
    params = jax.tree.leaves(nnx.state(bf16, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)
    _, pooled = bf16(jnp.asarray(ref["input_ids"]), jnp.asarray(ref["attention_mask"]))
    assert np.abs(np.asarray(pooled, np.float32) - ref["pooler_output"]).max() < 0.1


def test_params_carry_logical_axes():
    enc = Encoder(PRESETS["tiny"], rngs=nnx.Rngs(0))
    layer = enc.layers[0]
    assert layer.attention.query.kernel.get_metadata()["out_sharding"] == ("embed", "heads")
    assert layer.ffn.intermediate.kernel.get_metadata()["out_sharding"] == ("embed", "mlp")
    assert enc.embeddings.word_embeddings.embedding.get_metadata()["out_sharding"] == (
        "vocab", "embed")


def test_roberta_positions_skip_padding():
    cfg = PRESETS["tiny"].replace(offset_positions=True, pad_token_id=1, type_vocab_size=1,
                                  model_type="roberta")
    enc = Encoder(cfg, rngs=nnx.Rngs(0))
    ids = jnp.array([[0, 5, 6, 2, 1, 1]])
    np.testing.assert_array_equal(enc.embeddings.position_ids(ids), [[2, 3, 4, 5, 1, 1]])


def test_model_without_token_types():
    cfg = PRESETS["tiny"].replace(type_vocab_size=0)
    enc = Encoder(cfg, rngs=nnx.Rngs(0))
    assert enc.embeddings.token_type_embeddings is None
    hidden, _ = enc(jnp.ones((2, 5), jnp.int32))
    assert hidden.shape == (2, 5, cfg.hidden_size)


# --------------------------------------------------------------------------- loading


def _copy_default(tmp_path: Path) -> Path:
    src = pretrained.default_model_dir()
    dst = tmp_path / "model"
    dst.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
              "special_tokens_map.json"):
        shutil.copy(src / f, dst / f)
    return dst


def test_sharded_safetensors_load_like_single(tmp_path, minilm):
    from safetensors.numpy import save_file

    dst = _copy_default(tmp_path)
    tensors = pretrained.read_safetensors(pretrained.default_model_dir())
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for fname, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(dst / fname))
        weight_map.update({k: fname for k in keys})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    enc, _ = pretrained.load_encoder(dst)
    ref, _ = minilm
    for a, b in zip(jax.tree.leaves(nnx.state(enc, nnx.Param)),
                    jax.tree.leaves(nnx.state(ref, nnx.Param)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_mismatched_checkpoint_lists_every_problem(tmp_path):
    from safetensors.numpy import save_file

    dst = _copy_default(tmp_path)
    tensors = pretrained.read_safetensors(pretrained.default_model_dir())
    del tensors["encoder.layer.3.output.dense.bias"]
    tensors["encoder.layer.9.extra.weight"] = np.zeros((2,), np.float32)
    tensors["embeddings.word_embeddings.weight"] = np.zeros((10, 384), np.float32)
    save_file(tensors, str(dst / "model.safetensors"))
    with pytest.raises(WeightsError) as e:
        pretrained.load_encoder(dst)
    msg = str(e.value)
    assert "missing ['encoder.layer.3.output.dense.bias']" in msg
    assert "unexpected ['encoder.layer.9.extra.weight']" in msg
    assert "mis-shaped ['embeddings.word_embeddings.weight (10, 384)" in msg


def test_truncated_safetensors_is_one_clear_error(tmp_path):
    dst = _copy_default(tmp_path)
    data = (pretrained.default_model_dir() / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        pretrained.load_encoder(dst)


def test_missing_config_json(tmp_path):
    dst = _copy_default(tmp_path)
    (dst / "config.json").unlink()
    with pytest.raises(WeightsError, match="config.json not found"):
        pretrained.load_encoder(dst)


def test_default_weights_sha256_is_enforced(monkeypatch):
    weights = (pretrained.default_model_dir() / "model.safetensors").resolve()
    assert pretrained.sha256_of(weights) == pretrained.DEFAULT_SHA256
    # Installed weights that are not the expected ones: here, by expecting other bytes.
    monkeypatch.setattr(pretrained, "DEFAULT_SHA256", "0" * 64)
    with pytest.raises(WeightsError, match=re.escape(f"{weights}: sha256 ") + ".* does not match"):
        pretrained.default_model_dir()
    with pytest.raises(WeightsError, match="does not match the expected"):
        pretrained.resolve_model_dir(pretrained.DEFAULT_MODEL)  # what load_encoder() uses
    assert pretrained.default_model_dir(verify=False).is_dir()


def test_hub_name_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="the hub could not provide it"):
        pretrained.resolve_model_dir("no-such-org/no-such-model-xyz")


def test_config_rejects_unsupported_model_type():
    with pytest.raises(WeightsError, match="model_type 'gpt2' is not supported"):
        EncoderConfig.from_hf_dict({"model_type": "gpt2"})

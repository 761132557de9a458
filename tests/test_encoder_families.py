"""Every encoder family against Hugging Face's PyTorch model, and MTOP on each.

``tests/reference/encoders/<family>/`` holds a tiny random-weight checkpoint of
each family as ``save_pretrained`` wrote it, and that model's outputs on a padded
batch (recorded by ``tests/reference/record_encoder_references.py``).
"""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_helpers import assert_fast_equals_dense, make_model
from safetensors.numpy import save_file

from mtop_jax.data.tasks import TaskSpec
from mtop_jax.errors import WeightsError
from mtop_jax.models import pretrained
from mtop_jax.models.config import SUPPORTED_MODEL_TYPES, EncoderConfig
from mtop_jax.models.encoders import build_encoder
from mtop_jax.models.multitask import ModelConfig, load_backbone
from mtop_jax.models.spec import ModelSpec

REFERENCES = Path(__file__).parent / "reference" / "encoders"
FAMILIES = ("bert", "roberta", "xlm-roberta", "electra", "distilbert", "modernbert",
            "deberta-v3", "deberta-v2")
# pooler_output: BERT's tanh pooler, ModernBERT's head on its pooled tokens, DeBERTa's
# context pooler
WITH_POOLER = {"bert", "roberta", "xlm-roberta", "modernbert", "deberta-v3", "deberta-v2"}
# reference directory -> its config's model_type, where they differ
MODEL_TYPE = {"deberta-v3": "deberta-v2"}


@functools.cache
def loaded(family: str):
    """(config, checkpoint params, bare encoder, reference arrays) of a family."""
    model_dir = REFERENCES / family
    cfg = pretrained.load_config(model_dir)
    params = pretrained.encoder_params(cfg, pretrained.read_safetensors(model_dir),
                                       source=str(model_dir))
    encoder, _ = pretrained.load_encoder(model_dir)
    return cfg, params, encoder, dict(np.load(model_dir / "reference.npz"))


def inputs(ref: dict[str, np.ndarray]):
    types = ref.get("token_type_ids")
    return (jnp.asarray(ref["input_ids"]), jnp.asarray(ref["attention_mask"]),
            None if types is None else jnp.asarray(types))


_encode = jax.jit(lambda e, i, k, t: e(i, k, t))


@pytest.mark.parametrize("family", FAMILIES)
def test_parity_with_hugging_face(family):
    """Hidden states (real tokens) and pooler within 1e-4 of transformers (fp32)."""
    cfg, _, encoder, ref = loaded(family)
    assert cfg.model_type == MODEL_TYPE.get(family, family)
    assert ref["attention_mask"].min() == 0, "the reference batch must contain padding"
    assert ("pooler_output" in ref) == (family in WITH_POOLER)
    hidden, pooled = _encode(encoder, *inputs(ref))
    real = ref["attention_mask"].astype(bool)
    error = np.abs(np.asarray(hidden) - ref["last_hidden_state"])[real].max()
    assert error < 1e-4, f"{family}: hidden states differ by {error}"
    if "pooler_output" in ref:
        error = np.abs(np.asarray(pooled) - ref["pooler_output"]).max()
        assert error < 1e-4, f"{family}: pooler output differs by {error}"


@pytest.mark.parametrize("family", FAMILIES)
def test_mtop_fast_path_and_I1_on_family_weights(family):
    """On each family's weights: the fast path equals the dense reference, and the input
    tokens' states are the bare encoder's (I1)."""
    cfg, params, encoder, ref = loaded(family)
    model = make_model(3, encoder_cfg=cfg, num_prompts=2, prompt_depth="deep")
    load_backbone(model, params)  # a family without a pooler keeps the random one
    batch = inputs(ref)
    _, x = assert_fast_equals_dense(model, *batch)
    hidden, _ = _encode(encoder, *batch)
    np.testing.assert_array_equal(x, hidden)


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_does_not_move_the_prompts(family):
    """DESIGN.md section 9: prompt slot j sits at len(row) + j, so a row's prompts (and
    logits) are the same padded to the batch's length as alone without padding; with
    rotary or relative positions at L + j they would not be."""
    cfg, params, _, ref = loaded(family)
    model = make_model(2, encoder_cfg=cfg, num_prompts=2, prompt_depth="deep")
    load_backbone(model, params)
    ids, mask, types = inputs(ref)
    run = jax.jit(lambda m, i, k, t: (m.mtop_states(i, k, t)[1], m.logits(i, k, t)))
    padded = run(model, ids, mask, types)
    n = int(ref["attention_mask"][1].sum())  # row 1: 6 real tokens of 9
    alone = run(model, ids[1:2, :n], mask[1:2, :n], None if types is None else types[1:2, :n])
    for got, want in zip(alone, padded):
        np.testing.assert_allclose(got[0], want[1], atol=1e-5, rtol=0)


#: bf16 compute against fp32 on states of magnitude ~3 (measured at most 0.016)
BF16_ATOL = 0.05


@pytest.mark.parametrize("family", ["modernbert", "deberta-v3", "deberta-v2"])
def test_bf16_compute_stays_close_to_fp32(family):
    """Params stay fp32; bf16 compute (attention through attention.input_attention)
    keeps hidden states and pooler within BF16_ATOL of fp32 (MiniLM: test_encoder)."""
    cfg, params, encoder, ref = loaded(family)
    half = build_encoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    nnx.update(half, nnx.state(encoder))
    half.eval()
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(half, nnx.Param)))
    (h16, p16), (h32, p32) = _encode(half, *inputs(ref)), _encode(encoder, *inputs(ref))
    real = ref["attention_mask"].astype(bool)
    assert np.abs(np.asarray(h16, np.float32) - np.asarray(h32))[real].max() < BF16_ATOL
    assert np.abs(np.asarray(p16, np.float32) - np.asarray(p32)).max() < BF16_ATOL


@pytest.mark.parametrize("family", FAMILIES)
def test_config_round_trips_through_model_json(family):
    cfg, *_ = loaded(family)
    assert EncoderConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    spec = ModelSpec(cfg, ModelConfig(), (TaskSpec("t", labels=("a", "b")),))
    assert ModelSpec.from_json(spec.to_json()).encoder == cfg


def test_distilbert_config_fields():
    cfg, *_ = loaded("distilbert")
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.intermediate_size) == (
        32, 2, 4, 37)
    assert cfg.type_vocab_size == 0 and cfg.layer_norm_eps == 1e-12
    assert not cfg.offset_positions


def test_distilbert_with_sinusoidal_positions_is_rejected():
    d = EncoderConfig(hidden_size=32, num_heads=4).replace(model_type="distilbert").to_hf_dict()
    with pytest.raises(WeightsError, match="sinusoidal_pos_embds"):
        EncoderConfig.from_hf_dict({**d, "sinusoidal_pos_embds": True})


def test_distilbert_task_checkpoint_loads_its_encoder():
    """A DistilBertForSequenceClassification-style file: ``distilbert.`` prefix, heads."""
    cfg, params, _, _ = loaded("distilbert")
    tensors = pretrained.read_safetensors(REFERENCES / "distilbert")
    task = {f"distilbert.{k}": v for k, v in tensors.items()}
    h = cfg.hidden_size
    task.update({"pre_classifier.weight": np.zeros((h, h), np.float32),
                 "classifier.weight": np.zeros((2, h), np.float32)})
    got = pretrained.encoder_params(cfg, task)
    assert got.keys() == params.keys()
    for k in params:
        np.testing.assert_array_equal(got[k], params[k])


def test_distilbert_mismatch_names_distilbert_tensors(tmp_path):
    tensors = pretrained.read_safetensors(REFERENCES / "distilbert")
    del tensors["transformer.layer.1.ffn.lin2.bias"]
    (tmp_path / "config.json").write_bytes((REFERENCES / "distilbert" / "config.json")
                                           .read_bytes())
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"missing \['transformer.layer.1.ffn.lin2.bias'\]"):
        pretrained.load_encoder(tmp_path)


def test_unsupported_model_type_names_the_supported_ones():
    assert "distilbert" in SUPPORTED_MODEL_TYPES
    with pytest.raises(WeightsError, match="model_type 'deberta' is not supported; "
                                           r"expected one of \[.*'distilbert'.*'modernbert'"):
        EncoderConfig.from_hf_dict({"model_type": "deberta"})

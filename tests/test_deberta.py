"""DeBERTa-v2/v3 beyond parity (tests/test_encoder_families.py): relative position
buckets, its config forms, and MTOP on it (I2, every mode, parameters per task)."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from model_helpers import make_model

from mtop_jax.errors import WeightsError
from mtop_jax.models import pretrained
from mtop_jax.models.config import PRESETS, EncoderConfig
from mtop_jax.models.encoders.deberta import log_buckets
from mtop_jax.models.multitask import load_backbone, params_per_task

REFERENCES = Path(__file__).parent / "reference" / "encoders"


def reference(family: str):
    directory = REFERENCES / family
    ref = dict(np.load(directory / "reference.npz"))
    cfg = pretrained.load_config(directory)
    params = pretrained.encoder_params(cfg, pretrained.read_safetensors(directory))
    types = ref.get("token_type_ids")
    return ref, cfg, params, (ref["input_ids"], ref["attention_mask"], types)


def test_log_buckets_are_exact_near_and_logarithmic_far():
    """transformers' make_log_bucket_position with 8 buckets up to position 64."""
    distance = np.array([0, 3, 4, 5, 8, 9, 17, 63, 100, -1, -5, -63])
    np.testing.assert_array_equal(log_buckets(distance, 8, 64),
                                  [0, 3, 4, 5, 5, 5, 6, 7, 8, -1, -5, -7])


def test_config_fields_and_older_forms():
    cfg = pretrained.load_config(REFERENCES / "deberta-v3")
    assert (cfg.relative_attention, cfg.position_buckets, cfg.relative_span) == (True, 8, 8)
    assert cfg.share_att_key and cfg.norm_rel_ebd and not cfg.position_biased_input
    assert not cfg.learned_positions and cfg.type_vocab_size == 0
    v2 = json.loads((REFERENCES / "deberta-v2" / "config.json").read_text())
    old = EncoderConfig.from_hf_dict({**v2, "pos_att_type": "c2p|p2c"})
    assert old == pretrained.load_config(REFERENCES / "deberta-v2")
    assert old.relative_span == 6 and old.learned_positions and not old.share_att_key
    with pytest.raises(WeightsError, match="conv_kernel_size"):
        EncoderConfig.from_hf_dict({**v2, "conv_kernel_size": 3})
    with pytest.raises(WeightsError, match=r"pos_att_type \['c2p', 'p2p'\]"):
        EncoderConfig.from_hf_dict({**v2, "pos_att_type": ["c2p", "p2p"]})


@pytest.mark.parametrize("family", ["deberta-v3", "deberta-v2"])
def test_mtop_I2_on_deberta_weights(family):
    _, cfg, params, batch = reference(family)
    full = make_model(3, encoder_cfg=cfg, num_prompts=2, prompt_depth="deep")
    load_backbone(full, params)
    run = jax.jit(lambda m, i, k, t: m(i, k, t))
    out = run(full, *batch)
    for name in full.task_names:
        alone = run(full.select_tasks([name]), *batch)
        np.testing.assert_allclose(alone[name], out[name], atol=1e-5, rtol=0, err_msg=name)


@pytest.mark.parametrize("mode", ["shared", "prefix", "single"])
def test_other_modes_run_on_deberta_and_keep_I2(mode):
    """shared reads the context pooler on [CLS] (the reference's pooler output); prefix
    keys have no position, so only their content scores count."""
    ref, cfg, params, batch = reference("deberta-v3")
    full = make_model(2, mode=mode, encoder_cfg=cfg, num_prompts=2)
    if mode == "shared":
        load_backbone(full, params)
        features = jax.jit(lambda m, i, k: m.features(i, k))(full, *batch[:2])
        np.testing.assert_allclose(features[:, 0], ref["pooler_output"], atol=1e-4, rtol=0)
    run = jax.jit(lambda m, i, k: m(i, k))
    out = run(full, *batch[:2])
    alone = run(full.select_tasks(["task1"]), *batch[:2])
    np.testing.assert_allclose(alone["task1"], out["task1"], atol=1e-5, rtol=0)
    assert all(np.isfinite(np.asarray(v)).all() for v in out.values())


def test_params_per_task_at_4_prompts():
    """v3 has no absolute positions, so no per-slot position embedding either: one more
    task adds its prompts, its pooling query and its head."""
    cfg = PRESETS["deberta-v3-tiny"]
    model = make_model(2, encoder_cfg=cfg, num_prompts=4)  # heads of 2 and 3 classes
    assert model.prompts.slot_position is None
    h = cfg.hidden_size
    assert params_per_task(model) == 4 * h + h + (h * 3 + 3)

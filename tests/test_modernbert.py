"""ModernBERT beyond parity (tests/test_encoder_families.py): its config in both
transformers forms, its checkpoints' names, the local window, and MTOP's rule for
prompt positions (DESIGN.md section 9): I2 and the window applied to prompts."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_helpers import make_model

from mtop_jax.errors import WeightsError
from mtop_jax.models import pretrained
from mtop_jax.models.config import FULL, PRESETS, SLIDING, EncoderConfig
from mtop_jax.models.encoders import build_encoder
from mtop_jax.models.multitask import load_backbone, params_per_task
from mtop_jax.models.prompt_attention import prompt_positions

DIRECTORY = Path(__file__).parent / "reference" / "encoders" / "modernbert"
_encode = jax.jit(lambda e, i, k: e(i, k))


def reference():
    ref = dict(np.load(DIRECTORY / "reference.npz"))
    return ref, jnp.asarray(ref["input_ids"]), jnp.asarray(ref["attention_mask"])


def hf_config() -> dict:
    return json.loads((DIRECTORY / "config.json").read_text())


def test_config_reads_transformers_4_form_as_5_form():
    """4.x wrote global_attn_every_n_layers and *_rope_theta; 5.x layer_types and
    rope_parameters. Both give one config."""
    new = hf_config()
    old = {k: v for k, v in new.items() if k not in ("layer_types", "rope_parameters")}
    old.update(global_attn_every_n_layers=3, global_rope_theta=160000.0,
               local_rope_theta=10000.0)
    cfg = EncoderConfig.from_hf_dict(new)
    assert EncoderConfig.from_hf_dict(old) == cfg
    assert cfg.layer_types == (FULL, SLIDING, SLIDING) and cfg.local_attention == 4
    assert [cfg.window(i) for i in range(3)] == [None, 2, 2]
    assert not (cfg.norm_bias or cfg.attention_bias or cfg.mlp_bias or cfg.classifier_bias)
    assert not cfg.learned_positions and cfg.family == "modernbert"


def test_scaled_rope_is_rejected():
    d = hf_config()
    d["rope_parameters"] = {**d["rope_parameters"],
                            FULL: {"rope_type": "linear", "rope_theta": 1.0, "factor": 2.0}}
    with pytest.raises(WeightsError, match="rope_type 'linear' is not supported"):
        EncoderConfig.from_hf_dict(d)


def test_checkpoint_names_bare_model_and_no_biases():
    """A bare ModernBertModel's tensors (no ``model.`` prefix, no head) load, the head
    keeping its init; no bias parameter exists where ModernBERT has none."""
    cfg = pretrained.load_config(DIRECTORY)
    tensors = pretrained.read_safetensors(DIRECTORY)
    bare = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    params = pretrained.encoder_params(cfg, bare)
    assert not any(path[0] == "pooler" for path in params)
    with pytest.raises(WeightsError, match=r"missing \['head.dense.weight', 'head.norm"):
        pretrained.encoder_params(cfg, bare, require_pooler=True)
    assert not any(path[-1] == "bias" for path in pretrained.expected_shapes(cfg))


def test_reference_batch_exercises_the_window():
    """Without the local window the encoder is off by far more than the parity
    tolerance, so test_encoder_families' parity checks the window."""
    ref, ids, mask = reference()
    encoder, cfg = pretrained.load_encoder(DIRECTORY)
    wide = build_encoder(cfg.replace(layer_types=(FULL,) * 3), rngs=nnx.Rngs(0))
    nnx.update(wide, nnx.state(encoder))
    hidden, _ = _encode(wide, ids, mask)
    real = ref["attention_mask"].astype(bool)
    assert np.abs(np.asarray(hidden) - ref["last_hidden_state"])[real].max() > 1e-2


def test_prompt_positions_follow_each_rows_real_tokens():
    _, _, mask = reference()  # rows of 9, 6 and 3 tokens
    np.testing.assert_array_equal(prompt_positions(mask, 2), [[9, 10], [6, 7], [3, 4]])


def test_window_applies_to_prompts_at_their_positions():
    """All layers local (+-2), 3 layers: a prompt at position n + j reads, through the
    layers, tokens down to position n - 6 and none before."""
    cfg = PRESETS["modernbert-tiny"].replace(layer_types=(SLIDING,) * 3, local_attention=4)
    model = make_model(2, encoder_cfg=cfg, num_prompts=2)
    prompts = jax.jit(lambda m, i, k: m.mtop_states(i, k)[1])
    n = 16
    ids = jnp.asarray(np.random.RandomState(0).randint(5, 100, (1, n + 4)))
    mask = jnp.asarray([[1] * n + [0] * 4])
    base = prompts(model, ids, mask)
    far = prompts(model, ids.at[0, n - 7].set(4), mask)  # 7 before the first prompt
    near = prompts(model, ids.at[0, n - 6].set(4), mask)
    np.testing.assert_array_equal(far, base)
    assert np.abs(np.asarray(near - base)).max() > 1e-4


def test_mtop_I2_on_modernbert_weights():
    """Each task alone equals that task among all, on the reference checkpoint with
    padded rows (prompt positions differ per row)."""
    _, ids, mask = reference()
    cfg = pretrained.load_config(DIRECTORY)
    full = make_model(3, encoder_cfg=cfg, num_prompts=2, prompt_depth="deep")
    load_backbone(full, pretrained.encoder_params(cfg, pretrained.read_safetensors(DIRECTORY)))
    run = jax.jit(lambda m, i, k: m(i, k))
    out = run(full, ids, mask)
    for name in full.task_names:
        alone = run(full.select_tasks([name]), ids, mask)
        np.testing.assert_allclose(alone[name], out[name], atol=1e-5, rtol=0, err_msg=name)


def test_params_per_task_have_no_slot_positions():
    """Rotary prompts need no per-slot position embedding: at P=4 one more task adds
    its prompts, its pooling query and its head only."""
    cfg = PRESETS["modernbert-tiny"]
    model = make_model(2, encoder_cfg=cfg, num_prompts=4)  # heads of 2 and 3 classes
    assert model.prompts.slot_position is None
    h = cfg.hidden_size
    assert params_per_task(model) == 4 * h + h + (h * 3 + 3)


@pytest.mark.parametrize("mode", ["shared", "prefix", "single"])
def test_other_modes_run_on_modernbert_and_keep_I2(mode):
    """shared reads the head on the mean of the tokens (the reference's pooling), prefix
    keys sit outside every window, single vmaps whole encoders."""
    ref, ids, mask = reference()
    cfg = pretrained.load_config(DIRECTORY)
    full = make_model(2, mode=mode, encoder_cfg=cfg, num_prompts=2)
    if mode == "shared":
        load_backbone(full, pretrained.encoder_params(
            cfg, pretrained.read_safetensors(DIRECTORY)))
        features = jax.jit(lambda m, i, k: m.features(i, k))(full, ids, mask)
        np.testing.assert_allclose(features[:, 1], ref["pooler_output"], atol=1e-4, rtol=0)
    run = jax.jit(lambda m, i, k: m(i, k))
    out = run(full, ids, mask)
    alone = run(full.select_tasks(["task1"]), ids, mask)
    np.testing.assert_allclose(alone["task1"], out["task1"], atol=1e-5, rtol=0)
    assert all(np.isfinite(np.asarray(v)).all() for v in out.values())

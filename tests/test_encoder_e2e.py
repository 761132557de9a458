"""``mtop-jax train`` then ``predict`` on the encoder families beyond BERT (ModernBERT,
DeBERTa-v3): a random tiny model (MiniLM's tokenizer) and a local Hugging Face
directory (config, safetensors and tokenizer.json written by
tests/reference/record_encoder_references.py)."""

import contextlib
import io
import json
from pathlib import Path

import pytest

from mtop_jax.cli import main
from mtop_jax.models import pretrained

ROOT = Path(__file__).parents[1]
REFERENCES = ROOT / "tests" / "reference" / "encoders"
TEXTS = ["GNU C library: shared libraries", "Python bindings for the GTK toolkit"]


# model directory -> its tokenizer's (CLS, SEP) ids: ModernBERT's order, DeBERTa-v3's
SPECIAL_IDS = {"modernbert": (2, 3), "deberta-v3": (1, 2)}


@pytest.mark.parametrize("encoder,model_type", [
    ("random:modernbert-tiny", "modernbert"),
    (str(REFERENCES / "modernbert"), "modernbert"),
    ("random:deberta-v3-tiny", "deberta-v2"),
    (str(REFERENCES / "deberta-v3"), "deberta-v2"),
])
def test_train_then_predict(encoder, model_type, tmp_path, capsys):
    workdir = tmp_path / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["train", "--config", str(ROOT / "configs" / "tiny.py"), "--workdir",
                     str(workdir), f"--config.encoder={encoder}", "--config.train.steps=2",
                     "--config.train.eval_split=", "--config.data.max_examples=64",
                     "--config.model.prompt_depth=deep"]) == 0
    assert "== test split, step 2" in out.getvalue()
    spec = json.loads((workdir / "model.json").read_text())
    assert spec["encoder"]["model_type"] == model_type
    capsys.readouterr()
    assert main(["predict", "--model", str(workdir), "--text", TEXTS[0], "--text",
                 TEXTS[1], "--top-k", "all"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["text"] for x in lines] == TEXTS
    for line in lines:
        for task in ("implemented_in", "interface", "role", "section"):
            answer = line["predictions"][task]
            assert answer["top_k"][0] == [answer["label"], answer["score"]]
            assert abs(sum(score for _, score in answer["top_k"]) - 1) < 1e-5
    if not encoder.startswith("random:"):
        # the directory's own tokenizer, with the family's special tokens, went with the model
        tok = pretrained.load_tokenizer(workdir / "tokenizer")
        assert (tok.cls_token, tok.sep_token, tok.pad_token) == ("[CLS]", "[SEP]", "[PAD]")
        ids = tok("gnu c library")["input_ids"]
        cls_id, sep_id = SPECIAL_IDS[Path(encoder).name]
        assert ids[0] == tok.cls_token_id == cls_id and ids[-1] == tok.sep_token_id == sep_id
        assert len(ids) == 5 and tok.unk_token_id not in ids

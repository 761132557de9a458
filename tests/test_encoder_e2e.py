"""``mtop-jax train`` then ``predict`` on every encoder family: a random tiny model
(MiniLM's tokenizer) of ModernBERT and DeBERTa-v3, and each family's local Hugging Face
directory (config, safetensors and tokenizer.json written by
tests/reference/record_encoder_references.py). The BERT-layout directories but
RoBERTa's run under ``make test-all`` (MiniLM's real directory is the CI's)."""

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


BERT = ("[CLS]", "[SEP]", "[PAD]", 2, 3)
ROBERTA = ("<s>", "</s>", "<pad>", 0, 2)
# model directory -> its tokenizer's (CLS, SEP, PAD) tokens and (CLS, SEP) ids
SPECIAL = {"bert": BERT, "electra": BERT, "distilbert": BERT, "modernbert": BERT,
           "roberta": ROBERTA, "xlm-roberta": ROBERTA,
           "deberta-v3": ("[CLS]", "[SEP]", "[PAD]", 1, 2)}
SLOW = pytest.mark.slow


@pytest.mark.parametrize("encoder,model_type", [
    # make test trains and predicts end to end with RoBERTa (a tokenizer with <s>/</s>);
    # the other families run in make test-all (40-70 s each here): make test checks
    # their numerics against the reference models (test_modernbert.py, test_deberta.py,
    # test_encoder_families.py) and the train path is the same code for all.
    pytest.param("random:modernbert-tiny", "modernbert", marks=SLOW),
    pytest.param(str(REFERENCES / "modernbert"), "modernbert", marks=SLOW),
    pytest.param("random:deberta-v3-tiny", "deberta-v2", marks=SLOW),
    pytest.param(str(REFERENCES / "deberta-v3"), "deberta-v2", marks=SLOW),
    (str(REFERENCES / "roberta"), "roberta"),
    pytest.param(str(REFERENCES / "bert"), "bert", marks=SLOW),
    pytest.param(str(REFERENCES / "xlm-roberta"), "xlm-roberta", marks=SLOW),
    pytest.param(str(REFERENCES / "electra"), "electra", marks=SLOW),
    pytest.param(str(REFERENCES / "distilbert"), "distilbert", marks=SLOW),
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
        *tokens, cls_id, sep_id = SPECIAL[Path(encoder).name]
        assert [tok.cls_token, tok.sep_token, tok.pad_token] == tokens
        ids = tok("gnu c library")["input_ids"]
        assert ids[0] == tok.cls_token_id == cls_id and ids[-1] == tok.sep_token_id == sep_id
        assert len(ids) == 5 and tok.unk_token_id not in ids

"""Record Hugging Face PyTorch outputs of tiny random encoders, one per family, for
``tests/test_encoder_families.py``.

Run once, in a throwaway environment that has torch (torch is not a dependency
of mtop-jax or of its CI), from the repository root:

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch 'transformers>=5' safetensors numpy
    /tmp/refvenv/bin/python tests/reference/record_encoder_references.py [family ...]

(no family: all of them; the seed of each is its place in ``FAMILIES``, so
recording one leaves the others as they were). For each BERT-layout family
(bert, roberta, xlm-roberta, electra, distilbert) it builds a small
random-weight base model (hidden 32, 2 layers, 4 heads, intermediate 37,
vocab 100, 64 positions; every parameter perturbed away from its init, so that
LayerNorm scales and zero-initialised biases are tested too) and writes into
``tests/reference/encoders/<family>/``:

- ``config.json`` and ``model.safetensors``, as ``save_pretrained`` writes them;
- ``reference.npz``: a fixed padded batch (``input_ids`` [3, 9] with rows of 9, 6
  and 3 tokens padded with the family's pad id, ``attention_mask``, and
  ``token_type_ids`` where the family has a token-type embedding), the model's
  ``last_hidden_state`` and, for the families with a pooler (bert, roberta,
  xlm-roberta), its ``pooler_output``; ``versions`` says which torch and
  transformers recorded them.

Every family's directory also holds a ``tokenizer.json`` (``save_tokenizer``: a
word-level vocabulary of the ids 0..99 with the family's special tokens at the ids
the reference batch uses), so that each is a complete local model directory for
``mtop-jax train`` and ``predict``; ``--tokenizers-only`` rewrites just those (no torch).

``modernbert`` is recorded from a ``ModernBertForSequenceClassification`` (3
layers: global, local, local with a window of +-2 positions, so that the
reference batch feels it; no biases, as ModernBERT has none; mean pooling):
its ``config.json``/``model.safetensors`` (``model.*``, ``head.*`` and
``classifier.*`` tensors), the encoder's ``last_hidden_state``, and as
``pooler_output`` its head on the mean of the real tokens' states. Beside them
a ``tokenizer.json`` (a word-level vocabulary of the ids 0..99 with
ModernBERT's special tokens [PAD] [UNK] [CLS] [SEP] [MASK]) makes the
directory a complete local model for ``mtop-jax train``.

DeBERTa is recorded twice from a ``DebertaV2ForSequenceClassification``
(``deberta.*``, ``pooler.*`` and ``classifier.*`` tensors; ``pooler_output`` is
its ContextPooler on [CLS]): ``deberta-v3`` as v3 is configured (c2p and p2c
through the shared content projections, log buckets of 8 so that the batch's
distances reach the log range, normalised relative embeddings, no absolute
positions, no token types; with a tokenizer.json of DeBERTa-v3's special tokens
[PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3), and ``deberta-v2`` as older v2 files are
(one layer 16 wide, 2 heads; separate position projections, exact distances
clamped at +-6, absolute positions and token types too; ``pos_att_type`` given as
the "c2p|p2c" string older files hold, saved as a list).
"""

from pathlib import Path

import numpy as np
import transformers
from transformers import (
    BertConfig,
    DebertaV2Config,
    DistilBertConfig,
    ElectraConfig,
    ModernBertConfig,
    RobertaConfig,
    XLMRobertaConfig,
)

DEST = Path(__file__).with_name("encoders")
HIDDEN, LAYERS, HEADS, INTERMEDIATE, VOCAB, POSITIONS = 32, 2, 4, 37, 100, 64
LENGTHS = (9, 6, 3)

BERT_LIKE = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                 num_attention_heads=HEADS, intermediate_size=INTERMEDIATE,
                 max_position_embeddings=POSITIONS, hidden_act="gelu")
ROBERTA_LIKE = dict(BERT_LIKE, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                    type_vocab_size=1, layer_norm_eps=1e-5)

# family -> (config, transformers' model class name, cls/bos id, sep/eos id, pad id,
#           has token types)
FAMILIES = {
    "bert": (BertConfig(**BERT_LIKE), "BertModel", 2, 3, 0, True),
    "roberta": (RobertaConfig(**ROBERTA_LIKE), "RobertaModel", 0, 2, 1, True),
    "xlm-roberta": (XLMRobertaConfig(**ROBERTA_LIKE), "XLMRobertaModel", 0, 2, 1, True),
    "electra": (ElectraConfig(**BERT_LIKE, embedding_size=HIDDEN), "ElectraModel", 2, 3, 0,
                True),
    "distilbert": (DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS,
                                    n_heads=HEADS, hidden_dim=INTERMEDIATE,
                                    max_position_embeddings=POSITIONS, activation="gelu",
                                    sinusoidal_pos_embds=False, pad_token_id=0),
                   "DistilBertModel", 2, 3, 0, False),
    "modernbert": (ModernBertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=3,
                                    num_attention_heads=HEADS, intermediate_size=INTERMEDIATE,
                                    max_position_embeddings=POSITIONS, local_attention=4,
                                    global_attn_every_n_layers=3, classifier_pooling="mean",
                                    pad_token_id=0, bos_token_id=2, cls_token_id=2,
                                    eos_token_id=3, sep_token_id=3, num_labels=2),
                   "ModernBertForSequenceClassification", 2, 3, 0, False),
}
DEBERTA_LIKE = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=HEADS,
                    intermediate_size=INTERMEDIATE, max_position_embeddings=POSITIONS,
                    hidden_act="gelu", relative_attention=True, pad_token_id=0, num_labels=2)
FAMILIES.update({
    "deberta-v3": (DebertaV2Config(**DEBERTA_LIKE, num_hidden_layers=LAYERS, position_buckets=8,
                                   pos_att_type=["p2c", "c2p"], share_att_key=True,
                                   norm_rel_ebd="layer_norm", position_biased_input=False,
                                   type_vocab_size=0, layer_norm_eps=1e-7),
                   "DebertaV2ForSequenceClassification", 1, 2, 0, False),
    "deberta-v2": (DebertaV2Config(**{**DEBERTA_LIKE, "hidden_size": 16, "num_attention_heads": 2,
                                      "intermediate_size": 20}, num_hidden_layers=1,
                                   max_relative_positions=6, pos_att_type="c2p|p2c",
                                   share_att_key=False, position_biased_input=True,
                                   type_vocab_size=2),
                   "DebertaV2ForSequenceClassification", 1, 2, 0, True),
})
#: the special tokens of each family's tokenizer.json, in id order from 0 (the ids the
#: reference batch uses: BERT's layout [CLS]=2 [SEP]=3 [PAD]=0, RoBERTa's <s>=0 <pad>=1
#: </s>=2)
BERT_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
ROBERTA_SPECIAL = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
SPECIAL = {"bert": BERT_SPECIAL, "electra": BERT_SPECIAL, "distilbert": BERT_SPECIAL,
           "roberta": ROBERTA_SPECIAL, "xlm-roberta": ROBERTA_SPECIAL,
           "modernbert": BERT_SPECIAL,
           "deberta-v3": ("[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]")}
WORDS = ("the", "a", "of", "and", "to", "in", "is", "for", "with", "on", "library", "data",
         "tool", "file", "system", "server", "client", "python", "gnu", "c", "shared", "web",
         "http", "daemon", "gtk", "toolkit", "bindings", "module", "package", "network",
         "text", "image", "sound", "video", "game", "font", "kernel", "driver", "test",
         "build", "debug", "doc")


def batch(cls_id: int, sep_id: int, pad_id: int, type_vocab_size: int):
    rng = np.random.RandomState(0)
    n, length = len(LENGTHS), max(LENGTHS)
    ids = np.full((n, length), pad_id, np.int64)
    mask = np.zeros((n, length), np.int64)
    types = np.zeros((n, length), np.int64)
    for r, k in enumerate(LENGTHS):
        ids[r, :k] = [cls_id, *rng.randint(5, VOCAB, k - 2), sep_id]
        mask[r, :k] = 1
    if type_vocab_size > 1:
        types[0, 5:] = 1  # a second segment in the first row
        types[1, 4:6] = 1
    return ids, mask, types


def record(family: str) -> None:
    import torch

    config, model_cls, cls_id, sep_id, pad_id, has_types = FAMILIES[family]
    model_cls = getattr(transformers, model_cls)
    torch.manual_seed(list(FAMILIES).index(family))  # each family its own weights
    model = model_cls._from_config(config, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    ids, mask, types = batch(cls_id, sep_id, pad_id,
                             getattr(config, "type_vocab_size", 0) if has_types else 0)
    inputs = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    if has_types:
        inputs["token_type_ids"] = torch.from_numpy(types)
    with torch.no_grad():
        if family == "modernbert":
            out = model.model(**inputs)
            m = inputs["attention_mask"][..., None].float()
            out.pooler_output = model.head((out.last_hidden_state * m).sum(1) / m.sum(1))
        elif family.startswith("deberta"):
            out = model.deberta(**inputs)
            out.pooler_output = model.pooler(out.last_hidden_state)
        else:
            out = model(**inputs)
    directory = DEST / family
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), safe_serialization=True)
    arrays = {k: v.numpy().astype(np.int32) for k, v in inputs.items()}
    arrays["last_hidden_state"] = out.last_hidden_state.numpy().astype(np.float32)
    pooled = getattr(out, "pooler_output", None)
    if pooled is not None:
        arrays["pooler_output"] = pooled.numpy().astype(np.float32)
    np.savez_compressed(directory / "reference.npz", **arrays, versions=np.array(
        [f"torch {torch.__version__}", f"transformers {transformers.__version__}"]))
    if family in SPECIAL:
        save_tokenizer(directory, SPECIAL[family])
    size = sum(f.stat().st_size for f in directory.iterdir())
    print(f"{family}: {sorted(arrays)}, {size / 1024:.0f} KiB")


def save_tokenizer(directory: Path, special: tuple[str, ...]) -> None:
    """A word-level tokenizer over ids 0..VOCAB-1 with the family's special tokens
    (BERT's [CLS] text [SEP], or RoBERTa's <s> text </s>)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    roberta = "<s>" in special
    cls, sep, pad, unk, mask = (("<s>", "</s>", "<pad>", "<unk>", "<mask>") if roberta else
                                ("[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"))
    vocab = {t: i for i, t in enumerate(special)}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    vocab.update({f"w{i}": i for i in range(len(vocab), VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    pair = f"{cls} $A {sep} {sep} $B {sep}" if roberta else f"{cls} $A {sep} $B {sep}"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=pair,
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=pad, unk_token=unk, cls_token=cls, sep_token=sep,
        mask_token=mask, bos_token=cls if roberta else None, eos_token=sep if roberta else None,
        model_max_length=POSITIONS,
    ).save_pretrained(str(directory))


def main() -> None:
    """``[--tokenizers-only] [FAMILY ...]``: record the families (default: all), or only
    rewrite their tokenizer.json (no torch needed)."""
    import sys

    args = sys.argv[1:]
    only_tokenizers = "--tokenizers-only" in args
    for family in [a for a in args if a != "--tokenizers-only"] or FAMILIES:
        if only_tokenizers:
            if family in SPECIAL:
                save_tokenizer(DEST / family, SPECIAL[family])
        else:
            record(family)


if __name__ == "__main__":
    main()

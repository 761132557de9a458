"""Encoder hyper-parameters, read from a Hugging Face ``config.json``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from mtop_jax.errors import WeightsError

#: model_type values whose layout (post-LayerNorm BERT blocks) this encoder implements.
SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert")
#: model types that number positions from ``pad_token_id + 1`` (fairseq heritage).
OFFSET_POSITION_TYPES = ("roberta", "xlm-roberta", "camembert")
#: DistilBERT's config.json field -> BERT's name for the same thing.
DISTILBERT_NAMES = {"dim": "hidden_size", "n_layers": "num_hidden_layers",
                    "n_heads": "num_attention_heads", "hidden_dim": "intermediate_size",
                    "activation": "hidden_act", "dropout": "hidden_dropout_prob",
                    "attention_dropout": "attention_probs_dropout_prob"}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """A BERT-family encoder. Defaults are BERT-base's."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2  # 0: the model has no token-type embedding
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    pad_token_id: int = 0
    # RoBERTa-style: positions start at pad_token_id + 1 and skip padding.
    offset_positions: bool = False
    model_type: str = "bert"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise WeightsError(
                f"config: hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_length(self) -> int:
        """Longest input the position table allows."""
        if self.offset_positions:
            return self.max_position_embeddings - self.pad_token_id - 1
        return self.max_position_embeddings

    def replace(self, **kw: Any) -> EncoderConfig:
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> EncoderConfig:
        """Build from the fields of a Hugging Face ``config.json`` (BERT, RoBERTa, XLM-R,
        CamemBERT, ELECTRA, or DistilBERT with its own field names)."""
        model_type = d.get("model_type", "bert")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise WeightsError(
                f"{source}: model_type {model_type!r} is not supported; "
                f"expected one of {list(SUPPORTED_MODEL_TYPES)}"
            )
        if model_type == "distilbert":
            # BERT's post-LayerNorm blocks under other names: learned absolute positions,
            # no token-type embedding, no pooler, LayerNorm eps fixed at 1e-12.
            if d.get("sinusoidal_pos_embds", False):
                raise WeightsError(
                    f"{source}: DistilBERT with sinusoidal_pos_embds true is not supported; "
                    "expected sinusoidal_pos_embds false (learned position embeddings)")
            d = {**{DISTILBERT_NAMES.get(k, k): v for k, v in d.items()},
                 "type_vocab_size": 0, "layer_norm_eps": 1e-12}
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise WeightsError(
                f"{source}: position_embedding_type {d['position_embedding_type']!r} "
                "is not supported; expected 'absolute'"
            )
        if model_type == "electra" and d.get("embedding_size", d.get("hidden_size")) != d.get(
            "hidden_size"
        ):
            raise WeightsError(f"{source}: ELECTRA with embedding_size != hidden_size")
        required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size")
        # named as the file names them
        own = {v: k for k, v in DISTILBERT_NAMES.items()} if model_type == "distilbert" else {}
        missing = [own.get(k, k) for k in required if k not in d]
        if missing:
            raise WeightsError(f"{source}: missing fields {missing}")
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=int(d["num_attention_heads"]),
            intermediate_size=int(d["intermediate_size"]),
            max_position_embeddings=int(d.get("max_position_embeddings", 512)),
            type_vocab_size=int(d.get("type_vocab_size", 2)),
            hidden_act=str(d.get("hidden_act", "gelu")),
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-12)),
            hidden_dropout=float(d.get("hidden_dropout_prob", 0.1)),
            attention_dropout=float(d.get("attention_probs_dropout_prob", 0.1)),
            pad_token_id=int(d.get("pad_token_id", 0) or 0),
            offset_positions=model_type in OFFSET_POSITION_TYPES,
            model_type=model_type,
        )

    @classmethod
    def from_json_file(cls, path: str | Path) -> EncoderConfig:
        path = Path(path)
        if not path.is_file():
            raise WeightsError(f"{path}: config.json not found")
        try:
            d = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightsError(f"{path}: not a readable JSON config ({e})") from None
        if not isinstance(d, dict):
            raise WeightsError(f"{path}: expected a JSON object")
        return cls.from_hf_dict(d, source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` fields this config was read from (for saving a model)."""
        bert = {
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size,
            "hidden_act": self.hidden_act,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_dropout_prob": self.hidden_dropout,
            "attention_probs_dropout_prob": self.attention_dropout,
            "pad_token_id": self.pad_token_id,
            "position_embedding_type": "absolute",
        }
        if self.model_type != "distilbert":
            return bert
        own = {v: k for k, v in DISTILBERT_NAMES.items()}
        dropped = ("type_vocab_size", "layer_norm_eps", "position_embedding_type")
        return {**{own.get(k, k): v for k, v in bert.items() if k not in dropped},
                "sinusoidal_pos_embds": False}


#: Named sizes for tests and benchmarks (random weights).
PRESETS: dict[str, EncoderConfig] = {
    "tiny": EncoderConfig(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4,
                          intermediate_size=128, max_position_embeddings=128),
    "minilm": EncoderConfig(hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536),
    "bert-base": EncoderConfig(),
    "bert-large": EncoderConfig(hidden_size=1024, num_layers=24, num_heads=16,
                                intermediate_size=4096),
}

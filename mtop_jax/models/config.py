"""Encoder hyper-parameters, read from a Hugging Face ``config.json``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from mtop_jax.errors import WeightsError

#: config.json ``model_type`` -> the encoder family (a module of ``mtop_jax.models.encoders``)
#: that implements it. ``bert``: post-LayerNorm BERT blocks with learned absolute positions;
#: ``modernbert``: pre-norm blocks with rotary positions, local/global attention and GeGLU;
#: ``deberta``: BERT's blocks with disentangled relative-position attention (v2 and v3).
MODEL_TYPES = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "camembert": "bert",
               "electra": "bert", "distilbert": "bert", "modernbert": "modernbert",
               "deberta-v2": "deberta"}
#: DeBERTa's relative attention terms: content->position and position->content.
POS_ATT_TYPES = ("c2p", "p2c")
SUPPORTED_MODEL_TYPES = tuple(MODEL_TYPES)
#: ModernBERT's attention kinds of ``layer_types``.
FULL, SLIDING = "full_attention", "sliding_attention"
#: model types that number positions from ``pad_token_id + 1`` (fairseq heritage).
OFFSET_POSITION_TYPES = ("roberta", "xlm-roberta", "camembert")
#: DistilBERT's config.json field -> BERT's name for the same thing.
DISTILBERT_NAMES = {"dim": "hidden_size", "n_layers": "num_hidden_layers",
                    "n_heads": "num_attention_heads", "hidden_dim": "intermediate_size",
                    "activation": "hidden_act", "dropout": "hidden_dropout_prob",
                    "attention_dropout": "attention_probs_dropout_prob"}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """An encoder of any family of ``MODEL_TYPES``. Defaults are BERT-base's."""

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
    # ModernBERT only (the BERT family has biases everywhere and global attention).
    layer_types: tuple[str, ...] = ()  # FULL or SLIDING per layer; () = all FULL
    local_attention: int = 0  # a sliding layer's keys lie within local_attention // 2
    rope_theta: float = 160_000.0  # rotary base of FULL layers
    local_rope_theta: float = 10_000.0  # and of SLIDING layers
    norm_bias: bool = True
    attention_bias: bool = True
    mlp_bias: bool = True
    classifier_bias: bool = True
    classifier_activation: str = "gelu"  # also DeBERTa's pooler_hidden_act
    classifier_pooling: str = "cls"  # what the head reads in mode shared: "cls" or "mean"
    embedding_dropout: float = 0.0
    # DeBERTa-v2/v3 only.
    relative_attention: bool = False
    position_buckets: int = 0  # log buckets of relative distance; 0: exact distances
    max_relative_positions: int = 0  # 0: max_position_embeddings
    pos_att_type: tuple[str, ...] = ()  # of POS_ATT_TYPES
    share_att_key: bool = False  # position keys/queries through the content projections
    norm_rel_ebd: bool = False  # LayerNorm on the relative embeddings
    position_biased_input: bool = True  # learned absolute positions added to the input

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise WeightsError(
                f"config: hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_heads}"
            )
        if self.model_type not in MODEL_TYPES:
            raise WeightsError(f"config: model_type {self.model_type!r} is not supported; "
                               f"expected one of {list(SUPPORTED_MODEL_TYPES)}")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise WeightsError(f"config: {len(self.layer_types)} layer_types for "
                               f"{self.num_layers} layers")
        if set(self.layer_types) - {FULL, SLIDING}:
            raise WeightsError(f"config: layer_types {list(self.layer_types)}; expected each "
                               f"of {[FULL, SLIDING]}")
        if SLIDING in self.layer_types and self.local_attention < 2:
            raise WeightsError("config: sliding_attention layers need local_attention >= 2")
        if set(self.pos_att_type) - set(POS_ATT_TYPES):
            raise WeightsError(f"config: pos_att_type {list(self.pos_att_type)}; expected "
                               f"each of {list(POS_ATT_TYPES)}")
        if self.classifier_pooling not in ("cls", "mean"):
            raise WeightsError(f"config: classifier_pooling {self.classifier_pooling!r}; "
                               "expected 'cls' or 'mean'")

    @property
    def family(self) -> str:
        """The module of ``mtop_jax.models.encoders`` that builds this encoder."""
        return MODEL_TYPES[self.model_type]

    @property
    def learned_positions(self) -> bool:
        """Learned absolute positions: MTOP prompts then get a learned per-slot position
        embedding; otherwise (rotary) they sit at positions len(row) + j (DESIGN.md 9)."""
        return self.family != "modernbert" and self.position_biased_input

    @property
    def relative_span(self) -> int:
        """DeBERTa: relative embeddings cover distances -span..span-1 (2 span rows)."""
        if self.position_buckets > 0:
            return self.position_buckets
        return self.max_relative_positions if self.max_relative_positions > 0 else (
            self.max_position_embeddings)

    def window(self, layer: int) -> int | None:
        """How far (in positions) layer ``layer`` attends, None for global attention."""
        if self.layer_types and self.layer_types[layer] == SLIDING:
            return self.local_attention // 2
        return None

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
        if MODEL_TYPES[model_type] == "modernbert":
            return _modernbert_from_hf(cls, d, source)
        if MODEL_TYPES[model_type] == "deberta":
            d = {"type_vocab_size": 0, "layer_norm_eps": 1e-7, **d}
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
        cfg = cls(
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
        return _deberta_from_hf(cfg, d, source) if cfg.family == "deberta" else cfg

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
        if self.family == "modernbert":
            return _modernbert_to_hf(self)
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
        if self.family == "deberta":
            return {**bert, "relative_attention": self.relative_attention,
                    "position_buckets": self.position_buckets or -1,
                    "max_relative_positions": self.max_relative_positions or -1,
                    "pos_att_type": list(self.pos_att_type),
                    "share_att_key": self.share_att_key,
                    "norm_rel_ebd": "layer_norm" if self.norm_rel_ebd else "none",
                    "position_biased_input": self.position_biased_input,
                    "pooler_hidden_size": self.hidden_size,
                    "pooler_hidden_act": self.classifier_activation}
        if self.model_type != "distilbert":
            return bert
        own = {v: k for k, v in DISTILBERT_NAMES.items()}
        dropped = ("type_vocab_size", "layer_norm_eps", "position_embedding_type")
        return {**{own.get(k, k): v for k, v in bert.items() if k not in dropped},
                "sinusoidal_pos_embds": False}


def _deberta_from_hf(cfg: EncoderConfig, d: dict[str, Any], source: str) -> EncoderConfig:
    """DeBERTa-v2/v3's relative attention fields on top of the BERT fields."""
    unsupported = []
    if int(d.get("conv_kernel_size", 0) or 0) > 0:
        unsupported.append("conv_kernel_size > 0 (v2-xlarge's convolution layer)")
    if int(d.get("embedding_size", cfg.hidden_size)) != cfg.hidden_size:
        unsupported.append("embedding_size != hidden_size")
    if int(d.get("pooler_hidden_size", cfg.hidden_size)) != cfg.hidden_size:
        unsupported.append("pooler_hidden_size != hidden_size")
    if unsupported:
        raise WeightsError(f"{source}: DeBERTa with {', '.join(unsupported)} is not supported")
    kinds = d.get("pos_att_type") or []
    if isinstance(kinds, str):
        kinds = [k.strip() for k in kinds.lower().split("|") if k.strip()]
    norm_rel = [k.strip() for k in str(d.get("norm_rel_ebd", "none")).lower().split("|")]
    try:
        return cfg.replace(
            relative_attention=bool(d.get("relative_attention", False)),
            position_buckets=max(int(d.get("position_buckets", -1)), 0),
            max_relative_positions=max(int(d.get("max_relative_positions", -1)), 0),
            pos_att_type=tuple(kinds), share_att_key=bool(d.get("share_att_key", False)),
            norm_rel_ebd="layer_norm" in norm_rel,
            position_biased_input=bool(d.get("position_biased_input", True)),
            classifier_activation=str(d.get("pooler_hidden_act", "gelu")))
    except WeightsError as e:
        raise WeightsError(f"{source}: {e}") from None


def _modernbert_from_hf(cls: type[EncoderConfig], d: dict[str, Any], source: str
                        ) -> EncoderConfig:
    """ModernBERT's fields, in transformers 5.x's form (``layer_types``,
    ``rope_parameters``) or 4.x's (``global_attn_every_n_layers``, ``*_rope_theta``)."""
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size")
    missing = [k for k in required if k not in d]
    if missing:
        raise WeightsError(f"{source}: missing fields {missing}")
    layers = int(d["num_hidden_layers"])
    types = d.get("layer_types")
    if types is None:
        every = int(d.get("global_attn_every_n_layers", 3))
        types = [SLIDING if i % every else FULL for i in range(layers)]
    rope = d.get("rope_parameters") or {}
    full, sliding = rope.get(FULL) or {}, rope.get(SLIDING) or {}
    scaling = [r.get("rope_type") for r in (full, sliding, d.get("rope_scaling") or {})
               if r.get("rope_type", "default") != "default"]
    if scaling:
        raise WeightsError(f"{source}: rope_type {scaling[0]!r} is not supported; "
                           "expected 'default'")
    try:
        return cls(
            vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]),
            num_layers=layers, num_heads=int(d["num_attention_heads"]),
            intermediate_size=int(d["intermediate_size"]),
            max_position_embeddings=int(d.get("max_position_embeddings", 8192)),
            type_vocab_size=0, hidden_act=str(d.get("hidden_activation", "gelu")),
            layer_norm_eps=float(d.get("norm_eps", 1e-5)),
            hidden_dropout=float(d.get("mlp_dropout", 0.0)),
            attention_dropout=float(d.get("attention_dropout", 0.0)),
            embedding_dropout=float(d.get("embedding_dropout", 0.0)),
            pad_token_id=int(d.get("pad_token_id", 50283) or 0), model_type="modernbert",
            layer_types=tuple(types), local_attention=int(d.get("local_attention", 128)),
            rope_theta=float(full.get("rope_theta", d.get("global_rope_theta", 160_000.0))),
            local_rope_theta=float(sliding.get("rope_theta",
                                               d.get("local_rope_theta", 10_000.0))),
            norm_bias=bool(d.get("norm_bias", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            classifier_bias=bool(d.get("classifier_bias", False)),
            classifier_activation=str(d.get("classifier_activation", "gelu")),
            classifier_pooling=str(d.get("classifier_pooling", "cls")),
        )
    except WeightsError as e:
        raise WeightsError(f"{source}: {e}") from None


def _modernbert_to_hf(c: EncoderConfig) -> dict[str, Any]:
    """transformers 5.x's ModernBERT fields (which 4.x's names are also read beside)."""
    return {
        "model_type": "modernbert", "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "intermediate_size": c.intermediate_size,
        "max_position_embeddings": c.max_position_embeddings,
        "hidden_activation": c.hidden_act, "norm_eps": c.layer_norm_eps,
        "mlp_dropout": c.hidden_dropout, "attention_dropout": c.attention_dropout,
        "embedding_dropout": c.embedding_dropout, "pad_token_id": c.pad_token_id,
        "layer_types": list(c.layer_types or (FULL,) * c.num_layers),
        "local_attention": c.local_attention,
        "rope_parameters": {FULL: {"rope_type": "default", "rope_theta": c.rope_theta},
                            SLIDING: {"rope_type": "default", "rope_theta": c.local_rope_theta}},
        "norm_bias": c.norm_bias, "attention_bias": c.attention_bias, "mlp_bias": c.mlp_bias,
        "classifier_bias": c.classifier_bias,
        "classifier_activation": c.classifier_activation,
        "classifier_pooling": c.classifier_pooling,
    }


def _modernbert(layers: int, **kw: Any) -> EncoderConfig:
    """A ModernBERT config with its defaults: every third layer global, no biases."""
    return EncoderConfig(
        model_type="modernbert", num_layers=layers, type_vocab_size=0, layer_norm_eps=1e-5,
        hidden_dropout=0.0, attention_dropout=0.0, norm_bias=False, attention_bias=False,
        mlp_bias=False, classifier_bias=False,
        layer_types=tuple(SLIDING if i % 3 else FULL for i in range(layers)), **kw)


def _deberta_v3(**kw: Any) -> EncoderConfig:
    """A DeBERTa-v3 config: relative attention (c2p, p2c) with shared keys, log buckets,
    normalised relative embeddings, no absolute positions, no token types."""
    return EncoderConfig(
        model_type="deberta-v2", type_vocab_size=0, layer_norm_eps=1e-7,
        relative_attention=True, pos_att_type=("p2c", "c2p"), share_att_key=True,
        norm_rel_ebd=True, position_biased_input=False, **kw)


#: Named sizes for tests and benchmarks (random weights).
PRESETS: dict[str, EncoderConfig] = {
    "tiny": EncoderConfig(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4,
                          intermediate_size=128, max_position_embeddings=128),
    "minilm": EncoderConfig(hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536),
    "bert-base": EncoderConfig(),
    "bert-large": EncoderConfig(hidden_size=1024, num_layers=24, num_heads=16,
                                intermediate_size=4096),
    # 3 layers (global, local, local) with a window of +-4: short test inputs feel it.
    "modernbert-tiny": _modernbert(3, vocab_size=1024, hidden_size=64, num_heads=4,
                                   intermediate_size=96, max_position_embeddings=128,
                                   local_attention=8, pad_token_id=0),
    # log buckets of 8 (exact within +-4): short test inputs reach the log range.
    "deberta-v3-tiny": _deberta_v3(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4,
                                   intermediate_size=128, max_position_embeddings=64,
                                   position_buckets=8),
    "deberta-v3-base": _deberta_v3(vocab_size=128100, hidden_size=768, num_layers=12,
                                   num_heads=12, intermediate_size=3072,
                                   max_position_embeddings=512, position_buckets=256),
    "modernbert-base": _modernbert(22, vocab_size=50368, hidden_size=768, num_heads=12,
                                   intermediate_size=1152, max_position_embeddings=8192,
                                   local_attention=128, pad_token_id=50283),
}

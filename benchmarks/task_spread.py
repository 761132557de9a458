"""Task spread of trained ``mtop`` models: how far apart the tasks' prompt states are
after each layer (``mtop_jax.models.task_spread``), on given texts.

    python benchmarks/task_spread.py workdirs/demo \\
        --texts mtop_jax/data/debian-packages/validation.jsonl
    python benchmarks/task_spread.py RUN_A RUN_B --texts FILE --out DIR   # JSON + PNG

The spread is the standard deviation across tasks over the standard deviation across
texts: 0 means every task reads the same vector, so the model answers as ``shared``
with N heads would, whatever its prompts; about 1 means the tasks' views of a text
differ as much as two texts do. ``benchmarks/quality.py`` measures it for every
``mtop`` run it trains.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, markdown_table, write_json
from benchmarks.quality import plot_spreads, run_task_spread


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", type=Path,
                   help="mtop training workdirs or exported models")
    p.add_argument("--texts", type=Path, required=True,
                   help="a JSONL/CSV file (its `text` field) or a .txt file (a text a line)")
    p.add_argument("-n", type=int, default=64, help="the first n texts (default 64)")
    p.add_argument("--out", type=Path, help="write task_spread.json and task_spread.png")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from mtop_jax.serving.predictor import read_texts

    texts = read_texts(args.texts)[:args.n]
    spreads = {str(m): run_task_spread(m, texts) for m in args.models}
    depth = max(len(s["layers"]) for s in spreads.values())
    headers = ["model", *(f"after layer {i}" for i in range(1, depth + 1)), "pooled h_t"]
    rows = [[m, *(f"{x:.2g}" for x in s["layers"]), f"{s['features']:.2g}"]
            for m, s in spreads.items()]
    table = markdown_table(headers, rows)
    print(f"Task spread on {len(texts)} texts of {args.texts} (std across tasks / std "
          f"across texts):\n\n{table}")
    out = {**environment(argv), "texts": str(args.texts), "n": len(texts),
           "spreads": spreads, "table": table}
    if args.out:
        write_json(args.out / "task_spread.json", out)
        plot_spreads({m: s["layers"] for m, s in spreads.items()},
                     args.out / "task_spread.png")
    return out


if __name__ == "__main__":
    main()

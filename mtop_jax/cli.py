"""The ``mtop-jax`` command line.

Each subcommand lives in a function ``cmd_<name>`` and is registered in
``build_parser``. Errors the user can fix (``MtopError``) print as one line
``mtop-jax: error: ...`` and exit 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def cmd_info(args: argparse.Namespace) -> int:
    """Resolve a pretrained model, verify it, and describe it."""
    from mtop_jax.models import pretrained

    model_dir = pretrained.resolve_model_dir(args.model)
    cfg = pretrained.load_config(model_dir)
    params = pretrained.encoder_params(cfg, pretrained.read_safetensors(model_dir),
                                       source=str(model_dir))
    n = sum(v.size for v in params.values())
    print(json.dumps({"model": args.model, "directory": str(model_dir),
                      "config": cfg.to_hf_dict(), "parameters": int(n)}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtop-jax",
        description="One-forward-pass multi-task text classification (MTOP) in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("info", help="describe and verify a pretrained encoder")
    p.add_argument("--model", default="all-MiniLM-L6-v2",
                   help="'all-MiniLM-L6-v2' (offline default), a local HF directory, or org/name")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from mtop_jax.errors import MtopError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return int(args.func(args) or 0)
    except MtopError as e:
        print(f"mtop-jax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mtop-jax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

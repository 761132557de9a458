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


def _logging() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("absl", "orbax", "jax._src", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_train(args: argparse.Namespace) -> int:
    """Train (or resume) MTOP or a baseline from a config file."""
    _logging()
    from mtop_jax.config_flags import load_config
    from mtop_jax.train import train

    config = load_config(args.config, args.extra)
    train(config, args.workdir)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a training workdir's latest checkpoint on a split."""
    _logging()
    from mtop_jax.train import evaluate_workdir

    evaluate_workdir(args.workdir, args.split, args.step)
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

    p = sub.add_parser(
        "train", help="train MTOP or a baseline (resumes from the workdir's checkpoints)",
        description="Overrides follow the config: --config.train.steps=100 "
                    "--config.model.mode=shared")
    p.add_argument("--config", required=True, help="configs/X.py or configs/X.py:arg")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics and model files")
    p.set_defaults(func=cmd_train, accepts_overrides=True)

    p = sub.add_parser("eval", help="evaluate a workdir's checkpoint on a split")
    p.add_argument("--workdir", required=True)
    p.add_argument("--split", default="validation")
    p.add_argument("--step", type=int, default=None, help="default: the latest")
    p.set_defaults(func=cmd_eval)
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

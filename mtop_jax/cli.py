"""The ``mtop-jax`` command line.

Each subcommand lives in a function ``cmd_<name>`` and is registered in
``build_parser``. Errors the user can fix (``MtopError``) print as one line
``mtop-jax: error: ...`` and exit 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sys
import time


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
    from mtop_jax.parallel.distributed import maybe_initialize

    maybe_initialize()  # multi-host (a TPU slice, several GPU nodes): before any device use
    from mtop_jax.config.loading import load_config
    from mtop_jax.training.loop import train

    config = load_config(args.config, args.extra)
    train(config, args.workdir)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a training workdir's latest checkpoint on a split."""
    _logging()
    from mtop_jax.parallel.distributed import maybe_initialize

    maybe_initialize()
    from mtop_jax.training.evaluation import evaluate_workdir

    evaluate_workdir(args.workdir, args.split, args.step, predictions_to=args.predictions)
    return 0


def _write_atomic(path: str, write) -> None:
    """Write through ``write(tmp_path)`` and rename: the output is whole or absent."""
    from pathlib import Path

    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _int_list(value: str) -> tuple[int, ...]:
    """``1,8,32`` -> (1, 8, 32)."""
    try:
        values = tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, comma-separated, "
                                         f"got {value!r}")
    return values


def _top_k(value: str) -> int | None:
    """``--top-k``: a positive count, or ``all``."""
    if value == "all":
        return None
    try:
        k = int(value)
    except ValueError:
        k = 0
    if k < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {value!r}")
    return k


def _inputs(args: argparse.Namespace) -> tuple[list[str], list[str] | None]:
    """The texts (and ids, with ``--id-field``) of ``--text``, ``--input FILE`` or stdin.

    ``--input -`` (or no ``--text``/``--input`` with a pipe on stdin) reads stdin, as
    ``--input-format`` says: a text a line (``txt``, the default) or JSONL/CSV records.
    """
    import tempfile
    from pathlib import Path

    from mtop_jax.errors import MtopError
    from mtop_jax.serving.predictor import read_texts

    if args.text and args.input:
        raise MtopError("give texts with --text (repeatable), --input FILE or on stdin "
                        "(--input -), not several")
    if args.id_field in ("text", "predictions"):
        raise MtopError(f"--id-field {args.id_field!r}: the output uses that key already")
    if args.text:
        if args.id_field:
            raise MtopError("--id-field needs --input with JSONL or CSV records")
        return list(args.text), None
    source = args.input
    if source is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise MtopError("give texts with --text (repeatable), --input FILE or on stdin "
                            "(--input -)")
        source = "-"

    def read(path: Path) -> tuple[list[str], list[str] | None]:
        fmt = args.input_format or path.suffix.lstrip(".")
        if args.id_field is None:
            return read_texts(path, args.text_field), None
        if fmt not in ("jsonl", "csv"):
            raise MtopError(f"--id-field needs JSONL or CSV records, not {fmt or 'txt'} input")
        if path.is_file() and path.stat().st_size == 0:
            return [], []
        from mtop_jax.data.local_files import read_records

        raw = read_records(path, (), text_field=args.text_field, id_field=args.id_field)
        if fmt != "jsonl":
            return list(raw.texts), list(raw.ids)
        # JSON ids pass through as they are (7 stays 7), not as read_records' strings.
        from mtop_jax.data.local_files import _jsonl_records

        ids = [get(0) for _, get in _jsonl_records(path, [args.id_field], None)]
        return list(raw.texts), ids

    if source != "-":
        path = Path(source)
        if args.input_format and path.suffix != f".{args.input_format}":
            raise MtopError(f"--input-format {args.input_format} is for stdin; {path} is read "
                            f"by its suffix")
        return read(path)
    with tempfile.TemporaryDirectory(prefix="mtop-stdin-") as tmp:
        path = Path(tmp) / f"stdin.{args.input_format or 'txt'}"
        path.write_bytes(sys.stdin.buffer.read())
        return read(path)


def _cpu_devices(n: int | None) -> list | None:
    """``--cpu-devices N``: the CPU as N XLA devices, each batch split over them; set
    before JAX's backend starts (mtop_jax.parallel.host_cpu)."""
    if not n:
        return None
    from mtop_jax.errors import MtopError
    from mtop_jax.parallel.host_cpu import use_host_cpu_devices

    devices = use_host_cpu_devices(n)
    import jax

    if jax.default_backend() != "cpu":
        raise MtopError(f"--cpu-devices {n}: JAX runs on {jax.default_backend()}, not the CPU; "
                        "use --devices there (serve)")
    return devices


def cmd_predict(args: argparse.Namespace) -> int:
    """Per text and task: the label, its score and the top k (label, score) pairs."""
    import mtop_jax

    texts, ids = _inputs(args)
    predictor = mtop_jax.load(args.model, batch_size=args.batch_size,
                              devices=_cpu_devices(args.cpu_devices))
    tasks, top_k = predictor.check_request(args.task, args.top_k)

    def lines():
        for start in range(0, len(texts), args.batch_size):
            chunk = texts[start:start + args.batch_size]
            results = predictor.format(predictor.logits(chunk), tasks=tasks, top_k=top_k)
            for i, (text, result) in enumerate(zip(chunk, results), start):
                head = {} if ids is None else {args.id_field: ids[i]}
                yield json.dumps({**head, "text": text, "predictions": result},
                                 ensure_ascii=False) + "\n"

    if args.output in (None, "-"):
        for line in lines():
            sys.stdout.write(line)
        sys.stdout.flush()
        return 0
    from tqdm import tqdm

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            for line in tqdm(lines(), total=len(texts), desc="predict", unit="text"):
                f.write(line)

    _write_atomic(args.output, write)
    print(f"wrote {len(texts)} predictions to {args.output}", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """The HTTP/JSON server (DESIGN.md section 10) until SIGTERM or Ctrl-C."""
    from mtop_jax.errors import MtopError

    try:
        from mtop_jax.serving import server
    except ImportError as e:
        raise MtopError(f"serve needs the 'serve' extra ({e.name} is missing): "
                        "pip install 'mtop-jax[serve]'") from None
    config = server.ServeConfig(
        host=args.host, port=args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue, max_texts=args.max_texts, max_body_bytes=args.max_body_bytes,
        read_timeout_s=args.read_timeout, drain_timeout_s=args.drain_timeout,
        token=server.read_token(args.token_file) if args.token_file else None,
        batch_buckets=args.batch_buckets)
    if args.cpu_devices:
        if args.devices:
            raise MtopError("--devices and --cpu-devices: give one of them")
        _cpu_devices(args.cpu_devices)
    return server.serve(args.model, config, devices=args.devices or args.cpu_devices)


def cmd_embed(args: argparse.Namespace) -> int:
    """The fixed representation [h_1; ..; h_N] of each text, as a .npy array."""
    import numpy as np

    import mtop_jax
    from mtop_jax.serving.predictor import read_texts

    texts = read_texts(args.input, args.text_field)
    predictor = mtop_jax.load(args.model, batch_size=args.batch_size)
    features = predictor.embed(texts)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, features)

    _write_atomic(args.output, write)
    print(f"wrote {features.shape} to {args.output}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """An inference-only model directory (and optionally a StableHLO forward)."""
    import mtop_jax
    from mtop_jax.serving.export import save_model_dir

    predictor = mtop_jax.load(args.workdir, step=args.step)
    out = save_model_dir(predictor, args.out, stablehlo=args.format == "stablehlo")
    print(f"exported step {predictor.step} to {out}", file=sys.stderr)
    return 0


def cmd_add_task(args: argparse.Namespace) -> int:
    """Train a new task on a frozen model; the other tasks' outputs do not change."""
    import mtop_jax
    from mtop_jax.serving.export import save_model_dir
    from mtop_jax.serving.task_edit import add_task

    predictor = mtop_jax.load(args.model)
    grown = add_task(predictor, args.data, args.task, args.field, text_field=args.text_field,
                     steps=args.steps, batch_size=args.batch_size,
                     learning_rate=args.learning_rate, seed=args.seed)
    save_model_dir(grown, args.out)
    print(f"added {args.task!r}: {list(grown.task_names)} -> {args.out}", file=sys.stderr)
    return 0


def cmd_remove_task(args: argparse.Namespace) -> int:
    """A model directory without the given tasks."""
    import mtop_jax
    from mtop_jax.serving.export import save_model_dir
    from mtop_jax.serving.task_edit import remove_tasks

    smaller = remove_tasks(mtop_jax.load(args.model), args.task)
    save_model_dir(smaller, args.out)
    print(f"kept {list(smaller.task_names)} -> {args.out}", file=sys.stderr)
    return 0


CPU_DEVICES_HELP = ("on a CPU: run as N XLA devices and split each batch over them, "
                    "so that N cores work side by side (+10-19%% sequences/s on 2 cores; "
                    "N = the cores is a good start)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtop-jax",
        description="One-forward-pass multi-task text classification (MTOP) in JAX/Flax.")
    import mtop_jax

    parser.add_argument("--version", action="version", version=f"mtop-jax {mtop_jax.__version__}")
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
    p.add_argument("--predictions", default=None, help="also write the split's predictions "
                   "and labels, text by text, to this .npz")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "predict", help="predict every task for texts (one pass per batch)",
        description="Prints (or writes) a JSON line per text: {ID-FIELD?, text, predictions: "
                    "{task: {label, score, top_k: [[label, score], ...]} or {value}}}, the "
                    "shape of the server's answers.")
    p.add_argument("--model", required=True, help="a training workdir or an exported model")
    p.add_argument("--text", action="append", help="a text (repeatable)")
    p.add_argument("--input", help="JSONL/CSV (field --text-field), .txt (a text a line), or "
                                   "- for stdin (default when stdin is a pipe)")
    p.add_argument("--input-format", choices=("txt", "jsonl", "csv"), default=None,
                   help="the format of stdin (default txt)")
    p.add_argument("--output", help="JSONL predictions, written whole or not at all; "
                                    "- or absent: stdout")
    p.add_argument("--text-field", default="text")
    p.add_argument("--id-field", default=None,
                   help="a field of each JSONL/CSV record copied into its output line "
                        "(JSON values as they are)")
    p.add_argument("--task", action="append", default=None,
                   help="answer this task (repeatable, in this order); default: all")
    p.add_argument("--top-k", type=_top_k, default=1,
                   help="(label, score) pairs per task, most probable first, or 'all' "
                        "(default 1)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cpu-devices", type=int, default=None, help=CPU_DEVICES_HELP)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "serve", help="answer POST /v1/predict over HTTP, batching concurrent requests",
        description="POST /v1/predict {\"texts\": [...], \"tasks\": [...]?, \"top_k\": k?}; "
                    "GET /healthz, /readyz, /metrics. SIGTERM drains and exits 0.")
    p.add_argument("model", help="a training workdir or an exported model")
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    p.add_argument("--max-batch", type=int, default=32, help="texts per forward pass")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long a batch waits for more texts after its first")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting or computed at once; more get 503")
    p.add_argument("--max-texts", type=int, default=256, help="texts a request; more: 413")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="more: 413")
    p.add_argument("--read-timeout", type=float, default=30.0,
                   help="seconds to receive a request body; slower: 408")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="seconds SIGTERM waits for requests in flight")
    p.add_argument("--token-file", default=None,
                   help="require 'Authorization: Bearer TOKEN' (the file's first line)")
    p.add_argument("--devices", type=int, default=None,
                   help="split each batch over the first N devices (default 1)")
    p.add_argument("--batch-buckets", type=_int_list, default=None,
                   help="row counts batches are padded to, compiled before ready, e.g. "
                        "1,8,32 (default: 1,2,4 and every multiple of 8 up to --max-batch)")
    p.add_argument("--cpu-devices", type=int, default=None, help=CPU_DEVICES_HELP)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("embed", help="fixed text representations [h_1; ..; h_N] to .npy")
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--text-field", default="text")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("export", help="an inference-only model directory from a workdir")
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--step", type=int, default=None, help="default: the latest")
    p.add_argument("--format", choices=("orbax", "stablehlo"), default="orbax",
                   help="stablehlo: also write predict.stablehlo (jax.export)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("add-task", help="train a new task on a frozen model")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="JSONL/CSV with the text and the task's label")
    p.add_argument("--task", required=True)
    p.add_argument("--field", default=None, help="label field (dotted path); default: --task")
    p.add_argument("--text-field", default="text")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_add_task)

    p = sub.add_parser("remove-task", help="a model directory without some tasks")
    p.add_argument("--model", required=True)
    p.add_argument("--task", required=True, action="append")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_remove_task)
    return parser


def _settle_threads(timeout: float = 10.0) -> None:
    """Let background writers (orbax's save threads) finish before the error is printed,
    so that whatever they report of the same failure comes first and ours is the last
    line."""
    import threading

    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            # orbax's threads re-raise their failure on join: it is reported already
            with contextlib.suppress(Exception):
                thread.join(max(0.0, deadline - time.monotonic()))


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
        _settle_threads()
        print(f"mtop-jax: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        _settle_threads()
        print(f"mtop-jax: error: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mtop-jax: interrupted", file=sys.stderr)
        return 130


def _quiet_closed_loops(unraisable) -> None:
    """Reads that orbax abandoned after an error (a corrupt checkpoint, a full disk) end
    as noise, not news: tensorstore's callbacks land on a closed event loop, and the
    sibling coroutines, closed when collected, wrap that GeneratorExit in an error of
    their own. The error that stopped the read is reported already."""
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc):
        return
    if isinstance(exc.__cause__, GeneratorExit):
        return
    sys.__unraisablehook__(unraisable)


def run() -> None:
    """The ``mtop-jax`` console script: :func:`main`, then exit with its code.

    After an error is printed, the process is only shutting down: background threads
    that fail the same way then (orbax's writers after a full disk or a bad checkpoint,
    and their coroutines left unawaited) are kept quiet, so that the error stays the
    last line.
    """
    sys.unraisablehook = _quiet_closed_loops
    code = main()
    if code:
        import logging
        import threading
        import warnings

        sys.stderr.flush()
        logging.disable(logging.CRITICAL)
        warnings.simplefilter("ignore")  # "coroutine ... was never awaited", at exit
        threading.excepthook = lambda args: None
        sys.unraisablehook = lambda unraisable: None
    sys.exit(code)


if __name__ == "__main__":
    run()

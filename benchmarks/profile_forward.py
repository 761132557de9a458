"""Where a forward pass spends its time, per XLA operation (issue 18's profile).

    python benchmarks/profile_forward.py --mode shared --out workdirs/profile
    python benchmarks/profile_forward.py --quick --out /tmp/profile   # tiny, for the tests

Compiles ``model.logits(ids, mask)`` of the pretrained MiniLM (``--model``; random
weights with ``--quick``), calls it ``--calls`` times under ``jax.profiler`` with
XLA:CPU's per-operation trace events on (``--xla_cpu_enable_xprof_traceme``, set
before jax starts), and sums each operation's time over the calls. Prints the
table (ms per call, share, the fused computation's kind: a ``ynn_fusion`` is a
YNNPACK kernel, a dot with what XLA fused around it; ``*_fusion`` and
``wrapped_*`` are XLA's own loops), the wall time per call and the busy time of
the XLA threads against it, and writes ``profile.json``, the optimised HLO
(``optimized_hlo.txt``: find an operation's inputs by its name) and the raw
trace (open ``trace/`` in TensorBoard's profile plugin or Perfetto).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TRACE_FLAG = "--xla_cpu_enable_xprof_traceme=true"
if TRACE_FLAG not in os.environ.get("XLA_FLAGS", ""):  # read once, when jax starts
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TRACE_FLAG}".strip()

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import environment, markdown_table, padded_batch, write_json  # noqa: E402

#: trace events that are not one XLA operation's own work
_NOT_OPS = re.compile(r"^(ThunkExecutor|ThreadpoolListener|SlinkyThreadPool|end: )")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", default="shared", choices=("shared", "mtop", "prefix"))
    p.add_argument("--tasks", type=int, default=8, help="N (default 8)")
    p.add_argument("--prompts", type=int, default=4, help="P (default 4)")
    p.add_argument("--batch", type=int, default=32, help="B (default 32)")
    p.add_argument("--length", type=int, default=128, help="L (default 128)")
    p.add_argument("--calls", type=int, default=5, help="profiled calls (default 5)")
    p.add_argument("--top", type=int, default=20, help="operations in the table (default 20)")
    p.add_argument("--model", default="all-MiniLM-L6-v2", help="pretrained encoder")
    p.add_argument("--out", type=Path, required=True, help="directory for the outputs")
    p.add_argument("--quick", action="store_true", help="random tiny encoder, L=16, B=4")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.length, args.tasks, args.prompts, args.calls = 4, 16, 2, 2, 2
    return args


def build(args: argparse.Namespace):
    """(compiled logits program, state, ids, mask)."""
    from mtop_jax.models.multitask import ModelConfig, MultiTaskModel, load_backbone

    if args.quick:
        from mtop_jax.training.setup import random_preset

        enc, params = random_preset("random:tiny"), None
    else:
        from mtop_jax.models.pretrained import pretrained_params

        enc, params = pretrained_params(args.model)
    tasks = [(f"task{t}", 5) for t in range(args.tasks)]
    model = MultiTaskModel(enc, ModelConfig(mode=args.mode, num_prompts=args.prompts), tasks,
                           rngs=nnx.Rngs(0))
    if params is not None:
        load_backbone(model, params)
    model.eval()
    graphdef, state = nnx.split(model)
    ids, mask = padded_batch(args.batch, args.length, enc.vocab_size)
    program = jax.jit(lambda st, i, m: nnx.merge(graphdef, st).logits(i, m))
    return program.lower(state, ids, mask).compile(), state, ids, mask


def op_times(trace_file: Path, calls: int) -> tuple[dict[str, float], float, float]:
    """({operation: ms per call}, wall ms per call, busy ms per call of the XLA threads)."""
    data = jax.profiler.ProfileData.from_file(str(trace_file))
    per_op: Counter[str] = Counter()
    wall = busy = 0
    for plane in data.planes:
        for line in plane.lines:
            if line.name.startswith("python"):
                wall += sum(e.duration_ns for e in line.events
                            if e.name.endswith("block_until_ready"))
            if not line.name.startswith("tf_XLA"):
                continue
            for event in line.events:
                if event.name == "ThunkExecutor::Execute":
                    busy += event.duration_ns
                elif not _NOT_OPS.match(event.name):
                    per_op[event.name] += event.duration_ns
    scale = 1e-6 / calls
    return {k: v * scale for k, v in per_op.items()}, wall * scale, busy * scale


def op_sources(hlo_text: str) -> dict[str, str]:
    """{operation: the jax operation it came from} from the HLO's ``op_name`` metadata
    (e.g. ``ynn_fusion.14`` -> ``...->bhqd/dot_general``): which dot, which softmax."""
    found = re.finditer(r'^\s*%?([\w.\-]+) = .*?metadata=\{op_name="([^"]*)"', hlo_text,
                        re.MULTILINE)
    return {m.group(1): re.sub(r"^jit\([^)]*\)/", "", m.group(2)) for m in found}


def kind(name: str) -> str:
    """The operation's family: its name without the instance number."""
    return re.sub(r"\.\d+$", "", name)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    compiled, state, ids, mask = build(args)
    hlo = compiled.as_text()
    (args.out / "optimized_hlo.txt").write_text(hlo)
    sources = op_sources(hlo)
    for _ in range(2):  # warm: allocations, thread pools
        jax.block_until_ready(compiled(state, ids, mask))
    trace_dir = args.out / "trace"
    jax.profiler.start_trace(str(trace_dir))
    for _ in range(args.calls):
        jax.block_until_ready(compiled(state, ids, mask))
    jax.profiler.stop_trace()
    trace_file = max(trace_dir.rglob("*.xplane.pb"), key=lambda f: f.stat().st_mtime)
    ops, wall, busy = op_times(trace_file, args.calls)
    total = sum(ops.values())
    by_kind: Counter[str] = Counter()
    for name, ms in ops.items():
        by_kind[kind(name)] += ms
    rows = [[name, f"{ms:.2f}", f"{100 * ms / total:.1f}%", sources.get(name, "")[:60]]
            for name, ms in sorted(ops.items(), key=lambda x: -x[1])[:args.top]]
    kinds = [[k, f"{ms:.2f}", f"{100 * ms / total:.1f}%"] for k, ms in by_kind.most_common()]
    print(f"# {args.mode}, N={args.tasks}, P={args.prompts}, B={args.batch}, L={args.length}: "
          f"{wall:.1f} ms a call (wall), XLA threads busy {busy:.1f} ms, operations "
          f"{total:.1f} ms (summed over threads)\n")
    print(markdown_table(["operation kind", "ms per call", "share"], kinds))
    print()
    print(markdown_table(["operation", "ms per call", "share", "from (HLO op_name)"], rows))
    result = {"environment": environment(sys.argv if argv is None else argv),
              "settings": {k: (str(v) if isinstance(v, Path) else v)
                           for k, v in vars(args).items()},
              "wall_ms_per_call": wall, "busy_ms_per_call": busy, "ops_ms_per_call": ops,
              "kinds_ms_per_call": dict(by_kind),
              "op_sources": {k: sources.get(k, "") for k in ops}}
    write_json(args.out / "profile.json", result)
    print(f"\nwrote {args.out / 'profile.json'}, {args.out / 'optimized_hlo.txt'}, {trace_dir}")
    return result


if __name__ == "__main__":
    main()

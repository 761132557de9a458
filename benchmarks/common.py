"""Shared helpers of the benchmark scripts: timing, XLA cost and memory, the run's
environment, Markdown tables, atomic JSON/PNG output and random parameters."""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

GB = 1024**3


def gb(n_bytes: float) -> str:
    """Bytes as GB (GiB) with 3 significant digits."""
    return f"{n_bytes / GB:.3g} GB"


# ---------------------------------------------------------------------------- CLI helpers


def int_list(text: str) -> list[int]:
    """``"1,2,4"`` -> [1, 2, 4]."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"expected positive integers, got {text!r}")
    return values


def str_list(text: str, allowed: Sequence[str] | None = None) -> list[str]:
    """``"a,b"`` -> ["a", "b"], each checked against ``allowed``."""
    values = [x.strip() for x in text.split(",") if x.strip()]
    if not values:
        raise ValueError(f"expected a comma-separated list, got {text!r}")
    if allowed is not None:
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ValueError(f"unknown {bad}; choose from {list(allowed)}")
    return values


def fill_defaults(args: Any, defaults: dict[str, Any]) -> Any:
    """Arguments the command line left at None take ``defaults`` (full or --quick)."""
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


# ---------------------------------------------------------------------------- environment


def environment(argv: Sequence[str]) -> dict[str, Any]:
    """What the numbers were measured on, for the JSON file."""
    import flax

    device = jax.devices()[0]
    return {
        "device": str(device.device_kind),
        "platform": device.platform,
        "num_devices_visible": jax.device_count(),
        "host_cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "host": platform.platform(),
        "python": platform.python_version(),
        "jax_version": jax.__version__,
        "jaxlib_version": getattr(jax.lib, "__version__", None) or _jaxlib_version(),
        "flax_version": flax.__version__,
        "command": [sys.argv[0], *argv] if argv is not None else list(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _jaxlib_version() -> str | None:
    try:
        import jaxlib

        return jaxlib.__version__
    except (ImportError, AttributeError):
        return None


def host_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def default_memory_budget() -> float:
    """GB one setting may use: 90% of an accelerator's memory, half the host RAM on CPU."""
    device = jax.devices()[0]
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - not every backend implements it
        stats = None
    if device.platform != "cpu" and stats and stats.get("bytes_limit"):
        return 0.9 * stats["bytes_limit"] / GB
    host = host_memory_bytes()
    return 0.5 * host / GB if host else 16.0


# ---------------------------------------------------------------------------- XLA analyses


def compiled_flops(compiled) -> float | None:
    """FLOPs of one call of a compiled executable, from XLA's cost analysis."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends have none
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def compiled_memory_bytes(compiled) -> int | None:
    """Arguments + outputs + temporaries of a compiled executable (XLA's memory analysis)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if m is None:
        return None
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)
    return int(total)


def tree_bytes(tree) -> int:
    """Bytes of every array (or ShapeDtypeStruct) leaf of a pytree."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                continue
            total += int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


# ---------------------------------------------------------------------------- timing


def block(x):
    return jax.block_until_ready(x)


def time_calls(call: Callable[[], Any], *, repeats: int, warmup: int,
               max_seconds: float | None = None) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``call`` (each waited for with
    ``block_until_ready``), after ``warmup`` untimed ones.

    Stops early, after at least one timed call, once the timed calls add up to
    ``max_seconds``: the caller reports how many repeats it got.
    """
    for _ in range(warmup):
        block(call())
    times: list[float] = []
    while len(times) < repeats:
        t0 = time.perf_counter()
        block(call())
        times.append(time.perf_counter() - t0)
        if max_seconds is not None and sum(times) >= max_seconds:
            break
    return times


def summarize(times: Sequence[float]) -> dict[str, Any]:
    """Median, min, max, interquartile range and relative spread of timings."""
    t = np.asarray(times, float)
    median = float(statistics.median(t))
    q25, q75 = (float(x) for x in np.percentile(t, [25, 75]))
    return {"times_s": [float(x) for x in t], "repeats": len(t), "median_s": median,
            "min_s": float(t.min()), "max_s": float(t.max()), "iqr_s": q75 - q25,
            "spread": float((t.max() - t.min()) / median) if median > 0 else 0.0}


# ---------------------------------------------------------------------------- random parameters


#: Leaves at least this big are drawn on the device; smaller ones on the host (no compile).
_DEVICE_DRAW_SIZE = 1 << 20


@functools.partial(jax.jit, static_argnums=(1, 2))
def _device_normal(key, shape, dtype):
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def random_state(abstract_state, seed: int = 0):
    """Concrete random values for an abstract ``nnx.State`` (from ``nnx.eval_shape``).

    BERT's initialisation (normal(0.02) weights, zero biases, unit LayerNorm
    scales) without compiling the model's own initialiser for every setting:
    small leaves are drawn with numpy, big ones by one small program per
    shape (cached across settings). Values only have to be finite and of a
    realistic scale for a speed benchmark.
    """
    from flax import nnx

    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    out = []
    for i, (path, var) in enumerate(nnx.to_flat_state(abstract_state)):
        value = var.get_value()
        shape, dtype = tuple(value.shape), value.dtype
        size = int(np.prod(shape, dtype=np.int64))
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            data = rng.integers(0, 2**32, (*shape, 2), dtype=np.uint32)
            new = jax.random.wrap_key_data(data)
        elif not jnp.issubdtype(dtype, jnp.floating):
            new = jnp.asarray(np.zeros(shape, dtype))
        elif str(path[-1]) in ("scale", "bias"):
            new = jnp.asarray(np.full(shape, 1.0 if str(path[-1]) == "scale" else 0.0, dtype))
        elif size >= _DEVICE_DRAW_SIZE:
            new = _device_normal(jax.random.fold_in(key, i), shape, dtype)
        else:
            new = jnp.asarray((0.02 * rng.standard_normal(shape, np.float32)).astype(dtype))
        out.append((path, var.replace(new)))
    return nnx.from_flat_state(out)


def with_new_task_variables(state, seed: int):
    """``state`` with its per-task floating variables (leading ``tasks`` axis: prompts,
    prefixes, heads) redrawn from normal(0.02) and every other array shared, not copied:
    another task of the same base model, as prefix tuning serves N tasks from one encoder."""
    from flax import nnx

    from mtop_jax.models.axes import is_per_task

    rng = np.random.default_rng(seed)

    def fresh(var):
        value = var.get_value()
        if not is_per_task(var) or not jnp.issubdtype(value.dtype, jnp.floating):
            return var
        draw = 0.02 * rng.standard_normal(value.shape, np.float32)
        return var.replace(jnp.asarray(draw.astype(value.dtype)))

    return nnx.from_flat_state([(path, fresh(var)) for path, var in nnx.to_flat_state(state)])


def padded_batch(batch: int, length: int, vocab: int, seed: int = 0
                 ) -> tuple[jax.Array, jax.Array]:
    """Random token ids [B, L] and an attention mask whose rows hold L down to L/2 tokens."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(1, vocab, (batch, length)).astype(np.int32)
    lengths = np.linspace(length, max(1, length // 2), batch).round().astype(int)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    return jnp.asarray(ids * mask), jnp.asarray(mask)


# ---------------------------------------------------------------------------- output


def noise_note(rows: Sequence[dict[str, Any]], label: Callable[[dict[str, Any]], str],
               threshold: float = 0.10) -> str | None:
    """A warning line when timed settings spread more than ``threshold`` over their repeats:
    a busy machine (other jobs, thermal throttling) makes the numbers unfit to report."""
    timed = [r for r in rows if r.get("status") == "ok" and r.get("repeats", 0) > 1]
    noisy = sorted((r for r in timed if r["spread"] > threshold), key=lambda r: -r["spread"])
    if not noisy:
        return None
    worst = noisy[0]
    return (f"Noise: {len(noisy)} of {len(timed)} timed settings spread more than "
            f"{100 * threshold:.0f}% ((max - min) / median; worst {100 * worst['spread']:.0f}% "
            f"at {label(worst)}). On a busy machine these are not the figures to report.")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
                   align: str | None = None) -> str:
    """A GitHub Markdown table; ``align``: one of 'l'/'r' per column (default: first left)."""
    align = align or ("l" + "r" * (len(headers) - 1))
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values):
        return "| " + " | ".join(v.ljust(w) if a == "l" else v.rjust(w)
                                 for v, w, a in zip(values, widths, align)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else (":" + "-" * (w + 1))
                         for w, a in zip(widths, align)) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])


def fmt(x: float | None, digits: int = 3) -> str:
    """A number with ``digits`` significant digits, '-' for None."""
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "-"
    if x == 0:
        return "0"
    magnitude = int(np.floor(np.log10(abs(x))))
    decimals = max(0, digits - 1 - magnitude)
    return f"{x:,.{decimals}f}"


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would survive the rename
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=_json_default)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

    _atomic(Path(path), write)


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def save_figure(fig, path: Path) -> None:
    """Save a matplotlib figure as PNG atomically."""
    _atomic(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110,
                                                bbox_inches="tight"))


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt

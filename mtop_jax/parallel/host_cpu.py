"""The CPU as several XLA devices, so that a batch split over them runs on every core.

XLA:CPU runs one program's operations mostly as one chain: a forward pass of a small
encoder keeps about one core busy between the matrix products, which are the only
operations spread over the thread pool (benchmarks/README.md, "Profile of the CPU
forward"). Exposing the host as ``n`` devices (``--xla_force_host_platform_device_count``)
and splitting each batch's rows over them runs ``n`` chains side by side: +10-19% of
sequences/s for MiniLM inference on a 2-core CPU (benchmarks/README.md, "The CPU as two
devices"). Training gains nothing from it (its backward products already fill the
pool), so ``mtop-jax train`` leaves it alone.

The flag is read once, when JAX starts its CPU backend: :func:`use_host_cpu_devices`
must run before anything asks for a device.
"""

from __future__ import annotations

import os
import re

from mtop_jax.errors import MtopError

_FLAG = "--xla_force_host_platform_device_count"


def use_host_cpu_devices(n: int) -> list:
    """Expose the CPU as ``n`` XLA devices (``XLA_FLAGS``) and return the first ``n``.

    Call it before anything starts JAX's backend. Where ``XLA_FLAGS`` or a running JAX
    already has at least ``n`` CPU devices (a test session's 8), it returns the first
    ``n`` of them; where JAX runs with fewer, the flag would be ignored silently, so it
    raises :class:`MtopError`.
    """
    if n < 1:
        raise MtopError(f"CPU devices: {n} (expected >= 1)")
    import jax
    from jax._src import xla_bridge

    flags = os.environ.get("XLA_FLAGS", "")
    asked = [int(c) for c in re.findall(rf"{_FLAG}=(\d+)", flags)]
    if not xla_bridge.backends_are_initialized() and (not asked or asked[-1] < n):
        kept = re.sub(rf"{_FLAG}=\S*", "", flags).split()
        os.environ["XLA_FLAGS"] = " ".join([*kept, f"{_FLAG}={n}"])
    have = jax.devices("cpu")
    if len(have) < n:
        raise MtopError(f"CPU devices: {n} asked, but JAX already started with {len(have)}; "
                        f"ask before the first device is used, or run with "
                        f"XLA_FLAGS={_FLAG}={n}")
    return have[:n]


def default_host_cpu_devices(batch: int, cores: int | None = None) -> int:
    """The most devices, at most one per core, that split ``batch`` rows evenly."""
    cores = cores or os.cpu_count() or 1
    return max(d for d in range(1, min(cores, batch) + 1) if batch % d == 0)

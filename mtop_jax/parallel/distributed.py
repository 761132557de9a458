"""Multi-host JAX: join the other processes before anything touches a device.

``maybe_initialize()`` is the first thing ``mtop-jax train`` does. It calls
``jax.distributed.initialize`` when the environment says this process is one
of several (DESIGN.md section 8), and does nothing otherwise:

- ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0) with
  ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``: explicit, as ``launch/gpu.sh``
  sets them. All three given, cluster auto-detection is switched off, so a
  process sees every local device (under Slurm, JAX's auto-detection would
  otherwise restrict each process to the one GPU of its ``SLURM_LOCALID``).
  With only the address, JAX detects the other two.
- ``MTOP_JAX_DISTRIBUTED=1``: initialise, letting JAX detect the cluster
  (Cloud TPU VM slices read the worker list from the metadata server);
  ``launch/tpu_vm.py run`` sets it on slices of more than one host.
  ``MTOP_JAX_DISTRIBUTED=0`` never initialises.
- Otherwise detected: ``TPU_WORKER_HOSTNAMES`` / ``TPU_PROCESS_ADDRESSES``
  listing more than one host (GKE TPU slices), ``MEGASCALE_*`` (multislice),
  Slurm steps of more than one task (``SLURM_NTASKS`` > 1 inside ``srun``),
  Open MPI jobs of more than one rank.

After it, ``jax.process_index()`` / ``jax.process_count()`` say who is who:
every process reads its own slice of each global batch, process 0 alone
writes logs and metrics, and orbax saves checkpoints from all of them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("mtop_jax.parallel.distributed")

#: ``1`` forces ``jax.distributed.initialize()`` (auto-detected), ``0`` forbids it.
FORCE_ENV = "MTOP_JAX_DISTRIBUTED"

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _int(environ: Mapping[str, str], key: str, default: int = 0) -> int:
    try:
        return int(environ.get(key, default))
    except ValueError:
        return default


def detect(environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """Keyword arguments for ``jax.distributed.initialize``, or None: one process."""
    env = os.environ if environ is None else environ
    force = env.get(FORCE_ENV, "").strip().lower()
    if force in _FALSE:
        return None
    address = env.get("JAX_COORDINATOR_ADDRESS", "").strip()
    if address:
        kwargs: dict[str, Any] = {"coordinator_address": address}
        if env.get("JAX_NUM_PROCESSES"):
            kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
        if env.get("JAX_PROCESS_ID"):
            kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
        if "num_processes" in kwargs and "process_id" in kwargs:
            kwargs["cluster_detection_method"] = "deactivate"
        return kwargs
    if force in _TRUE:
        return {}
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if len([h for h in hosts.split(",") if h.strip()]) > 1:
        return {}
    if env.get("MEGASCALE_COORDINATOR_ADDRESS") or _int(env, "MEGASCALE_NUM_SLICES", 1) > 1:
        return {}
    if _int(env, "SLURM_NTASKS", 1) > 1 and "SLURM_PROCID" in env and "SLURM_STEP_NODELIST" in env:
        return {}
    if _int(env, "OMPI_COMM_WORLD_SIZE", 1) > 1:
        return {}
    return None


def maybe_initialize(environ: Mapping[str, str] | None = None, *,
                     quiet_others: bool = True) -> bool:
    """``jax.distributed.initialize`` when multi-host (see the module doc); idempotent.

    Returns whether JAX's distributed runtime is up after the call. Must run
    before any JAX call that creates a backend (``jax.devices()``, any array).
    ``quiet_others``: processes other than 0 log warnings and errors only.
    """
    import jax

    if jax.distributed.is_initialized():
        return True
    kwargs = detect(environ)
    if kwargs is None:
        return False
    env = os.environ if environ is None else environ
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in env:
        # Cross-process collectives of the CPU backend (tests, CPU clusters): gloo over
        # TCP (JAX's default today, said here so a change of default cannot break it).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    shown = {k: v for k, v in kwargs.items() if k != "cluster_detection_method"}
    log.info("jax.distributed.initialize(%s)",
             ", ".join(f"{k}={v!r}" for k, v in shown.items()) or "auto-detect")
    jax.distributed.initialize(**kwargs)
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    if quiet_others and jax.process_index() != 0:
        logging.getLogger("mtop_jax").setLevel(logging.WARNING)
    return True


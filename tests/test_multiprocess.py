"""Multi-host training with real processes on one machine (DESIGN.md section 8).

Two local processes join with ``jax.distributed.initialize`` (through
``mtop_jax.parallel.distributed.maybe_initialize`` and the ``JAX_COORDINATOR_ADDRESS``
variables ``launch/gpu.sh`` sets) on the CPU backend, whose cross-process
collectives are gloo over TCP. Each feeds its own slice of every global batch
and trains the tiny config into one shared workdir (orbax writes the
checkpoint from both, the metrics come from process 0 alone). A one-process
run over as many devices on the same global batch must give the same losses
and the same final parameters.

The two processes are subprocesses with their own environment: the test
session's ``XLA_FLAGS`` (8 fake devices, conftest.py) must not leak into them.
The one-process run is this test process, on as many of its devices. All of
them compile with ``--xla_backend_optimization_level=0`` (conftest sets it here
too), which cuts the train step's compile time about threefold on a small CPU;
the comparison is between runs with identical flags.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mtop_jax.config.loading import load_config
from mtop_jax.parallel.distributed import detect
from mtop_jax.training.loop import train

ROOT = Path(__file__).parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
TIMEOUT_S = 300

WORKER = """
import json, sys
from mtop_jax.parallel.distributed import maybe_initialize

joined = maybe_initialize()  # before anything touches a device
import jax
from mtop_jax.config.loading import load_config
from mtop_jax.training.loop import train

config, workdir, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
train(load_config(config, overrides), workdir)
print("MTOP_WORKER", json.dumps({"joined": joined, "process": jax.process_index(),
      "processes": jax.process_count(), "local_devices": jax.local_device_count(),
      "devices": jax.device_count()}), flush=True)
"""

STEPS = 4
OVERRIDES = [f"--config.train.steps={STEPS}", "--config.train.log_every=1",
             f"--config.train.eval_every={STEPS}", "--config.train.test_split=",
             f"--config.train.checkpoint_every={STEPS}", "--config.predict_examples=0",
             "--config.train.async_checkpointing=True"]

#: Variables of a surrounding cluster that would make a worker join the wrong job.
_CLUSTER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "TPU_", "MEGASCALE_", "JAX_",
                     "MTOP_JAX_DISTRIBUTED")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(local_devices: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_CLUSTER_PREFIXES)}
    env.pop("XLA_FLAGS", None)
    env.update(JAX_PLATFORMS="cpu", TRANSFORMERS_VERBOSITY="error",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={local_devices} "
                         "--xla_backend_optimization_level=0", **extra)
    return env


def start(workdir: Path, overrides: list[str], env: dict[str, str], log: Path):
    out = open(log, "w")  # noqa: SIM115 - closed by finish()
    proc = subprocess.Popen([sys.executable, "-c", WORKER, TINY, str(workdir),
                             json.dumps(overrides)], cwd=ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT)
    proc.log, proc.out = log, out
    return proc


def finish(procs: list, timeout: float = TIMEOUT_S) -> list[dict]:
    """Wait for all; if one fails or time runs out, kill the rest and show the logs."""
    deadline = time.monotonic() + timeout
    failed = None
    while any(p.poll() is None for p in procs):
        failed = next((p for p in procs if p.poll() not in (None, 0)), None)
        if failed is not None or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.out.close()
    reports, problems = [], []
    for i, p in enumerate(procs):
        text = p.log.read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith("MTOP_WORKER ")]
        if p.returncode != 0 or not lines:
            problems.append(f"--- process {i}: exit {p.returncode}\n{text[-6000:]}")
        else:
            reports.append(json.loads(lines[-1].split(" ", 1)[1]))
    if problems:
        pytest.fail("a training process failed or timed out:\n" + "\n".join(problems))
    return reports


def saved_params(workdir: Path) -> dict[str, np.ndarray]:
    """The latest checkpoint's parameters, read onto one local device.

    The checkpoint's own shardings name devices of the processes that wrote it,
    which this process does not have: the target says where to put them.
    """
    import jax
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(
        (workdir / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(read_only=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()})
    step = manager.latest_step()
    assert step == STEPS, f"{workdir}: latest checkpoint {step}"
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                          manager.item_metadata(step)["state"])
    state = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target))).state
    manager.close()
    flat = jax.tree_util.tree_flatten_with_path(state["params"])[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def records(workdir: Path, kind: str) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.mark.parametrize("local_devices,mesh", [
    # Two devices a process (a TPU host has four chips); the batch, the parameters and the
    # optimizer state are split over both processes.
    pytest.param(2, {"data": 1, "fsdp": -1}, id="2x2-fsdp"),
    # One device a process, pure data parallelism: the same paths, less of them.
    pytest.param(1, {"data": -1}, id="2x1-data", marks=pytest.mark.slow),
])
def test_two_processes_equal_one(tmp_path, devices, local_devices, mesh):
    overrides = OVERRIDES + [f"--config.mesh.{k}={v}" for k, v in
                             {"data": 1, "fsdp": 1, "tensor": 1, **mesh}.items()]
    multi, single = tmp_path / "two_processes", tmp_path / "one_process"
    port = free_port()
    procs = [start(multi, overrides,
                   worker_env(local_devices, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                              JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
                   tmp_path / f"process{i}.log")
             for i in range(2)]
    # The one-process run over as many devices, here in the test process (its 8 CPU
    # devices compile with the same flags), while the two train.
    total = 2 * local_devices
    try:
        train(load_config(TINY, overrides), single, devices=devices[:total])
    finally:
        reports = finish(procs)

    assert reports == [{"joined": True, "process": i, "processes": 2,
                        "local_devices": local_devices, "devices": total}
                       for i in range(2)]

    # Process 0 alone wrote the metrics: one record a step, not two.
    got, want = records(multi, "train"), records(single, "train")
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["step"] for r in want] == list(range(1, STEPS + 1))
    for a, b in zip(got, want):
        losses = sorted(k for k in b if k == "loss" or k.endswith("/loss"))
        assert sorted(k for k in a if k == "loss" or k.endswith("/loss")) == losses
        for key in losses:
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)
    # The evaluation: every process fed its slice of the validation split.
    (got,), (want,) = records(multi, "eval"), records(single, "eval")
    assert got.keys() == want.keys() and "score" in got
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-5), key

    # Both processes wrote their shards of one checkpoint; it equals the one-process run's.
    a, b = saved_params(multi), saved_params(single)
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=1e-5, rtol=0, err_msg=key)
    assert (multi / "model.json").is_file() and (multi / "config.json").is_file()


def multihost_preemption() -> bool:
    from mtop_jax.training.guards import Preemption

    return hasattr(Preemption, "check")


@pytest.mark.slow
@pytest.mark.skipif(not multihost_preemption(),
                    reason="train.Preemption has no multi-host check(step) yet")
def test_sigterm_on_one_process_saves_on_all(tmp_path):
    """A Spot TPU worker or a Slurm task gets SIGTERM: every process saves the same step
    and exits cleanly (a flag in one process alone would leave the others waiting on
    it in a collective, for ever)."""
    workdir = tmp_path / "run"
    overrides = ["--config.train.steps=200", "--config.train.log_every=1",
                 "--config.train.eval_split=", "--config.train.test_split=",
                 "--config.train.checkpoint_every=1000", "--config.predict_examples=0",
                 "--config.mesh.data=-1"]
    port = free_port()
    procs = [start(workdir, overrides,
                   worker_env(1, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                              JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
                   tmp_path / f"process{i}.log")
             for i in range(2)]
    deadline = time.monotonic() + TIMEOUT_S
    metrics = workdir / "metrics.jsonl"
    while not (metrics.exists() and len(records(workdir, "train")) >= 2):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            finish(procs, timeout=0)
            pytest.fail("training did not get going")
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    finish(procs, timeout=120)
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                   if p.name.isdigit())
    assert len(steps) == 1 and 2 <= steps[0] < 200, steps
    assert records(workdir, "train")[-1]["step"] == steps[0]


def test_detect_reads_the_environment():
    assert detect({}) is None
    assert detect({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2",
                   "JAX_PROCESS_ID": "1"}) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1,
        "cluster_detection_method": "deactivate"}
    # Only the address: JAX detects the rest (Slurm, Open MPI).
    assert detect({"JAX_COORDINATOR_ADDRESS": "h:1"}) == {"coordinator_address": "h:1"}
    assert detect({"MTOP_JAX_DISTRIBUTED": "1"}) == {}
    assert detect({"MTOP_JAX_DISTRIBUTED": "0", "JAX_COORDINATOR_ADDRESS": "h:1"}) is None
    assert detect({"TPU_WORKER_HOSTNAMES": "w0"}) is None  # a single-host slice
    assert detect({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}) == {}
    assert detect({"MEGASCALE_NUM_SLICES": "2"}) == {}
    slurm = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
             "SLURM_STEP_NODELIST": "gpu[01-02]"}
    assert detect(slurm) == {}
    assert detect({**slurm, "SLURM_NTASKS": "1"}) is None
    assert detect({k: v for k, v in slurm.items() if k != "SLURM_STEP_NODELIST"}) is None
    assert detect({"OMPI_COMM_WORLD_SIZE": "4"}) == {}

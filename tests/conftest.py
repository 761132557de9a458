"""Test setup: 8 fake CPU devices (set before jax is imported), a shared XLA
compilation cache, and mesh fixtures."""

import atexit
import os
import shutil
import tempfile

# Tiny models, so compiling dominates the suite, and LLVM's optimisation passes are
# half of each compile (the tiny train step: 10.4 s -> 4.8 s of backend compile at
# level 0; test_multiprocess's workers already ran so). Results stay within every
# tolerance; the benchmarks and the trainer itself use XLA's defaults.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Many tests build the same tiny train step again (a new train() call, a resumed run,
# a child process): a persistent compilation cache for the session turns those
# recompiles into cache reads (the suite ran 975 s without it). Child processes
# inherit it. Set JAX_COMPILATION_CACHE_DIR yourself to keep it between runs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="mtop-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

from mtop_jax.parallel.sharding import make_mesh  # noqa: E402


@pytest.fixture(scope="session")
def devices():
    devs = jax.devices()
    assert len(devs) == 8, f"conftest wants 8 CPU devices, jax sees {len(devs)}"
    return devs


@pytest.fixture(scope="session")
def mesh1(devices):
    return make_mesh({"data": 1}, devices[:1])


@pytest.fixture(scope="session")
def mesh2(devices):
    return make_mesh({"data": 2}, devices[:2])


@pytest.fixture(scope="session")
def mesh8(devices):
    """data x fsdp x tensor = 2 x 2 x 2."""
    return make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices)


# ---------------------------------------------------------------------------- fault tests


@pytest.fixture(scope="module")
def child_env() -> dict[str, str]:
    """The environment of a child ``mtop-jax train`` (one CPU device, the shared cache)."""
    import fault_helpers

    return fault_helpers.child_env()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted reference run of the fault tests, trained once per session."""
    import fault_helpers

    return fault_helpers.shared_reference(tmp_path_factory)


# ---------------------------------------------------------------------------- order

#: The longest test files first (by `--durations`), so that pytest-xdist's workers (a
#: file each, `--dist loadfile`) are less likely to end on one long file alone.
LONGEST_FIRST = ("test_faults_train.py", "test_faults_kill.py", "test_train.py",
                 "test_multitask.py", "test_multiprocess.py", "test_inference.py",
                 "test_benchmarks.py", "test_train_weighting.py", "test_encoder_e2e.py",
                 "test_faults_predictor.py", "test_serve.py", "test_packaging.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable otherwise

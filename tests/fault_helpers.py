"""What the trainer fault tests share: the child trainer, its uninterrupted reference
run (trained once per session), and readers of what a run left on disk."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
from filelock import FileLock

from mtop_jax.training.checkpoints import Checkpoints

ROOT = Path(__file__).parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
STEPS = 10
# Every step checkpointed (asynchronously): a kill lands mid-save often. No eval, so a
# child run is mostly start-up, data and (cached) compile.
RUN_FLAGS = [f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=1",
             "--config.train.log_every=1", "--config.train.eval_split=",
             "--config.train.test_split=", "--config.predict_examples=0",
             "--config.train.best_metric=", "--config.mesh.data=1"]


def child_env() -> dict[str, str]:
    """A child trainer on one CPU device; it inherits the session's XLA compilation
    cache (conftest)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=8", "").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def train_cmd(workdir: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "mtop_jax.cli", "train", "--config", TINY,
            "--workdir", str(workdir), *RUN_FLAGS, *flags]


def run_child(workdir: Path, env, *flags: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(workdir, *flags), env=env, capture_output=True, text=True,
                          timeout=timeout)


def full_state(workdir: Path, step: int) -> dict[str, np.ndarray]:
    """Every array of a saved train state (params, optimizer, weighting, step, RNG) and
    the data iterator position, flat, on one device."""
    checkpoints = Checkpoints(workdir, read_only=True)
    tree = checkpoints.restore_on_one_device(step)
    data = checkpoints.manager.restore(step, args=_json_only()).data
    checkpoints.close()
    flat = {jax.tree_util.keystr(p): np.asarray(
        jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
        for p, x in jax.tree_util.tree_leaves_with_path(tree)}
    flat["data_position"] = np.frombuffer(json.dumps(data, sort_keys=True).encode(), np.uint8)
    return flat


def _json_only():
    import orbax.checkpoint as ocp

    return ocp.args.Composite(data=ocp.args.JsonRestore())


def assert_same_state(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"{what}: {key}")


def steps_on_disk(workdir: Path) -> list[int]:
    checkpoints = Checkpoints(workdir, read_only=True)
    steps = checkpoints.all_steps()
    checkpoints.close()
    return sorted(steps)


def logged_steps(workdir: Path) -> list[int]:
    """The step of every train record in metrics.jsonl, in order (a resumed run appends)."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines()
            if line.endswith("}") and '"kind": "train"' in line]


def last_logged_step(workdir: Path) -> int:
    return max(logged_steps(workdir), default=0)


def shared_reference(tmp_path_factory) -> Path:
    """An uninterrupted run that keeps every step's checkpoint, trained once per test
    session: the pytest-xdist workers share it (a file lock; the first one trains)."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    wd = root / "fault-reference" / "run"
    with FileLock(str(root / "fault-reference.lock")):
        if not (wd.parent / "complete").exists():
            shutil.rmtree(wd.parent, ignore_errors=True)
            out = run_child(wd, child_env(), "--config.train.keep_checkpoints=100")
            assert out.returncode == 0, out.stderr[-3000:]
            assert steps_on_disk(wd) == list(range(1, STEPS + 1))
            (wd.parent / "complete").touch()
    return wd


def reference_state(reference: Path, step: int, cache: dict = {}) -> dict:  # noqa: B006
    if step not in cache:
        cache[step] = full_state(reference, step)
    return cache[step]


def check_every_step_on_disk(workdir: Path, reference: Path) -> list[int]:
    """Every step that restore accepts is exactly the uninterrupted run's state."""
    steps = steps_on_disk(workdir)
    for step in steps:
        assert_same_state(full_state(workdir, step), reference_state(reference, step),
                          f"{workdir} step {step}")
    return steps



def corrupt(step_dir: Path, how: str) -> None:
    data_files = sorted(glob.glob(str(step_dir / "state" / "ocdbt.process_0" / "d" / "*")),
                        key=os.path.getsize)
    if how == "truncate":
        os.truncate(data_files[-1], os.path.getsize(data_files[-1]) // 2)
    elif how == "garbage":
        with open(data_files[-1], "r+b") as f:
            f.seek(os.path.getsize(data_files[-1]) // 2)
            f.write(os.urandom(4096))
    elif how == "metadata":
        (step_dir / "state" / "_METADATA").write_text("{")
    elif how == "data-json":
        (step_dir / "data" / "metadata").write_text("not json")
    else:
        raise ValueError(how)


def copy_steps(reference: Path, dest: Path, upto: int) -> None:
    shutil.copytree(reference, dest)
    for step in range(upto + 1, STEPS + 1):
        shutil.rmtree(dest / "checkpoints" / str(step))

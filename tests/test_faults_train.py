"""Fault injection on the trainer: kill -9, corrupt checkpoints, poisoned batches,
SIGTERM, a full disk, config mistakes. Nothing may be lost beyond the steps since
the last checkpoint, and a resumed run must end bitwise where an uninterrupted one
ends.

The trainer runs as a real ``mtop-jax train`` child process (one CPU device) so it
can be killed; a persistent XLA compilation cache shared by the children keeps
each restart to a few seconds. The kill rounds cycle through four moments (during
an asynchronous save, while training, during start-up and restore, while an old
step is deleted). CI runs a bounded version (4 rounds, one of each); for a longer
campaign:

    MTOP_FAULT_ROUNDS=24 pytest tests/test_faults_train.py -k kill -s

(``-s`` prints the per-round table: the step reached, the checkpoint left, the
steps lost.)
"""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from mtop_jax.checkpointing import Checkpoints
from mtop_jax.config_flags import load_config
from mtop_jax.errors import ConfigError, MtopError
from mtop_jax.train import train

ROOT = Path(__file__).parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
ROUNDS = int(os.environ.get("MTOP_FAULT_ROUNDS", "4"))
STEPS = 10
# Every step checkpointed (asynchronously): a kill lands mid-save often. No eval, so a
# child run is mostly start-up, data and (cached) compile.
RUN_FLAGS = [f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=1",
             "--config.train.log_every=1", "--config.train.eval_split=''",
             "--config.train.test_split=''", "--config.predict_examples=0",
             "--config.train.best_metric=''", "--config.mesh.data=1"]


# ---------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
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


@pytest.fixture(scope="module")
def reference(tmp_path_factory, child_env) -> Path:
    """An uninterrupted run that keeps every step's checkpoint."""
    wd = tmp_path_factory.mktemp("reference") / "run"
    out = run_child(wd, child_env, "--config.train.keep_checkpoints=100")
    assert out.returncode == 0, out.stderr[-3000:]
    assert steps_on_disk(wd) == list(range(1, STEPS + 1))
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


# ---------------------------------------------------------------------------- kill -9


MODES = ("mid-save", "running", "start-up", "mid-delete")


def kill_during(proc: subprocess.Popen, workdir: Path, mode: str, rng: random.Random) -> str:
    """SIGKILL ``proc``: in the middle of its n-th save (n random in 1..4: an orbax
    temporary step directory exists), at a random moment 0-4 s after its first new
    step, 0-3 s after launch (start-up, restoring), or while an old step it garbage-
    collects is in ``deleted/``. Returns what happened."""
    ckpt = workdir / "checkpoints"
    deadline = time.monotonic() + 240
    launched, started = time.monotonic(), None
    logged_before = len(logged_steps(workdir))  # the log survives kills: count new records
    delay = rng.uniform(0, 3.0 if mode == "start-up" else 4.0)
    target, seen = rng.randint(1, 4), set()
    while proc.poll() is None and time.monotonic() < deadline:
        if mode == "mid-save":
            seen.update(os.path.basename(t).split(".")[0] for t in glob.glob(str(ckpt / "*tmp*")))
            if len(seen) >= target:
                time.sleep(rng.uniform(0, 0.03))
                proc.kill()
                return f"in save #{target} (step {max(seen, key=int)})"
        elif mode == "mid-delete":
            if glob.glob(str(ckpt / "deleted" / "*")):
                time.sleep(rng.uniform(0, 0.002))
                proc.kill()
                return "while deleting an old step"
        elif mode == "start-up":
            if time.monotonic() - launched >= delay:
                proc.kill()
                return f"{delay:.2f} s after launch"
        else:
            if started is None and len(logged_steps(workdir)) > logged_before:
                started = time.monotonic()
            if started is not None and time.monotonic() - started >= delay:
                proc.kill()
                return f"{delay:.2f} s after its first step"
        time.sleep(0.001)
    return "finished before the kill" if proc.poll() is not None else "timeout"


def test_kill_9_then_resume_ends_where_an_uninterrupted_run_ends(tmp_path, reference,
                                                                  child_env):
    rng = random.Random(int(os.environ.get("MTOP_FAULT_SEED", "0")))
    wd = tmp_path / "run"
    flags = ["--config.train.keep_checkpoints=2"]
    rows = []
    for r in range(ROUNDS):
        mode = MODES[r % len(MODES)]
        before = steps_on_disk(wd)[-1:] if (wd / "checkpoints").exists() else []
        logged_before = len(logged_steps(wd))
        proc = subprocess.Popen(train_cmd(wd, *flags), env=child_env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        what = kill_during(proc, wd, mode, rng)
        proc.wait(timeout=60)
        stderr = proc.stderr.read()
        if proc.returncode == 0:  # it finished first: start again from scratch next round
            rows.append((r, mode, what, STEPS, STEPS, 0))
            shutil.rmtree(wd)
            continue
        assert proc.returncode == -signal.SIGKILL, stderr[-3000:]
        steps = check_every_step_on_disk(wd, reference)
        kept = max(steps, default=0)
        assert kept >= max(before, default=0)  # never lose a checkpoint that was complete
        # The furthest step this run trained (it restarted at `before`).
        reached = max(logged_steps(wd)[logged_before:], default=max(before, default=0))
        rows.append((r, mode, what, reached, kept, reached - kept))
    out = run_child(wd, child_env, *flags)
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same_state(full_state(wd, STEPS), reference_state(reference, STEPS),
                      "resumed after kills vs uninterrupted")
    print("\nround | mode | kill | step reached | checkpoint left | steps lost")
    for row in rows:
        print(" | ".join(map(str, row)))
    # Checkpointing every step, a kill loses the step being saved and the one running.
    assert all(lost <= 2 for *_, lost in rows), rows


def test_old_steps_leave_by_rename_so_a_kill_while_deleting_leaves_no_partial_step(
        tmp_path, monkeypatch):
    """Orbax deletes old steps file by file; killed half-way, a listed step would have
    missing files. Checkpoints has them renamed into ``deleted/`` first and removes them
    from there: here the process 'dies' before that removal and half-way through it."""
    def state(step: int) -> dict:
        return {"w": jax.numpy.arange(64.0) + step, "step": jax.numpy.int32(step)}

    with monkeypatch.context() as m:  # killed before removing what was renamed
        m.setattr(Checkpoints, "_empty_deleted", lambda self: None)
        checkpoints = Checkpoints(tmp_path, keep=2)
        for step in range(1, 6):
            checkpoints.save(step, state(step), {"position": step})
        checkpoints.wait()
        checkpoints.manager.close()
    deleted = tmp_path / "checkpoints" / "deleted"
    assert sorted(p.name for p in deleted.iterdir()) == ["1", "2", "3"]  # whole steps
    assert steps_on_disk(tmp_path) == [4, 5]
    # ... and killed half-way through removing them: files gone from one of them.
    for f in sorted((deleted / "2").rglob("*")):
        if f.is_file():
            f.unlink()
    assert steps_on_disk(tmp_path) == [4, 5]
    checkpoints = Checkpoints(tmp_path, keep=2)  # the resumed run: empties deleted/ first
    assert list(deleted.iterdir()) == []
    assert checkpoints.all_steps() == [4, 5]
    for step in (4, 5):
        restored = checkpoints.restore_state(step, jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state(0)))
        np.testing.assert_array_equal(restored["w"], state(step)["w"])
    checkpoints.save(6, state(6), {"position": 6})
    checkpoints.close()
    assert steps_on_disk(tmp_path) == [5, 6] and list(deleted.iterdir()) == []


# ---------------------------------------------------------------------------- corrupt


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


@pytest.mark.parametrize("newest, older", [("truncate", "metadata"), ("garbage", "data-json")])
def test_corrupt_latest_checkpoints_fall_back_with_a_warning(tmp_path, reference, child_env,
                                                             newest, older):
    """Two damaged steps, one kind each (four kinds in two runs): both are skipped with a
    warning naming them and moved aside; the run resumes from the step before."""
    wd = tmp_path / "run"
    copy_steps(reference, wd, upto=6)
    corrupt(wd / "checkpoints" / "6", newest)
    corrupt(wd / "checkpoints" / "5", older)
    out = run_child(wd, child_env, "--config.train.keep_checkpoints=100")
    assert out.returncode == 0, out.stderr[-3000:]
    for step in (6, 5):
        assert f"checkpoint step {step}" in out.stderr
        assert len(list((wd / "unreadable_checkpoints").glob(f"{step}-*"))) == 1  # kept
    assert out.stderr.count("unreadable, skipping it") >= 2
    assert "resumed from step 4" in out.stderr
    assert_same_state(full_state(wd, STEPS), reference_state(reference, STEPS),
                      f"resumed from step 4 after a {newest} step 6 and a {older} step 5")


def test_no_readable_checkpoint_is_a_clear_error(tmp_path, reference, child_env):
    wd = tmp_path / "run"
    copy_steps(reference, wd, upto=2)
    corrupt(wd / "checkpoints" / "2", "truncate")
    corrupt(wd / "checkpoints" / "1", "metadata")
    out = run_child(wd, child_env)
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("mtop-jax: error: ") and "no readable checkpoint" in last
    assert "step 2 (" in last and "step 1 (" in last and "Traceback" not in out.stderr


# ---------------------------------------------------------------------------- SIGTERM


def test_sigterm_saves_and_exits_0_within_the_grace_period(tmp_path, reference, child_env):
    """A preempted TPU VM gets SIGTERM and about 30 s: save the step reached, exit 0."""
    wd = tmp_path / "run"
    flags = ["--config.train.checkpoint_every=100"]  # only the preemption save
    proc = subprocess.Popen(train_cmd(wd, *flags), env=child_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    while last_logged_step(wd) < 3 and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    proc.wait(timeout=60)
    took = time.monotonic() - sent
    stderr = proc.stderr.read()
    assert proc.returncode == 0, stderr[-3000:]
    assert took < 30, f"exited {took:.1f} s after SIGTERM"
    reached = last_logged_step(wd)
    assert steps_on_disk(wd) == [reached], "the preemption save is the step reached"
    assert "preempted: saved step" in stderr
    out = run_child(wd, child_env, *flags)
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same_state(full_state(wd, STEPS), reference_state(reference, STEPS),
                      "resumed after SIGTERM vs uninterrupted")


# ---------------------------------------------------------------------------- disk full


def can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c",
                            "mount -t tmpfs -o size=1m tmpfs /mnt && touch /mnt/x"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not can_mount_tmpfs(),
                    reason="needs `unshare -rm` to mount a private tmpfs (user namespaces)")
def test_disk_full_while_saving_is_a_clear_error_and_keeps_the_last_checkpoint(
        tmp_path, reference, child_env):
    """The workdir is a 64 MB tmpfs in a private mount namespace; once step 3 is saved,
    a ballast file fills it. Saving step 4 must fail with one clear line, leave step 3
    whole, and a resume (ballast removed) must end at the uninterrupted parameters."""
    wd, out_dir = tmp_path / "mnt", tmp_path / "out"
    wd.mkdir()
    out_dir.mkdir()
    run = " ".join(f"'{a}'" for a in train_cmd(wd / "run", "--config.train.log_every=100"))
    script = f"""
set -u
mount -t tmpfs -o size=64m tmpfs '{wd}'
( while [ ! -e '{wd}/run/checkpoints/3/commit_success.txt' ]; do sleep 0.005; done
  dd if=/dev/zero of='{wd}/ballast' bs=64k 2>/dev/null; sync ) &
{run} > '{out_dir}/first.out' 2> '{out_dir}/first.err'
echo $? > '{out_dir}/first.rc'
wait
ls '{wd}/run/checkpoints' > '{out_dir}/after_failure.ls'
rm -f '{wd}/ballast'
{run} > '{out_dir}/second.out' 2> '{out_dir}/second.err'
echo $? > '{out_dir}/second.rc'
cp -a '{wd}/run' '{out_dir}/run'
"""
    subprocess.run(["unshare", "-rm", "sh", "-c", script], env=child_env, timeout=600,
                   check=True)
    first_err = (out_dir / "first.err").read_text()
    assert (out_dir / "first.rc").read_text().strip() == "2", first_err[-3000:]
    last = first_err.strip().splitlines()[-1]
    assert last.startswith("mtop-jax: error: saving checkpoint step 4"), last
    assert "No space left on device" in last or "ENOSPC" in last or "space" in last, last
    assert "last complete checkpoint: step 3" in last, last
    # (orbax's writer threads print their own tracebacks of the failure before it)
    assert "Traceback" not in first_err[first_err.index("mtop-jax: error: saving"):]
    assert "3" in (out_dir / "after_failure.ls").read_text().split()
    second_err = (out_dir / "second.err").read_text()
    assert (out_dir / "second.rc").read_text().strip() == "0", second_err[-3000:]
    assert "resumed from step 3" in second_err
    assert_same_state(full_state(out_dir / "run", STEPS), reference_state(reference, STEPS),
                      "resumed after a full disk vs uninterrupted")


def test_cli_error_stays_the_last_line_when_background_threads_fail_at_exit(tmp_path):
    """After the error, orbax's threads may still log, raise or drop coroutines unawaited
    (seen once in the disk-full test above); none of it may print after the error."""
    script = tmp_path / "exit.py"
    script.write_text(textwrap.dedent("""
        import logging, sys, threading, time
        from mtop_jax import cli

        async def write():
            pass

        def background():
            time.sleep(0.3)
            pending = write()  # dropped, never awaited
            del pending
            logging.getLogger("orbax").error("a writer failed")
            raise OSError("No space left on device")

        def main():
            threading.Thread(target=background).start()
            print("mtop-jax: error: saving checkpoint step 4 failed", file=sys.stderr)
            return 2

        cli.main = main
        cli.run()
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["mtop-jax: error: saving checkpoint step 4 failed"]


# ---------------------------------------------------------------------------- NaN / Inf


def poison(monkeypatch, batches: set[int], value: float = float("nan")) -> None:
    """Batches number ``batches`` (0-based, as the data iterator counts) are poisoned:
    their logits get multiplied by ``value`` (as an overflow would), so the loss and
    the gradients of that step are not finite. The mark travels in the batch itself
    (non-finite example weights), so the jitted step sees which batch it is."""
    import jax.numpy as jnp

    from mtop_jax import steps
    from mtop_jax.data.pipeline import TrainIterator
    from mtop_jax.losses import task_losses

    original = TrainIterator.__next__

    def poisoned_batches(self):
        number = self.sampler.step
        batch = original(self)
        if number in batches:
            batch = {**batch, "weights": batch["weights"] * np.float32(value)}
        return batch

    def poisoned_losses(logits, labels, targets, weights, regression):
        bad = ~jnp.all(jnp.isfinite(weights))
        logits = logits * jnp.where(bad, jnp.float32(value), 1.0)
        return task_losses(logits, labels, targets, jnp.where(jnp.isfinite(weights),
                                                              weights, 1.0), regression)

    monkeypatch.setattr(TrainIterator, "__next__", poisoned_batches)
    monkeypatch.setattr(steps, "task_losses", poisoned_losses)


def tiny(*flags: str):
    return load_config(TINY, [*RUN_FLAGS, *flags])


def records(workdir: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == kind]


def test_nonfinite_steps_are_skipped_logged_and_stop_training(tmp_path, devices, monkeypatch):
    """Batch 2 alone, then batches 5, 6, 7 in a row (limit 3): the lone one is skipped
    and training goes on; the run of three stops it, with the last good checkpoint kept
    and no checkpoint of a non-finite step written."""
    poison(monkeypatch, {2, 5, 6, 7}, float("inf"))
    wd = tmp_path / "run"
    with pytest.raises(MtopError, match=r"not finite for 3 steps in a row \(steps 6-8") as e:
        train(tiny("--config.train.keep_checkpoints=100", "--config.train.max_nonfinite_steps=3"),
              wd, devices=devices[:1])
    assert "last good checkpoint is step 5" in str(e.value)
    events = records(wd, "nonfinite")
    assert [r["step"] for r in events] == [3, 6, 7, 8]
    assert [r["data_position"]["step"] for r in events] == [2, 5, 6, 7]  # batch numbers
    assert [r["in_a_row"] for r in events] == [1, 1, 2, 3]
    assert all(r["train_rows"] and r["loss"] in ("inf", "nan") for r in events)
    # Step 3's save waited for a finite step; none of 6-8 was saved.
    assert steps_on_disk(wd) == [1, 2, 4, 5]
    # The logged rows are the poisoned batch's rows: replaying the iterator shows them.
    from mtop_jax.data.pipeline import build_dataset
    from mtop_jax.state import load_tokenizer

    config = tiny()
    data = build_dataset(config.data, load_tokenizer(config), "train")
    it = data.train_iterator(seed=config.train.seed)
    it.load_state_dict(events[0]["data_position"])
    rows = [int(r) for r in next(it)["index"] if r >= 0]
    assert rows == events[0]["train_rows"]


def test_a_nonfinite_step_is_not_applied(tmp_path, devices, monkeypatch):
    """Params, optimizer and weighting state after a poisoned step 3 equal those after
    step 2 (a SIGTERM right after it saves them: preemption saves are not deferred)."""
    poison(monkeypatch, {2})
    wd = tmp_path / "run"
    assert train(tiny("--config.train.keep_checkpoints=100"), wd, devices=devices[:1],
                 stop_at=3) == {}
    assert steps_on_disk(wd) == [1, 2, 3]
    after_2, after_3 = full_state(wd, 2), full_state(wd, 3)
    kept = [k for k in after_2 if k.startswith(("['params']", "['opt_state']", "['weighting']"))]
    assert len(kept) > 100
    for key in kept:
        np.testing.assert_array_equal(after_2[key], after_3[key], err_msg=key)
    assert int(after_3["['nonfinite_run']"]) == 1 and int(after_3["['step']"]) == 3


# ---------------------------------------------------------------------------- config mistakes


class CompileCounter:
    """Counts XLA compilations (jax.monitoring events) while active."""

    def __init__(self):
        self.count = 0
        self.active = False

    def __call__(self, event: str, duration: float, **kwargs) -> None:
        if self.active and "backend_compile" in event:
            self.count += 1


@pytest.fixture(scope="module")
def compiles():
    counter = CompileCounter()
    jax.monitoring.register_event_duration_secs_listener(counter)
    return counter


def test_compile_counter_sees_compiles(compiles):
    compiles.active, compiles.count = True, 0
    jax.jit(lambda x: x * 3 + 1)(np.arange(7.0))
    compiles.active = False
    assert compiles.count >= 1  # so the zero-compile assertions below can fail


@pytest.mark.parametrize("flags, message", [
    (["--config.train.stepz=3"], "train has no field .stepz."),
    (["--config.train.steps=three"], "train.steps"),
    (["--config.model.num_prompts=2.5"], "model.num_prompts"),
    (["--config.mesh.data=3"], "needs 3 devices, have 8"),
    (["--config.mesh.data=-1", "--config.mesh.tensor=3"], "do not divide"),
    (["--config.data.batch_size=12", "--config.mesh.data=8"], "data.batch_size=12 does not divide"),
    (["--config.data.eval_batch_size=4", "--config.mesh.data=8"], "data.eval_batch_size=4"),
    (["--config.weighting.weights=(1.0, 2.0)"], "weighting.weights: 2 weights for 4 tasks"),
    (["--config.weighting.method=magic"], "magic"),
])
def test_config_mistakes_fail_before_any_compile(tmp_path, devices, compiles, flags, message):
    compiles.active, compiles.count = True, 0
    try:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            train(load_config(TINY, flags), tmp_path / "run", devices=devices)
    finally:
        compiles.active = False
    assert compiles.count == 0
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_task_in_config_missing_from_data_fails_before_any_compile(tmp_path, devices, compiles):
    config = load_config(TINY, [])
    config.data.tasks = {**config.data.tasks.to_dict(),
                         "toxicity": {"field": "labels.toxicity", "labels": ["clean", "toxic"]}}
    compiles.active, compiles.count = True, 0
    try:
        with pytest.raises(MtopError, match="toxicity"):
            train(config, tmp_path / "run", devices=devices)
    finally:
        compiles.active = False
    assert compiles.count == 0


def test_predictor_and_params_from_skip_an_unreadable_latest_step(tmp_path, reference, caplog):
    import mtop_jax
    from mtop_jax.transfer import read_params

    wd = tmp_path / "run"
    copy_steps(reference, wd, upto=4)
    corrupt(wd / "checkpoints" / "4", "truncate")
    with caplog.at_level("WARNING", logger="mtop_jax.checkpointing"):
        predictor = mtop_jax.load(wd)
        params = read_params(wd)
    assert predictor.step == 3
    assert sum("checkpoint step 4" in r.getMessage() for r in caplog.records) == 2
    expected = read_params(reference, step=3)
    assert params.keys() == expected.keys()
    for key in params:
        np.testing.assert_array_equal(params[key], expected[key])
    assert (wd / "checkpoints" / "4").is_dir()  # readers never move anything


def test_fingerprint_sees_any_changed_byte_and_ignores_container_types():
    from flax import nnx

    from mtop_jax.checkpointing import fingerprint

    rng = np.random.default_rng(0)
    tree = {"w": rng.normal(size=(5, 3)).astype(np.float32),
            "h": rng.normal(size=(7,)).astype(jax.numpy.bfloat16),
            "mask": rng.random(4) > 0.5, "key": jax.random.key(3),
            "layers": [np.arange(6, dtype=np.int32)]}
    base = fingerprint(tree)
    assert set(base) == {"w", "h", "mask", "key", "layers/0"}
    for name, array in [("w", tree["w"]), ("h", tree["h"]), ("layers/0", tree["layers"][0])]:
        raw = array.view(np.uint8).reshape(-1)
        for byte in range(raw.size):
            for bit in (0, 7):  # lowest bit and the top bit (a float's sign, in order)
                flipped = raw.copy()
                flipped[byte] ^= np.uint8(1 << bit)
                changed = flipped.view(array.dtype).reshape(array.shape)
                tree2 = jax.tree.map(lambda x: x, tree)
                if name == "layers/0":
                    tree2["layers"] = [changed]
                else:
                    tree2[name] = changed
                got = fingerprint(tree2)
                assert got[name] != base[name], (name, byte, bit)
                assert all(got[k] == base[k] for k in base if k != name)
    # Swapped values change it too (position-weighted), and an nnx State names its
    # arrays as the plain dict of the same values does.
    swapped = {**tree, "w": tree["w"][::-1].copy()}
    assert fingerprint(swapped)["w"] != base["w"]
    state = nnx.State({"w": nnx.Param(jax.numpy.asarray(tree["w"]))})
    assert fingerprint(state) == {"w": base["w"]}

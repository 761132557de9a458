"""Fault injection on the trainer, part 1: kill -9 at any moment and SIGTERM. Nothing
may be lost beyond the steps since the last checkpoint, and a resumed run must end
bitwise where an uninterrupted one ends (the reference run of ``fault_helpers``).

The trainer runs as a real ``mtop-jax train`` child process (one CPU device) so it
can be killed; a persistent XLA compilation cache shared by the children keeps
each restart to a few seconds. The kill rounds cycle through four moments (during
an asynchronous save, while training, during start-up and restore, while an old
step is deleted). CI runs a bounded version (4 rounds, one of each); for a longer
campaign:

    MTOP_FAULT_ROUNDS=24 pytest tests/test_faults_kill.py -k kill -s

(``-s`` prints the per-round table: the step reached, the checkpoint left, the
steps lost.)
"""

from __future__ import annotations

import glob
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
from fault_helpers import (
    STEPS,
    assert_same_state,
    check_every_step_on_disk,
    full_state,
    last_logged_step,
    logged_steps,
    reference_state,
    run_child,
    steps_on_disk,
    train_cmd,
)

from mtop_jax.training.checkpoints import Checkpoints

ROUNDS = int(os.environ.get("MTOP_FAULT_ROUNDS", "4"))


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
    # The save is the uninterrupted run's state at that step, bit for bit (so resuming from
    # it is resuming from any checkpoint: the kill test above ends such a resume).
    assert_same_state(full_state(wd, reached), reference_state(reference, reached),
                      f"SIGTERM save of step {reached} vs the uninterrupted run's")

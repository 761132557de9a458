"""Fault injection on the trainer, part 2: corrupt checkpoints, a full disk, poisoned
batches, config mistakes. Nothing may be lost beyond the steps since the last
checkpoint, and a resumed run must end bitwise where an uninterrupted one ends
(``test_faults_kill.py`` has kill -9 and SIGTERM; ``fault_helpers.py`` what both share).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from fault_helpers import (
    RUN_FLAGS,
    STEPS,
    TINY,
    assert_same_state,
    copy_steps,
    corrupt,
    full_state,
    reference_state,
    run_child,
    steps_on_disk,
    train_cmd,
)

from mtop_jax.config.loading import load_config
from mtop_jax.errors import ConfigError, MtopError
from mtop_jax.training.loop import train

# ---------------------------------------------------------------------------- corrupt


#: The four kinds of damage, newest step first: each must be skipped on its own.
DAMAGE = {6: "truncate", 5: "garbage", 4: "metadata", 3: "data-json"}


def test_corrupt_latest_checkpoints_fall_back_with_a_warning(tmp_path, reference, child_env):
    """Four damaged steps, one kind each: every one is skipped with a warning naming it
    and moved aside; the run resumes from the step before them and ends bitwise where
    the uninterrupted run ends."""
    wd = tmp_path / "run"
    copy_steps(reference, wd, upto=max(DAMAGE))
    for step, how in DAMAGE.items():
        corrupt(wd / "checkpoints" / str(step), how)
    out = run_child(wd, child_env, "--config.train.keep_checkpoints=100")
    assert out.returncode == 0, out.stderr[-3000:]
    for step in DAMAGE:
        assert f"checkpoint step {step}" in out.stderr
        assert len(list((wd / "unreadable_checkpoints").glob(f"{step}-*"))) == 1  # kept
    assert out.stderr.count("unreadable, skipping it") >= len(DAMAGE)
    assert "resumed from step 2" in out.stderr
    assert_same_state(full_state(wd, STEPS), reference_state(reference, STEPS),
                      f"resumed from step 2 after damaged steps {DAMAGE}")


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


def test_abandoned_read_coroutines_stay_quiet_and_other_errors_do_not():
    """After a failed restore, orbax's sibling read coroutines are closed when collected
    and wrap that GeneratorExit in an error (the traceback that once followed the clear
    error above, depending on when the collector ran): the CLI's hook drops exactly
    those."""
    script = textwrap.dedent("""
        import gc, sys, types
        from mtop_jax.cli import _quiet_closed_loops
        sys.unraisablehook = _quiet_closed_loops

        @types.coroutine
        def pending_read():
            yield

        async def read_shard():
            try:
                await pending_read()
            except GeneratorExit as e:
                raise Exception("Encountered error while reading array index") from e

        coroutine = read_shard()
        coroutine.send(None)  # suspended in the read, then abandoned
        del coroutine
        gc.collect()

        class Closer:
            def __del__(self):
                raise ValueError("a real bug in a finaliser")
        Closer()
        gc.collect()
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "reading array index" not in out.stderr
    assert "a real bug in a finaliser" in out.stderr


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

    from mtop_jax.data.pipeline import TrainIterator
    from mtop_jax.training import steps
    from mtop_jax.training.losses import task_losses

    original = TrainIterator.__next__

    def poisoned_batches(self):
        number = self.sampler.step
        batch = original(self)
        if number in batches:
            batch = {**batch, "weights": batch["weights"] * np.float32(value)}
        return batch

    def poisoned_losses(logits, labels, targets, weights, regression, normalize="labelled",
                        *scales):
        # ``value`` read back from the weights (labelled rows: 1 * inf = inf; unlabelled:
        # 0 * inf = nan), not baked in: both tests below run one compiled step.
        bad = ~jnp.all(jnp.isfinite(weights))
        poisoned = jnp.where(jnp.any(jnp.isinf(weights)), jnp.inf, jnp.nan)
        logits = logits * jnp.where(bad, poisoned, 1.0)
        return task_losses(logits, labels, targets, jnp.where(jnp.isfinite(weights),
                                                              weights, 1.0), regression,
                           normalize, *scales)

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
    from mtop_jax.training.setup import load_tokenizer

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
    from mtop_jax.training.transfer import read_params

    wd = tmp_path / "run"
    copy_steps(reference, wd, upto=4)
    corrupt(wd / "checkpoints" / "4", "truncate")
    with caplog.at_level("WARNING", logger="mtop_jax.training.checkpoints"):
        predictor = mtop_jax.load(wd)
        params = read_params(wd)
    assert predictor.step == 3
    assert sum("checkpoint step 4" in r.getMessage() for r in caplog.records) == 2
    expected = read_params(reference, step=3)
    assert params.keys() == expected.keys()
    for key in params:
        np.testing.assert_array_equal(params[key], expected[key])
    assert (wd / "checkpoints" / "4").is_dir()  # readers never move anything


@pytest.mark.parametrize("version", [1, 2])  # 1: bytes (older checkpoints); 2: words
def test_fingerprint_sees_any_changed_byte_and_ignores_container_types(version):
    import functools

    from flax import nnx

    from mtop_jax.training import checkpoints

    fingerprint = functools.partial(checkpoints.fingerprint, version=version)

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
    assert checkpoints.fingerprint(tree, version=3 - version) != base  # versions differ


# ---------------------------------------------------------------------- data of every split


def write_splits(root: Path, test_rows: list[dict], validation_rows: list[dict] | None = None
                 ) -> Path:
    """A two-task data directory whose label sets are inferred from train.jsonl."""
    rows = [{"id": f"p{i}", "text": f"package {i} " + ("game" if i % 2 else "library"),
             "labels": {"kind": "fun" if i % 2 else "work", "arch": "all" if i % 3 else "any"}}
            for i in range(64)]
    root.mkdir()
    for split, split_rows in (("train", rows), ("validation", validation_rows or rows[:16]),
                              ("test", test_rows)):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split_rows))
    return root


def two_task_config(data_dir: Path, *flags: str):
    config = load_config(TINY, [f"--config.data.path={data_dir}", "--config.data.id_field=",
                                *flags])
    config.data.tasks = {"kind": "labels.kind", "arch": "labels.arch"}
    return config


def test_an_unknown_test_label_fails_before_any_compile_naming_file_and_line(
        tmp_path, devices, compiles):
    test_rows = [{"text": "a", "labels": {"kind": "fun", "arch": "all"}},
                 {"text": "b", "labels": {"kind": "work", "arch": "any"}},
                 {"text": "c", "labels": {"kind": "boring", "arch": "all"}}]
    data_dir = write_splits(tmp_path / "data", test_rows)
    compiles.active, compiles.count = True, 0
    try:
        with pytest.raises(MtopError, match=r"test\.jsonl:3: task kind: label 'boring'"):
            train(two_task_config(data_dir), tmp_path / "run", devices=devices[:1])
    finally:
        compiles.active = False
    assert compiles.count == 0
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_labels_ignore_counts_them_as_missing(tmp_path, caplog):
    from mtop_jax.data.pipeline import build_dataset
    from mtop_jax.training.setup import load_tokenizer

    test_rows = [{"text": "a", "labels": {"kind": "fun", "arch": "all"}},
                 {"text": "b", "labels": {"kind": "boring", "arch": "any"}},
                 {"text": "c", "labels": {"kind": "dull", "arch": "all"}}]
    config = two_task_config(write_splits(tmp_path / "data", test_rows),
                             "--config.data.unknown_labels=ignore")
    tokenizer = load_tokenizer(config)
    tasks = build_dataset(config.data, tokenizer, "train").tasks
    with caplog.at_level("WARNING", logger="mtop_jax.data.local_files"):
        test = build_dataset(config.data, tokenizer, "test", tasks=tasks)
    assert test.examples.label_counts() == {"arch": 3, "kind": 1}
    assert any("test.jsonl" in r.getMessage() and "kind 2" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(ConfigError, match="data.unknown_labels"):
        build_dataset({**config.data.to_dict(), "unknown_labels": "skip"}, tokenizer, "train")


def test_a_task_absent_from_the_validation_split_fails_before_any_compile(
        tmp_path, devices, compiles):
    validation = [{"text": "a", "labels": {"kind": "fun", "arch": None}},
                  {"text": "b", "labels": {"kind": "work", "arch": None}}]
    data_dir = write_splits(tmp_path / "data", validation[:1], validation_rows=validation)
    compiles.active, compiles.count = True, 0
    try:
        with pytest.raises(MtopError, match=r"validation\.jsonl: split 'validation' has no "
                                            r"labelled example of task arch"):
            train(two_task_config(data_dir), tmp_path / "run", devices=devices[:1])
    finally:
        compiles.active = False
    assert compiles.count == 0

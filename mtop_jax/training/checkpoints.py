"""Orbax checkpoints of a training run (DESIGN.md section 8).

One ``CheckpointManager`` under ``<workdir>/checkpoints`` saves, per step, three
items: ``state`` (the whole train state: parameters, optimizer and weighting
state, step, dropout RNG), ``data`` (the data iterator's position, JSON) and
``fingerprint`` (a 64-bit checksum of every array, computed on device: JSON).
Saves are asynchronous; the last ``keep`` steps are preserved plus the best one
by a chosen eval metric. Restoring goes through an abstract, sharded state, so
a checkpoint loads onto any mesh, one CPU included.

Faults (tests/test_faults_kill.py, tests/test_faults_train.py): orbax writes a
step under a temporary name and renames it when complete, so a process killed
mid-save leaves no step that
restore accepts; old steps are not deleted in place either (a kill in the middle
of that would leave a step with missing files) but renamed into ``deleted/`` and
removed from there. Every restore recomputes the fingerprint of what it read and
compares it with the saved one, so bytes corrupted in a way the storage format
does not notice (compressed chunks have no checksum) are caught too. A step that
is there but unreadable or corrupted is skipped with a warning by
:meth:`Checkpoints.restore_latest`, which falls back to the newest good one. A
save that fails (a full disk) raises :class:`CheckpointError` naming the step and
the last complete checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from mtop_jax.errors import MtopError
from mtop_jax.files import as_path

log = logging.getLogger("mtop_jax.training.checkpoints")
T = TypeVar("T")
# Where orbax moves a step it garbage-collects (an atomic rename), for us to delete.
DELETED = "deleted"


def _not_read_only_notice(record: logging.LogRecord) -> bool:
    """orbax logs a WARNING each time a manager opens a directory read-only (every load
    of a workdir); it is what was asked for, not news."""
    return not str(record.msg).startswith("Given directory is read only")


logging.getLogger("absl").addFilter(_not_read_only_notice)


class CheckpointError(MtopError):
    """A checkpoint that could not be written, or no readable checkpoint to restore."""


class Checkpoints:
    def __init__(self, workdir: str | Path, *, keep: int = 2, best_metric: str | None = None,
                 best_mode: str = "max", async_save: bool = True, read_only: bool = False):
        self.directory = Path(workdir).absolute() / "checkpoints" if not str(workdir).startswith(
            "gs://") else f"{workdir}/checkpoints"
        self.read_only = read_only
        self._saving: int | None = None  # the step of an asynchronous save not yet waited for
        self._closed = False
        keep_policies = [policies.LatestN(n=keep)]
        if best_metric:
            keep_policies.append(policies.BestN(
                get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "max", n=1,
                keep_checkpoints_without_metrics=False))
        # Read-only: none of the writing options, which orbax would otherwise reset with a
        # WARNING line each (four on every `predict` of a workdir).
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keep_policies),
            enable_async_checkpointing=async_save, read_only=read_only,
            create=not read_only, cleanup_tmp_directories=not read_only,
            save_interval_steps=0 if read_only else 1,
            # (ignored on GCS, where deletes are per object)
            todelete_subdir=None if read_only else DELETED)
        # Handlers named (not only the items) so that item_metadata() can read a step's tree.
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": ocp.JsonCheckpointHandler(),
                           "fingerprint": ocp.JsonCheckpointHandler()})
        self._empty_deleted()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict[str, Any],
             metrics: dict[str, float] | None = None, force: bool = False) -> bool:
        """Start saving ``step`` (asynchronously: the previous save is finished first).

        Raises :class:`CheckpointError` if this save, or the previous one, failed."""
        prints = {"version": FINGERPRINT_VERSION, "arrays": fingerprint(state)}
        try:
            saved = self.manager.save(
                step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                              data=ocp.args.JsonSave(data_state),
                                              fingerprint=ocp.args.JsonSave(prints)),
                metrics=metrics, force=force)
        except Exception as e:
            # An asynchronous failure of the previous save surfaces here too.
            raise self._failed(self._saving if self._saving is not None else step, e) from e
        self._saving = step if saved else self._saving
        self._empty_deleted()  # what the previous save's clean-up moved there
        return saved

    def wait(self) -> None:
        """Block until the last save is complete on disk; raise if it failed."""
        if self._closed:
            return
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._failed(self._saving, e) from e
        finally:
            self._saving = None
        self._empty_deleted()

    def _empty_deleted(self) -> None:
        """Delete the steps orbax renamed into ``deleted/``: a kill half-way through
        leaves files there, never in a step that restore would list. Only the entries
        (orbax may be renaming a new one in), and only by process 0, as orbax deletes."""
        trash = epath.Path(self.directory) / DELETED
        if self.read_only or jax.process_index() != 0 or not trash.exists():
            return
        for entry in list(trash.iterdir()):
            if entry.is_dir():
                entry.rmtree(missing_ok=True)
            else:
                entry.unlink(missing_ok=True)

    def _failed(self, step: int | None, error: Exception) -> CheckpointError:
        self._saving = None
        complete = [s for s in self._complete_steps() if s != step]
        # Drain orbax's background writers now, so their own reports of this failure
        # come before ours, not after it at exit; this manager saves nothing more.
        with contextlib.suppress(Exception):  # they fail the same way: ours is the report
            self.manager.close()
        self._closed = True
        last = f"step {max(complete)}" if complete else "none"
        return CheckpointError(
            f"saving checkpoint step {step} to {self.directory} failed "
            f"({type(error).__name__}: {_first_line(error)}); the last complete checkpoint: "
            f"{last}")

    def _complete_steps(self) -> list[int]:
        try:
            self.manager.reload()
            return self.all_steps()
        except Exception:  # the directory itself unreadable: nothing to report
            return []

    def restore_latest(self, restore: Callable[[int], T],
                       quarantine: str | Path | None = None) -> tuple[int, T] | None:
        """``(step, restore(step))`` for the newest step that restores; None if no step.

        An unreadable or corrupted step is skipped with a warning naming it and why. In a
        run that will write again (``quarantine``: a directory), the skipped steps are
        moved there once a good one is found, so that saving those step numbers later
        does not collide with them. Raises :class:`CheckpointError` if there are steps
        but none restores (and then moves nothing).
        """
        skipped: list[tuple[int, str]] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                result = restore(step)
            except Exception as e:  # orbax/tensorstore raise many types for bad bytes
                reason = f"{type(e).__name__}: {_first_line(e)}"
                skipped.append((step, reason))
                log.warning("checkpoint step %d in %s is unreadable, skipping it: %s",
                            step, self.directory, reason)
                continue
            if quarantine is not None and not self.read_only:
                for bad, _ in skipped:
                    self._quarantine(bad, Path(quarantine))
            return step, result
        if skipped:
            raise CheckpointError(f"{self.directory}: no readable checkpoint; " + "; ".join(
                f"step {step} ({reason})" for step, reason in skipped)
                + ". Nothing was moved; to start afresh, move that directory away")
        return None

    def _quarantine(self, step: int, where: Path) -> None:
        where = as_path(where)
        where.mkdir(parents=True, exist_ok=True)
        target = where / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        (as_path(self.directory) / str(step)).rename(target)
        log.warning("moved unreadable checkpoint step %d to %s", step, target)
        self.manager.reload()

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """(state placed as ``abstract_state``'s shardings say, data iterator state)."""
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                          data=ocp.args.JsonRestore()))
        self.verify(step, out.state)
        return out.state, out.data

    def restore_state(self, step: int, abstract_state: Any) -> Any:
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        self.verify(step, out.state)
        return out.state

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the parameters of a saved train state (no optimizer moments are read),
        placed as the ``jax.ShapeDtypeStruct`` leaves of ``abstract_params`` say, and
        checked against the fingerprint saved with them."""
        with ocp.PyTreeCheckpointer() as ckpt:
            params = ckpt.restore(
                epath.Path(self.directory) / str(step) / "state",
                args=ocp.args.PyTreeRestore(
                    item={"params": abstract_params},
                    restore_args={"params": jax.tree.map(
                        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding),
                        abstract_params)},
                    partial_restore=True))["params"]
        self.verify(step, {"params": params})
        return params

    def restore_on_one_device(self, step: int) -> Any:
        """The saved state on this process's first device, whatever mesh and however many
        processes saved it (the saved shardings name devices this process may not have)."""
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                              self.manager.item_metadata(step)["state"])
        return self.restore_state(step, target)

    def verify(self, step: int, restored: Any) -> None:
        """Raise :class:`CheckpointError` unless every array of ``restored`` (the whole
        state or a part of it, e.g. ``{"params": ...}``) matches the fingerprint saved
        with ``step``. Checkpoints from before fingerprints pass unchecked."""
        if not (as_path(self.directory) / str(step) / "fingerprint").exists():
            return
        saved = self.manager.restore(
            step, args=ocp.args.Composite(fingerprint=ocp.args.JsonRestore())).fingerprint
        version = saved.get("version")
        if version not in _WORD_BYTES:  # a format this code does not know: unchecked
            return
        saved = saved.get("arrays", {})
        got = fingerprint(restored, version)
        missing = sorted(set(got) - set(saved))
        bad = sorted(name for name in got if name in saved and saved[name] != got[name])
        if bad or (saved and missing):
            raise CheckpointError(
                f"checkpoint step {step}: {len(bad)} of {len(got)} arrays differ from the "
                f"fingerprint saved with them{' (' + bad[0] + ', ...)' if bad else ''}"
                f"{'; not fingerprinted: ' + missing[0] if missing else ''}: corrupted files")

    def close(self) -> None:
        if not self._closed:
            self.wait()
            self.manager.close()
            self._closed = True


# ---------------------------------------------------------------------------- fingerprints

#: 2: checksums over words of up to 4 bytes (4x fewer terms than 1's bytes for fp32).
FINGERPRINT_VERSION = 2
_WORD_BYTES = {1: 1, 2: 4}  # version -> largest word, in bytes


def fingerprint(tree: Any, version: int = FINGERPRINT_VERSION) -> dict[str, str]:
    """{array path: 64-bit checksum (hex)} of every array of ``tree``, computed where the
    arrays live (sharded over hosts included) from their exact bits: any changed byte
    changes its array's checksum. Paths ignore the container types (``a/b/0``), so a
    train state and its restored dict form agree. ``version``: that of a saved one."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    names = [_path_name(path) for path, _ in leaves]
    arrays = [x for _, x in leaves]
    sums = jax.device_get(_checksums(arrays, _WORD_BYTES[version]))
    return {name: f"{int(a):08x}{int(b):08x}" for name, (a, b) in zip(names, sums, strict=True)}


@functools.partial(jax.jit, static_argnums=1)
def _checksums(arrays: list[jax.Array], word_bytes: int) -> list[tuple[jax.Array, jax.Array]]:
    return [_checksum(x, word_bytes) for x in arrays]


def _checksum(x: jax.Array, word_bytes: int) -> tuple[jax.Array, jax.Array]:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = min(x.dtype.itemsize, word_bytes)
    word = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
    # [...] or [..., itemsize // size]: the array's bits as unsigned words, widened
    words = jax.lax.bitcast_convert_type(x, word).astype(jnp.uint32)
    index = jnp.arange(words.size, dtype=jnp.uint32).reshape(words.shape)
    # A changed byte changes its word by d, 0 < |d| < 2^32; times an odd weight it is
    # still not 0 mod 2^32, so the first sum changes. Two mixes: 64 bits in all.
    first = jnp.sum(words * (index * np.uint32(2) + np.uint32(1)) * np.uint32(2654435761),
                    dtype=jnp.uint32)
    second = jnp.sum((words + np.uint32(0x9E37)) * (index * np.uint32(2) + np.uint32(1))
                     * np.uint32(0x85EBCA6B) ^ (index >> np.uint32(3)), dtype=jnp.uint32)
    return first, second


def _path_name(path: tuple) -> str:
    parts = []
    for entry in path:
        for attr in ("name", "key", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(p for p in parts if p != "value")


# OS errors that tensorstore reports inside long messages: say them plainly.
_OS_ERRORS = ("No space left on device", "Disk quota exceeded", "Read-only file system",
              "Permission denied", "File too large")


def _first_line(error: Exception) -> str:
    text = str(error)
    for known in _OS_ERRORS:
        if known in text:
            return known
    text = text.split(" See full TensorStore details")[0]
    lines = text.strip().splitlines()
    return lines[0][:300] if lines else ""

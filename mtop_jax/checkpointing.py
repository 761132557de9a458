"""Orbax checkpoints of a training run (DESIGN.md section 8).

One ``CheckpointManager`` under ``<workdir>/checkpoints`` saves, per step, two
items: ``state`` (the whole train state: parameters, optimizer and weighting
state, step, dropout RNG) and ``data`` (the data iterator's position, JSON).
Saves are asynchronous; the last ``keep`` steps are preserved plus the best one
by a chosen eval metric. Restoring goes through an abstract, sharded state, so
a checkpoint loads onto any mesh, one CPU included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies


class Checkpoints:
    def __init__(self, workdir: str | Path, *, keep: int = 2, best_metric: str | None = None,
                 best_mode: str = "max", async_save: bool = True, read_only: bool = False):
        self.directory = Path(workdir).absolute() / "checkpoints" if not str(workdir).startswith(
            "gs://") else f"{workdir}/checkpoints"
        keep_policies = [policies.LatestN(n=keep)]
        if best_metric:
            keep_policies.append(policies.BestN(
                get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "max", n=1,
                keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keep_policies),
            enable_async_checkpointing=async_save, read_only=read_only,
            create=not read_only, cleanup_tmp_directories=True)
        # Handlers named (not only the items) so that item_metadata() can read a step's tree.
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def save(self, step: int, state: Any, data_state: dict[str, Any],
             metrics: dict[str, float] | None = None, force: bool = False) -> bool:
        return self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=ocp.args.JsonSave(data_state)),
            metrics=metrics, force=force)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """(state placed as ``abstract_state``'s shardings say, data iterator state)."""
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                          data=ocp.args.JsonRestore()))
        return out.state, out.data

    def restore_state(self, step: int, abstract_state: Any) -> Any:
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return out.state

    def restore_on_one_device(self, step: int) -> Any:
        """The saved state on this process's first device, whatever mesh and however many
        processes saved it (the saved shardings name devices this process may not have)."""
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                              self.manager.item_metadata(step)["state"])
        return self.restore_state(step, target)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

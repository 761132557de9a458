"""The one example format every source is mapped to.

An ``ExampleSet`` is columnar: ``texts`` (and ``pairs`` for sentence-pair
tasks), optional ``ids``, and ``labels``, a float32 array [n, num_tasks] in the
order of ``tasks``:

- classification: the label's index (exact in float32 for any real label set);
- regression: the target value;
- missing: NaN. Most examples are labelled for only some tasks (sparse demo
  labels, GLUE mixtures where each example carries its own task only).

One float array holds both kinds without a sentinel that a regression target
could collide with. Batches turn it into the model's form (``labels`` int32
with -1 for missing, ``targets`` float32): see ``mtop_jax.data.batching``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from mtop_jax.data.tasks import TaskSpec, check_unique
from mtop_jax.errors import DataError


@dataclasses.dataclass(frozen=True, eq=False)
class ExampleSet:
    """Texts with one label (or NaN) per task. ``pairs[i] is None``: a single text."""

    tasks: tuple[TaskSpec, ...]
    texts: list[str]
    labels: np.ndarray
    pairs: list[str | None] | None = None
    ids: list[str] | None = None
    name: str = ""

    def __post_init__(self):
        object.__setattr__(self, "tasks", tuple(self.tasks))
        labels = np.asarray(self.labels, dtype=np.float32)
        if labels.size == 0:
            labels = labels.reshape(len(self.texts), len(self.tasks))
        object.__setattr__(self, "labels", labels)
        n, t = len(self.texts), len(self.tasks)
        if labels.shape != (n, t):
            raise DataError(f"{self.name or 'examples'}: labels have shape {labels.shape}, "
                            f"expected ({n}, {t}) for {n} texts and {t} tasks")
        for extra, what in ((self.pairs, "pairs"), (self.ids, "ids")):
            if extra is not None and len(extra) != n:
                raise DataError(f"{self.name or 'examples'}: {len(extra)} {what} for {n} texts")
        check_unique(self.tasks)

    def __len__(self) -> int:
        return len(self.texts)

    def __repr__(self) -> str:
        pairs = "" if self.pairs is None else ", with pairs"
        return f"ExampleSet({self.name!r}: {len(self)} examples{pairs}, tasks {self.task_names})"

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    def label_counts(self) -> dict[str, int]:
        """Labelled examples per task."""
        present = ~np.isnan(self.labels)
        return {t.name: int(c) for t, c in zip(self.tasks, present.sum(0), strict=True)}

    def take(self, n: int | None) -> ExampleSet:
        """The first ``n`` examples (all of them for ``None``)."""
        if n is None or n >= len(self):
            return self
        return dataclasses.replace(
            self, texts=self.texts[:n], labels=self.labels[:n],
            pairs=None if self.pairs is None else self.pairs[:n],
            ids=None if self.ids is None else self.ids[:n])

    def align(self, tasks: Sequence[TaskSpec]) -> ExampleSet:
        """The same examples labelled against another task list.

        Tasks this set does not have become missing; a task it has is re-indexed
        by label name, so a source's labels must all exist in the new spec.
        """
        tasks = tuple(tasks)
        if tasks == self.tasks:
            return self
        mine = {t.name: (i, t) for i, t in enumerate(self.tasks)}
        out = np.full((len(self), len(tasks)), np.nan, np.float32)
        for j, spec in enumerate(tasks):
            if spec.name not in mine:
                continue
            i, old = mine[spec.name]
            if old.kind != spec.kind:
                raise DataError(f"{self.name}: task {spec.name} is {old.kind} here "
                                f"but {spec.kind} in the task specs")
            col = self.labels[:, i]
            if spec.is_regression or old.labels == spec.labels:
                out[:, j] = col
                continue
            table = np.array([spec.index(x) for x in old.labels], np.float32)
            present = ~np.isnan(col)
            out[present, j] = table[col[present].astype(np.int64)]
        return dataclasses.replace(self, tasks=tasks, labels=out)

    @staticmethod
    def concatenate(sets: Sequence[ExampleSet], name: str = "") -> ExampleSet:
        """Row-wise union of sets that share one task list."""
        if not sets:
            raise DataError("no example sets to concatenate")
        tasks = sets[0].tasks
        if any(s.tasks != tasks for s in sets):
            raise DataError("example sets to concatenate must share their task specs "
                            "(align them first)")
        texts = [t for s in sets for t in s.texts]
        pairs = None
        if any(s.pairs is not None for s in sets):
            pairs = [p for s in sets for p in (s.pairs or [None] * len(s))]
        ids = None
        if any(s.ids is not None for s in sets):
            ids = [i for s in sets for i in (s.ids or [""] * len(s))]
        labels = np.concatenate([s.labels for s in sets], axis=0)
        return ExampleSet(tasks, texts, labels, pairs, ids, name or "+".join(s.name for s in sets))

"""Task specs: what each output of the model means.

A task is a name, a kind (``classification`` or ``regression``) and, for
classification, its label names in index order. The specs are saved with every
model (``save_task_specs``) so that predictions come back as label names and a
later evaluation indexes labels exactly as training did.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mtop_jax.errors import ConfigError, DataError

KINDS = ("classification", "regression")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task. ``labels`` is empty for regression."""

    name: str
    kind: str = "classification"
    labels: tuple[str, ...] = ()

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"task name must be a non-empty string, got {self.name!r}")
        if self.kind not in KINDS:
            raise ConfigError(f"task {self.name}: kind must be one of {KINDS}, got {self.kind!r}")
        labels = tuple(self.labels)
        object.__setattr__(self, "labels", labels)
        if self.kind == "regression" and labels:
            raise ConfigError(f"task {self.name}: a regression task has no label names")
        if self.kind == "classification":
            if not labels:
                raise ConfigError(f"task {self.name}: a classification task needs label names")
            if not all(isinstance(x, str) for x in labels):
                raise ConfigError(f"task {self.name}: label names must be strings, got {labels}")
            if len(set(labels)) != len(labels):
                dup = sorted({x for x in labels if labels.count(x) > 1})
                raise ConfigError(f"task {self.name}: repeated label names {dup}")

    @property
    def is_regression(self) -> bool:
        return self.kind == "regression"

    @property
    def num_classes(self) -> int:
        """Width of the task's head: the number of labels, or 1 for regression."""
        return 1 if self.is_regression else len(self.labels)

    def index(self, label: str) -> int:
        """Index of a label name; a ``DataError`` listing the allowed labels otherwise."""
        try:
            return self._lookup[label]
        except (KeyError, TypeError):
            raise DataError(
                f"task {self.name}: label {label!r} is not one of the allowed labels "
                f"{list(self.labels)}") from None

    @property
    def _lookup(self) -> dict[str, int]:
        table = self.__dict__.get("_table")
        if table is None:
            table = {name: i for i, name in enumerate(self.labels)}
            object.__setattr__(self, "_table", table)
        return table

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "labels": list(self.labels)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TaskSpec:
        unknown = set(d) - {"name", "kind", "labels"}
        if unknown or "name" not in d:
            raise ConfigError(f"task spec {dict(d)}: expected keys name, kind, labels")
        return cls(name=d["name"], kind=d.get("kind", "classification"),
                   labels=tuple(d.get("labels") or ()))


def task_specs_to_json(specs: Sequence[TaskSpec]) -> str:
    return json.dumps({"tasks": [s.to_dict() for s in specs]}, indent=1)


def task_specs_from_json(text: str, source: str = "task specs") -> tuple[TaskSpec, ...]:
    try:
        d = json.loads(text)
        specs = tuple(TaskSpec.from_dict(t) for t in d["tasks"])
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{source}: not a task spec file ({type(e).__name__}: {e})") from None
    check_unique(specs)
    return specs


def save_task_specs(specs: Sequence[TaskSpec], path: str | Path) -> None:
    """Writes ``{"tasks": [{name, kind, labels}, ...]}``; kept next to the weights."""
    Path(path).write_text(task_specs_to_json(specs) + "\n")


def load_task_specs(path: str | Path) -> tuple[TaskSpec, ...]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read task specs ({e})") from None
    return task_specs_from_json(text, str(path))


def check_unique(specs: Iterable[TaskSpec]) -> None:
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"task names must be unique, repeated: {dup}")


def merge_task_specs(groups: Iterable[Sequence[TaskSpec]]) -> tuple[TaskSpec, ...]:
    """The union of several sources' tasks, in first-seen order.

    A task named in several sources is one task: its kinds must agree, and its
    label names are the first source's followed by any new ones from later
    sources (so identical label sets stay identical).
    """
    merged: dict[str, TaskSpec] = {}
    for group in groups:
        for spec in group:
            old = merged.get(spec.name)
            if old is None:
                merged[spec.name] = spec
                continue
            if old.kind != spec.kind:
                raise ConfigError(
                    f"task {spec.name} is {old.kind} in one source and {spec.kind} in another")
            new = tuple(x for x in spec.labels if x not in old._lookup)
            if new:
                merged[spec.name] = TaskSpec(spec.name, spec.kind, old.labels + new)
    return tuple(merged.values())

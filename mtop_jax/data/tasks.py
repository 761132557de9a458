"""Task specs: what each output of the model means.

A task is a name, a kind (``classification`` or ``regression``) and, for
classification, its label names in index order. A regression task also carries
its training targets' mean and standard deviation: its head predicts in those
standardised units (so its squared error weighs like a cross-entropy, whatever
the target's scale), and ``value`` maps a prediction back. The specs are saved
with every model (``save_task_specs``) so that predictions come back as label
names or values in the target's units, and a later evaluation indexes labels
exactly as training did.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mtop_jax.errors import ConfigError, DataError

KINDS = ("classification", "regression")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task. ``labels`` is empty for regression; ``target_mean`` and ``target_std``
    are a regression task's standardisation (0 and 1: none)."""

    name: str
    kind: str = "classification"
    labels: tuple[str, ...] = ()
    target_mean: float = 0.0
    target_std: float = 1.0

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"task name must be a non-empty string, got {self.name!r}")
        if self.kind not in KINDS:
            raise ConfigError(f"task {self.name}: kind must be one of {KINDS}, got {self.kind!r}")
        labels = tuple(self.labels)
        object.__setattr__(self, "labels", labels)
        if self.kind == "regression" and labels:
            raise ConfigError(f"task {self.name}: a regression task has no label names")
        mean, std = float(self.target_mean), float(self.target_std)
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            raise ConfigError(f"task {self.name}: target_mean must be finite and target_std "
                              f"positive, got {self.target_mean!r}, {self.target_std!r}")
        if self.kind == "classification" and (mean, std) != (0.0, 1.0):
            raise ConfigError(f"task {self.name}: only a regression task is standardised")
        object.__setattr__(self, "target_mean", mean)
        object.__setattr__(self, "target_std", std)
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

    def standardized(self, targets: np.ndarray) -> TaskSpec:
        """This regression task, standardised by the finite values of ``targets``
        (the training split's; NaN is missing). A constant target keeps std 1."""
        values = np.asarray(targets, np.float64)
        values = values[np.isfinite(values)]
        if not self.is_regression or len(values) < 2:
            return self
        std = float(values.std())
        return dataclasses.replace(self, target_mean=float(values.mean()),
                                   target_std=std if std > 0 else 1.0)

    def value(self, prediction):
        """A regression head's output (standardised units) in the target's units."""
        return prediction * self.target_std + self.target_mean

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
        d = {"name": self.name, "kind": self.kind, "labels": list(self.labels)}
        if self.is_regression:
            d.update(target_mean=self.target_mean, target_std=self.target_std)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TaskSpec:
        """Older files have no target_mean/target_std: their models predict raw units."""
        unknown = set(d) - {"name", "kind", "labels", "target_mean", "target_std"}
        if unknown or "name" not in d:
            raise ConfigError(f"task spec {dict(d)}: expected keys name, kind, labels "
                              "(and target_mean, target_std for regression)")
        return cls(name=d["name"], kind=d.get("kind", "classification"),
                   labels=tuple(d.get("labels") or ()),
                   target_mean=d.get("target_mean", 0.0), target_std=d.get("target_std", 1.0))


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
                merged[spec.name] = dataclasses.replace(old, labels=old.labels + new)
    return tuple(merged.values())


def output_scales(specs: Sequence[TaskSpec]) -> tuple[np.ndarray, np.ndarray]:
    """(target_mean [N], target_std [N]) float32: prediction = head output * std + mean
    (0 and 1 for classification tasks)."""
    return (np.array([t.target_mean for t in specs], np.float32),
            np.array([t.target_std for t in specs], np.float32))

"""TensorFlow Datasets sources, mapped to ``ExampleSet``s.

- ``glue``: the nine GLUE tasks as a heterogeneous mixture, one source per
  task, each example labelled for its own task only (``glue/<task>``: one);
- ``wikipedia_toxicity_subtypes``: one comment, six binary labels;
- ``civil_comments``: the same six plus ``sexual_explicit``; its labels are
  annotator fractions, binarised at ``threshold`` (0.5, the usual cut);
- ``goemotions``: one Reddit comment, 28 binary emotion tasks;
- ``ag_news_subset``: title and description, one four-way ``topic`` task.

Binary tasks have the labels ``("false", "true")``. GLUE's unlabelled test
splits (label -1) come back with the label missing.

TensorFlow is imported here only, lazily, and kept off the accelerators: it
reads the data once, then everything is numpy.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from mtop_jax.data.examples import ExampleSet
from mtop_jax.data.tasks import TaskSpec
from mtop_jax.errors import ConfigError, DataError

# task -> (text feature, pair feature or None)
GLUE_TASKS: dict[str, tuple[str, str | None]] = {
    "cola": ("sentence", None),
    "sst2": ("sentence", None),
    "mrpc": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"),
    "stsb": ("sentence1", "sentence2"),
    "mnli": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}
TOXICITY_TASKS = ("toxicity", "severe_toxicity", "obscene", "threat", "insult", "identity_attack")
CIVIL_COMMENTS_TASKS = TOXICITY_TASKS + ("sexual_explicit",)
BINARY_LABELS = ("false", "true")
DATASETS = ("glue", "wikipedia_toxicity_subtypes", "civil_comments", "goemotions",
            "ag_news_subset")
_READ_BATCH = 8192


def load_tfds(name: str, split: str, *, data_dir: str | None = None, download: bool = True,
              tasks: Sequence[str] | None = None, threshold: float = 0.5,
              max_examples: int | None = None) -> list[ExampleSet]:
    """The sources of TFDS dataset ``name`` for ``split`` (a TFDS split string).

    ``tasks`` keeps a subset of the dataset's tasks (GLUE: of its nine tasks).
    Every returned set carries the same task list.
    """
    base, _, config = name.partition("/")
    if base not in DATASETS:
        raise ConfigError(f"data.name: TFDS dataset {name!r} is not supported; expected one of "
                          f"{DATASETS} (glue also as glue/<task>)")
    if base == "glue":
        return _glue(config, split, tasks, data_dir, download, max_examples)
    columns, info = _read(name, split, data_dir, download, max_examples)
    features = info.features
    if base in ("wikipedia_toxicity_subtypes", "civil_comments"):
        known = [t for t in (CIVIL_COMMENTS_TASKS if base == "civil_comments" else TOXICITY_TASKS)
                 if t in features]
        chosen = _choose(tasks, known, name)
        labels = np.stack([(columns[t] >= threshold).astype(np.float32) for t in chosen], 1)
        texts = _strings(columns["text"])
        ids = _strings(columns["id"]) if "id" in columns else None
    elif base == "goemotions":
        known = [k for k in features if k != "comment_text" and features[k].dtype == bool]
        chosen = _choose(tasks, known, name)
        labels = np.stack([columns[t].astype(np.float32) for t in chosen], 1)
        texts, ids = _strings(columns["comment_text"]), None
    else:  # ag_news_subset
        chosen = _choose(tasks, ["topic"], name)
        labels = columns["label"].astype(np.float32)[:, None]
        texts = [f"{t}\n{d}" for t, d in zip(_strings(columns["title"]),
                                              _strings(columns["description"]), strict=True)]
        ids = None
    if base == "ag_news_subset":
        specs = (TaskSpec("topic", "classification", tuple(features["label"].names)),)
    else:
        specs = tuple(TaskSpec(t, "classification", BINARY_LABELS) for t in chosen)
    return [ExampleSet(specs, texts, labels, None, ids, name=base)]


def _glue(config: str, split: str, tasks: Sequence[str] | None, data_dir: str | None,
          download: bool, max_examples: int | None) -> list[ExampleSet]:
    if config:
        if tasks is not None and list(tasks) != [config]:
            raise ConfigError(f"glue/{config}: data.tasks {list(tasks)} names other GLUE tasks")
        chosen = _choose([config], list(GLUE_TASKS), "glue")
    else:
        chosen = _choose(tasks, list(GLUE_TASKS), "glue")
    parts = []
    for task in chosen:
        columns, info = _read(f"glue/{task}", _glue_split(task, split), data_dir, download,
                              max_examples)
        label = columns["label"].astype(np.float32)
        label[label < 0] = np.nan  # GLUE test splits hide their labels
        if task == "stsb":
            spec = TaskSpec(task, "regression")
        else:
            spec = TaskSpec(task, "classification", tuple(info.features["label"].names))
        text, pair = GLUE_TASKS[task]
        ids = [f"{task}-{i}" for i in columns["idx"]] if "idx" in columns else None
        parts.append((spec, ExampleSet(
            (spec,), _strings(columns[text]), label[:, None],
            _strings(columns[pair]) if pair else None, ids, name=f"glue/{task}")))
    specs = tuple(spec for spec, _ in parts)
    return [examples.align(specs) for _, examples in parts]


def _glue_split(task: str, split: str) -> str:
    """MNLI has matched and mismatched dev/test sets: plain names mean matched."""
    if task == "mnli":
        return re.sub(r"^(validation|test)(?=$|\[)", r"\1_matched", split)
    return split


def _choose(tasks: Sequence[str] | None, known: list[str], name: str) -> list[str]:
    if tasks is None:
        return known
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown or not tasks:
        raise ConfigError(f"data.tasks: {name} has the tasks {known}; got {tasks}")
    return tasks


def _read(name: str, split: str, data_dir: str | None, download: bool,
          max_examples: int | None) -> tuple[dict[str, np.ndarray], Any]:
    """All features of a split as numpy columns (read in large batches, not per example)."""
    tfds = import_tfds()
    try:
        ds, info = tfds.load(name, split=split, data_dir=data_dir, download=download,
                             with_info=True, shuffle_files=False)
    except Exception as e:  # TFDS raises many kinds (missing split, no network, not prepared)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"tfds {name} split {split!r}: {type(e).__name__}: {first}") from None
    if max_examples:
        ds = ds.take(max_examples)
    chunks: dict[str, list[np.ndarray]] = {}
    for batch in tfds.as_numpy(ds.batch(_READ_BATCH)):
        for key, value in batch.items():
            chunks.setdefault(key, []).append(np.asarray(value))
    if not chunks:
        raise DataError(f"tfds {name} split {split!r}: no examples")
    return {k: np.concatenate(v) for k, v in chunks.items()}, info


def _strings(values: np.ndarray) -> list[str]:
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values]


def import_tfds():
    """``tensorflow_datasets``, with TensorFlow quiet and off every GPU."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ConfigError(f"TFDS sources need the tfds extra: pip install 'mtop-jax[tfds]' "
                          f"({e})") from None
    # RuntimeError: TF's devices are already initialised; too late, and harmless.
    with contextlib.suppress(RuntimeError, ValueError):
        tf.config.set_visible_devices([], "GPU")
    return tfds

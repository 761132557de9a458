"""The one entry point: a data config, a tokenizer and a split give batches.

``build_dataset(config.data, tokenizer, "train")`` reads every source of the
config, maps it to the shared task list, tokenises it (cached), and returns a
``Dataset`` whose ``train_iterator()`` mixes the sources into fixed-shape
batches and whose ``eval_batches()`` covers the split once. Evaluation and
prediction pass ``tasks=`` (the train set's, or the model's saved specs) so
labels are indexed exactly as in training.

Data config keys (``ml_collections.ConfigDict`` or dict):

- ``source``: ``"jsonl"``, ``"csv"`` or ``"tfds"``; or ``sources``, a list of
  per-source dicts with these same keys (unset ones taken from the top level);
- local files: ``path`` (directory with ``{split}.jsonl``/``.csv``, or the
  train file), ``splits`` (split -> file, optional), ``text_field``
  (``"text"``), ``pair_field``, ``id_field``, ``delimiter`` (CSV), ``tasks``
  (``{name: field}``, ``{name: {field, kind, labels}}`` or a list of
  ``{name, field, kind, labels}``: the task order is the list's, a
  ConfigDict mapping's is sorted by name; label sets left out are inferred
  from the train split);
- TFDS: ``name`` (``glue``, ``glue/<task>``, ``wikipedia_toxicity_subtypes``,
  ``civil_comments``, ``goemotions``, ``ag_news_subset``), ``tasks`` (a
  subset of the dataset's task names), ``splits`` (split -> TFDS split
  string, e.g. ``{"validation": "train[95%:]"}``), ``data_dir``,
  ``download``, ``threshold``;
- shared: ``max_length`` (128), ``batch_size`` (32, global), ``eval_batch_size``
  (``batch_size``), ``buckets`` (None: pad to ``max_length``), ``mixing``
  (``proportional``, ``temperature``, ``uniform``, ``dynamic``), ``length_groups``
  (0: off; k: training batches drawn from chunks of k batches sorted by length, so
  they pad to short buckets: ``mixing.group_by_length``), ``repeat_threshold``
  (0: off; t: an epoch repeats the texts of tasks labelled on fewer than a fraction t
  of a source's texts, sqrt(t / f) times: ``mixing.repeat_factors``),
  ``temperature`` (2.0), ``seed`` (0), ``cache`` (True), ``cache_dir``
  (``""``: ``$MTOP_JAX_CACHE/tokens`` or ``~/.cache/mtop_jax/tokens``),
  ``max_examples`` (None: all; else the first n of every source, for smoke runs),
  ``unknown_labels`` (``"error"``: a label of a validation or test file that the
  task's label set lacks stops the run, naming file and line; ``"ignore"``: it
  counts as missing, and the count is logged).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mtop_jax.data import batching
from mtop_jax.data.examples import ExampleSet
from mtop_jax.data.local_files import load_local, split_file
from mtop_jax.data.mixing import (
    SourceSampler,
    check_length_groups,
    check_repeat_threshold,
    repeat_factors,
)
from mtop_jax.data.tasks import TaskSpec, merge_task_specs
from mtop_jax.data.tokenization import Encoded, default_cache_dir, tokenize
from mtop_jax.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "source": "jsonl", "max_length": 128, "batch_size": 32, "eval_batch_size": None,
    "buckets": None, "length_groups": 0, "repeat_threshold": 0.0, "mixing": "proportional",
    "temperature": 2.0,
    "seed": 0, "cache": True, "cache_dir": "", "max_examples": None, "unknown_labels": "error",
}
UNKNOWN_LABELS = ("error", "ignore")
SOURCES = ("jsonl", "csv", "tfds")
_SHARED = ("max_length", "batch_size", "eval_batch_size", "buckets", "length_groups",
           "repeat_threshold", "mixing",
           "temperature", "seed", "cache", "cache_dir", "unknown_labels")


def load_examples(config: Any, split: str, tasks: Sequence[TaskSpec] | None = None
                  ) -> tuple[tuple[TaskSpec, ...], list[ExampleSet]]:
    """Every source's ``split``, labelled against one task list (``tasks`` or the union)."""
    cfg = _config(config)
    sets: list[ExampleSet] = []
    for source in source_configs(cfg):
        kind = source.get("source")
        if kind in ("jsonl", "csv"):
            found = [load_local(source, split, tasks)]
        elif kind == "tfds":
            from mtop_jax.data.tfds_sources import load_tfds

            if not source.get("name"):
                raise ConfigError("data.name: a TFDS source needs a dataset name, e.g. 'glue'")
            found = load_tfds(
                source["name"], dict(source.get("splits") or {}).get(split, split),
                data_dir=source.get("data_dir"), download=source.get("download", True),
                tasks=source.get("tasks"), threshold=source.get("threshold", 0.5),
                max_examples=source.get("max_examples"))
        else:
            raise ConfigError(f"data.source: expected one of {SOURCES}, got {kind!r}")
        sets.extend(s.take(source.get("max_examples")) for s in found)
    if tasks is None:  # the training split: its label sets, and its regression targets'
        specs = merge_task_specs(s.tasks for s in sets)  # mean and sd (tasks.TaskSpec)
        targets = np.concatenate([s.align(specs).labels for s in sets]) if sets else None
        specs = tuple(t.standardized(targets[:, j]) if t.is_regression else t
                      for j, t in enumerate(specs))
    else:
        specs = tuple(tasks)
        names = {t.name for t in specs}
        for s in sets:
            extra = [t for t in s.task_names if t not in names]
            if extra:
                raise ConfigError(f"{s.name}: tasks {extra} are not among the given tasks "
                                  f"{sorted(names)}")
    return specs, [s.align(specs) for s in sets]


def source_configs(config: Any) -> list[dict[str, Any]]:
    """The per-source configs: ``sources`` entries over the top-level keys, or the top level."""
    cfg = _config(config)
    sources = cfg.get("sources")
    if not sources:
        return [cfg]
    top = {k: v for k, v in cfg.items() if k != "sources"}
    if not isinstance(sources, (list, tuple)):
        raise ConfigError(f"data.sources: expected a list of source configs, got {sources!r}")
    out = []
    for i, s in enumerate(sources):
        s = _plain(s)
        if not isinstance(s, Mapping):
            raise ConfigError(f"data.sources[{i}]: expected a mapping, got {s!r}")
        shared = [k for k in _SHARED if k in s]
        if shared:
            raise ConfigError(f"data.sources[{i}]: {shared} apply to the whole mixture; set them "
                              "at the top level of data")
        out.append({**top, **s})
    return out


def build_dataset(config: Any, tokenizer: Any, split: str, *,
                  tasks: Sequence[TaskSpec] | None = None) -> Dataset:
    """A split, read, tokenised (cached) and ready to batch."""
    cfg = _config(config)
    specs, sets = load_examples(cfg, split, tasks)
    cache_dir = (Path(cfg["cache_dir"]).expanduser() if cfg["cache_dir"] else default_cache_dir()
                 ) if cfg["cache"] else None
    max_length = cfg["max_length"]
    encoded = [tokenize(s.texts, tokenizer, max_length, pairs=s.pairs, cache_dir=cache_dir,
                        name=f"{s.name} {split}") for s in sets]
    dataset = Dataset(
        split=split, tasks=specs, examples=ExampleSet.concatenate(sets, name=split),
        encoded=Encoded.concatenate(encoded), source_names=tuple(s.name for s in sets),
        source_sizes=tuple(len(s) for s in sets),
        source_tasks=tuple(tuple(t for t, c in s.label_counts().items() if c) for s in sets),
        batch_size=cfg["batch_size"], eval_batch_size=cfg["eval_batch_size"] or cfg["batch_size"],
        buckets=batching.resolve_buckets(max_length, cfg["buckets"]),
        length_groups=cfg["length_groups"], repeat_threshold=float(cfg["repeat_threshold"]),
        mixing=cfg["mixing"],
        temperature=float(cfg["temperature"]), seed=cfg["seed"])
    log.info("%s", dataset.summary())
    return dataset


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A tokenised split of one or more sources, in source order."""

    split: str
    tasks: tuple[TaskSpec, ...]
    examples: ExampleSet
    encoded: Encoded
    source_names: tuple[str, ...]
    source_sizes: tuple[int, ...]
    source_tasks: tuple[tuple[str, ...], ...]
    batch_size: int = 32
    eval_batch_size: int = 32
    buckets: tuple[int, ...] = (128,)
    length_groups: int = 0
    repeat_threshold: float = 0.0
    mixing: str = "proportional"
    temperature: float = 2.0
    seed: int = 0

    def __len__(self) -> int:
        return len(self.examples)

    def __repr__(self) -> str:
        return f"Dataset({self.summary()})"

    @property
    def regression(self) -> np.ndarray:
        """bool [T]: which tasks are regression."""
        return np.array([t.is_regression for t in self.tasks], bool)

    def train_iterator(self, *, seed: int | None = None, process_index: int | None = None,
                       process_count: int | None = None) -> TrainIterator:
        """Endless mixed batches; this process's slice of every global batch."""
        process_index, process_count = _processes(process_index, process_count)
        sampler = SourceSampler(self.source_sizes, self.batch_size, strategy=self.mixing,
                                temperature=self.temperature,
                                seed=self.seed if seed is None else seed,
                                source_tasks=self.source_tasks,
                                lengths=self._source_lengths(), length_groups=self.length_groups,
                                repeat_factors=self._source_repeat_factors())
        return TrainIterator(self, sampler, process_index, process_count)

    def _per_source(self, rows: np.ndarray) -> list[np.ndarray]:
        return np.split(rows, np.cumsum(self.source_sizes)[:-1])

    def _source_lengths(self) -> list[np.ndarray]:
        return self._per_source(self.encoded.lengths)

    def _source_repeat_factors(self) -> list[np.ndarray] | None:
        if not self.repeat_threshold:
            return None
        labelled = ~np.isnan(self.examples.labels)
        return [repeat_factors(x, self.repeat_threshold) for x in self._per_source(labelled)]

    def eval_batches(self, *, process_index: int | None = None,
                     process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """The split once (shortest texts first when there are buckets); padding rows of the
        last batch have weight 0."""
        process_index, process_count = _processes(process_index, process_count)
        return batching.eval_batches(self.encoded, self.examples.labels, self.regression,
                                     self.eval_batch_size, self.buckets,
                                     process_index=process_index, process_count=process_count)

    @property
    def num_eval_batches(self) -> int:
        return batching.num_batches(len(self), self.eval_batch_size)

    def stats(self) -> dict[str, Any]:
        n = len(self)
        return {
            "split": self.split, "examples": n,
            "sources": dict(zip(self.source_names, self.source_sizes, strict=True)),
            "labelled": self.examples.label_counts(),
            "truncated": self.encoded.num_truncated,
            "truncated_fraction": self.encoded.num_truncated / max(n, 1),
            "max_length": self.encoded.max_length,
            "from_cache": self.encoded.from_cache,
            "tokenize_seconds": self.encoded.seconds,
        }

    def summary(self) -> str:
        s = self.stats()
        labelled = ", ".join(f"{k} {v}" for k, v in s["labelled"].items())
        return (f"{self.split}: {s['examples']} examples from {len(self.source_names)} source(s); "
                f"labelled: {labelled}; {s['truncated']} ({100 * s['truncated_fraction']:.1f}%) "
                f"truncated to {s['max_length']} tokens"
                f"{' (token cache)' if s['from_cache'] else ''}")


class TrainIterator:
    """Batches for training: ``next()``, ``state_dict()``/``load_state_dict()``, and
    ``update_losses()`` at evaluations (drives ``dynamic`` mixing)."""

    def __init__(self, dataset: Dataset, sampler: SourceSampler, process_index: int,
                 process_count: int):
        self.dataset = dataset
        self.sampler = sampler
        self._part = batching.process_slice(sampler.batch_size, process_index, process_count)
        self._regression = dataset.regression

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        d = self.dataset
        rows = self.sampler.next_rows()
        length = batching.global_length(d.encoded, rows, d.buckets)
        return batching.make_batch(d.encoded, d.examples.labels, self._regression,
                                   rows[self._part], length)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sampler.load_state_dict(state)

    def update_losses(self, losses: Mapping[str, float]) -> None:
        """Per-task eval losses; the ``dynamic`` mixing re-weights the sources from them."""
        self.sampler.update_losses(losses)

    def probabilities(self) -> dict[str, float]:
        """Current sampling probability of each source."""
        return dict(zip(self.dataset.source_names,
                        map(float, self.sampler.probabilities()), strict=True))


def _processes(index: int | None, count: int | None) -> tuple[int, int]:
    if index is None or count is None:
        import jax

        index = jax.process_index() if index is None else index
        count = jax.process_count() if count is None else count
    return int(index), int(count)


def _config(config: Any) -> dict[str, Any]:
    cfg = _plain(config)
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"data config: expected a mapping, got {type(cfg).__name__}")
    cfg = {**DEFAULTS, **cfg}
    check_length_groups(cfg["length_groups"])  # before any file is read
    check_repeat_threshold(cfg["repeat_threshold"])
    if cfg["unknown_labels"] not in UNKNOWN_LABELS:
        raise ConfigError(f"data.unknown_labels: expected one of {UNKNOWN_LABELS}, "
                          f"got {cfg['unknown_labels']!r}")
    return cfg


def require_every_task(dataset: Dataset, config: Any) -> None:
    """A ``DataError`` naming the split's files if a task has no labelled example in it:
    its metrics would be missing from every evaluation, found only at the end."""
    counts = dataset.examples.label_counts()
    absent = [t.name for t in dataset.tasks if not counts.get(t.name)]
    if absent:
        files = []
        for source in source_configs(config):
            if source.get("source", "jsonl") in ("jsonl", "csv"):
                files.append(str(split_file(source, dataset.split)))
        where = ", ".join(files) or ", ".join(dataset.source_names)
        raise DataError(f"{where}: split '{dataset.split}' has no labelled example of "
                        f"task{'s' if len(absent) > 1 else ''} {', '.join(absent)}; every "
                        "task needs some, or its metrics are missing from every evaluation")


def _plain(x: Any) -> Any:
    return x.to_dict() if hasattr(x, "to_dict") else x

"""Local JSONL and CSV files: one text field, optional pair field, one field per task.

Task fields may be dotted paths into nested JSON objects (``labels.section``
reads ``{"labels": {"section": ...}}``; an exact key with a dot wins). A label
that is ``null``, absent from a record or the empty string is missing: sparse
labels are normal. A field that no record has is a typo and an error, as is
anything else that cannot be read; every error names the file and, where there
is one, the line.

Label sets not given in the config are inferred from the ``train`` split
(sorted; numerically when every label is an integer), so all splits index
labels the same way.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mtop_jax.data.examples import ExampleSet
from mtop_jax.data.tasks import KINDS, TaskSpec
from mtop_jax.errors import ConfigError, DataError

log = logging.getLogger(__name__)

FORMATS = ("jsonl", "csv")
_SUFFIXES = {"jsonl": (".jsonl", ".ndjson", ".json"), "csv": (".csv", ".tsv")}
_ABSENT = object()
_INT = re.compile(r"-?\d+")
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class TaskColumn:
    """Where a task's labels live in a file; ``labels=None``: infer from train."""

    name: str
    field: str
    kind: str = "classification"
    labels: tuple[str, ...] | None = None


def task_columns(tasks: Any) -> tuple[TaskColumn, ...]:
    """Parses ``data.tasks``: ``{name: field}``, ``{name: {field, kind, labels}}``,
    a sequence of ``{name, field, kind, labels}`` mappings, or of field names."""
    if tasks is None:
        raise ConfigError("data.tasks: local files need the task fields, e.g. "
                          "{'section': 'labels.section'}")
    tasks = _plain(tasks)
    if isinstance(tasks, Mapping):
        items = [(name, spec) for name, spec in tasks.items()]
    elif isinstance(tasks, (list, tuple)):
        items = []
        for spec in tasks:
            spec = _plain(spec)
            if isinstance(spec, str):
                items.append((spec, spec))
            elif isinstance(spec, Mapping) and "name" in spec:
                items.append((spec["name"], {k: v for k, v in spec.items() if k != "name"}))
            else:
                raise ConfigError(f"data.tasks: entry {spec!r} is neither a field name nor a "
                                  "mapping with a 'name'")
    else:
        raise ConfigError(f"data.tasks: expected a mapping or a list, got {type(tasks).__name__}")
    columns = []
    for name, spec in items:
        if isinstance(spec, str):
            spec = {"field": spec}
        if not isinstance(spec, Mapping):
            raise ConfigError(f"data.tasks.{name}: expected a field name or a mapping with "
                              f"field, kind, labels; got {spec!r}")
        unknown = set(spec) - {"field", "kind", "labels"}
        if unknown:
            raise ConfigError(f"data.tasks.{name}: unknown keys {sorted(unknown)} "
                              "(expected field, kind, labels)")
        kind = spec.get("kind", "classification")
        if kind not in KINDS:
            raise ConfigError(f"data.tasks.{name}.kind: expected one of {KINDS}, got {kind!r}")
        labels = spec.get("labels")
        if labels is not None:
            labels = tuple(str(x) for x in labels)
            TaskSpec(str(name), kind, labels)  # validates
        field = spec.get("field", name)
        if not isinstance(field, str) or not field:
            raise ConfigError(f"data.tasks.{name}.field: expected a field name, got {field!r}")
        columns.append(TaskColumn(str(name), field, kind, labels))
    if len({c.name for c in columns}) != len(columns):
        raise ConfigError(f"data.tasks: repeated task names in {[c.name for c in columns]}")
    return tuple(columns)


@dataclasses.dataclass
class RawRecords:
    """A file's fields as read, before labels are indexed."""

    path: Path
    columns: tuple[TaskColumn, ...]
    texts: list[str]
    pairs: list[str] | None
    ids: list[str] | None
    values: list[list[Any]]  # per column: label name (str), target (float) or None
    lines: list[int]  # line of each record, for messages


def read_records(path: str | Path, columns: Sequence[TaskColumn], *, text_field: str = "text",
                 pair_field: str | None = None, id_field: str | None = None,
                 fmt: str | None = None, delimiter: str | None = None) -> RawRecords:
    """Reads a JSONL or CSV file (format from ``fmt`` or the suffix)."""
    path = Path(path)
    fmt = fmt or _format_of(path)
    if fmt not in FORMATS:
        raise ConfigError(f"{path}: unknown format {fmt!r}, expected one of {FORMATS}")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    raw = RawRecords(path, tuple(columns), [], [] if pair_field else None,
                     [] if id_field else None, [[] for _ in columns], [])
    fields = [text_field, pair_field, id_field]
    reader = _jsonl_records if fmt == "jsonl" else _csv_records
    seen = [False] * len(columns)
    for line, get in reader(path, fields + [c.field for c in columns], delimiter):
        raw.lines.append(line)
        raw.texts.append(_text(get(0), text_field, path, line, get))
        if pair_field:
            raw.pairs.append(_text(get(1), pair_field, path, line, get))
        if id_field:
            value = get(2)
            if value is _ABSENT or value is None or isinstance(value, (dict, list)):
                raise DataError(f"{path}:{line}: id field '{id_field}' is missing or not a "
                                f"scalar; the fields are {get(None)}")
            raw.ids.append(str(value))
        for j, col in enumerate(columns):
            value = get(3 + j)
            if value is not _ABSENT:
                seen[j] = True
            raw.values[j].append(_label_value(value, col, path, line))
    if not raw.texts:
        raise DataError(f"{path}: no examples in the file")
    for j, col in enumerate(columns):
        if not seen[j]:
            raise DataError(f"{path}: field '{col.field}' of task {col.name} is in no record; "
                            f"the fields are {_all_fields(path, fmt, delimiter)}")
    return raw


def infer_task_specs(raw: RawRecords) -> tuple[TaskSpec, ...]:
    """Task specs with label sets from the config, or else from ``raw`` (the train split)."""
    specs = []
    for col, values in zip(raw.columns, raw.values, strict=True):
        if col.kind == "regression":
            specs.append(TaskSpec(col.name, "regression"))
        elif col.labels is not None:
            specs.append(TaskSpec(col.name, "classification", col.labels))
        else:
            names = {v for v in values if v is not None}
            if not names:
                raise DataError(f"{raw.path}: task {col.name} (field '{col.field}') has no labels "
                                "to infer its label set from; give data.tasks."
                                f"{col.name}.labels")
            specs.append(TaskSpec(col.name, "classification", _sorted_labels(names)))
    return tuple(specs)


def to_examples(raw: RawRecords, specs: Sequence[TaskSpec], name: str = "",
                unknown_labels: str = "error") -> ExampleSet:
    """Indexes ``raw``'s labels against ``specs`` (one per column, same order). A label
    not in its task's set raises (``unknown_labels="error"``) or counts as missing
    (``"ignore"``: logged with the count per task)."""
    labels = np.full((len(raw.texts), len(specs)), np.nan, np.float32)
    ignored: dict[str, int] = {}
    for j, (spec, col, values) in enumerate(zip(specs, raw.columns, raw.values, strict=True)):
        if spec.kind != col.kind:
            raise DataError(f"{raw.path}: task {spec.name} is {col.kind} in the data config "
                            f"but {spec.kind} in the task specs")
        for i, value in enumerate(values):
            if value is None:
                continue
            if spec.is_regression:
                labels[i, j] = value
                continue
            try:
                labels[i, j] = spec.index(value)
            except DataError as e:
                if unknown_labels != "ignore":
                    raise DataError(f"{raw.path}:{raw.lines[i]}: {e} (data.unknown_labels="
                                    "'ignore' counts it as missing)") from None
                ignored[spec.name] = ignored.get(spec.name, 0) + 1
    if ignored:
        log.warning("%s: labels outside the task's label set, counted as missing "
                    "(data.unknown_labels='ignore'): %s", raw.path,
                    ", ".join(f"{task} {n}" for task, n in ignored.items()))
    return ExampleSet(tuple(specs), raw.texts, labels, raw.pairs, raw.ids, name or raw.path.stem)


def read_examples(path: str | Path, tasks: Any, *, text_field: str = "text",
                  pair_field: str | None = None, id_field: str | None = None,
                  specs: Sequence[TaskSpec] | None = None, fmt: str | None = None,
                  delimiter: str | None = None) -> ExampleSet:
    """One file as an ``ExampleSet``; label sets from ``specs``, the config, or this file."""
    columns = task_columns(tasks)
    raw = read_records(path, columns, text_field=text_field, pair_field=pair_field,
                       id_field=id_field, fmt=fmt, delimiter=delimiter)
    specs = infer_task_specs(raw) if specs is None else _specs_for(columns, specs)
    return to_examples(raw, specs)


def load_local(cfg: Mapping[str, Any], split: str,
               specs: Sequence[TaskSpec] | None = None) -> ExampleSet:
    """A split of a local-file source config (keys as in ``mtop_jax.data.pipeline``)."""
    cfg = _plain(cfg)
    fmt = cfg.get("source", "jsonl")
    columns = task_columns(cfg.get("tasks"))
    kw = dict(text_field=cfg.get("text_field") or "text", pair_field=cfg.get("pair_field"),
              id_field=cfg.get("id_field"), fmt=fmt, delimiter=cfg.get("delimiter"))
    raw = read_records(split_file(cfg, split), columns, **kw)
    if specs is not None:
        task_specs = _specs_for(columns, specs)
    elif split == "train" or all(c.labels is not None or c.kind == "regression"
                                 for c in columns):
        task_specs = infer_task_specs(raw)
    else:
        task_specs = infer_task_specs(read_records(split_file(cfg, "train"), columns, **kw))
    return to_examples(raw, task_specs, name=str(cfg.get("name") or Path(cfg["path"]).name),
                       unknown_labels=cfg.get("unknown_labels") or "error")


def split_file(cfg: Mapping[str, Any], split: str) -> Path:
    """The file of ``split``: ``data.splits[split]`` (relative to ``data.path``), or
    ``{split}.jsonl`` / ``{split}.csv`` in the directory ``data.path``."""
    if not cfg.get("path"):
        raise ConfigError("data.path: local files need a directory or a file")
    base = Path(cfg["path"]).expanduser()
    fmt = cfg.get("source", "jsonl")
    splits = _plain(cfg.get("splits") or {})
    if split in splits:
        path = Path(splits[split]).expanduser()
        return path if path.is_absolute() or not base.is_dir() else base / path
    if base.is_file():
        if split == "train":
            return base
        raise ConfigError(f"data.path {base} is one file, used as the train split; "
                          f"name a file for '{split}' in data.splits")
    if not base.is_dir():
        raise DataError(f"data.path {base}: no such directory or file")
    for suffix in _SUFFIXES.get(fmt, ()):
        if (base / f"{split}{suffix}").is_file():
            return base / f"{split}{suffix}"
    raise DataError(f"{base}: no file for split '{split}' (looked for "
                    f"{[split + s for s in _SUFFIXES.get(fmt, ())]}); the directory has "
                    f"{sorted(p.name for p in base.iterdir())[:20]}")


# --------------------------------------------------------------------------- reading


def _jsonl_records(path: Path, fields: list[str | None], delimiter: str | None):
    """(line, get) per record; ``get(k)`` is field k's value or ``_ABSENT``,
    ``get(None)`` the record's field names."""
    del delimiter
    parts = [None if f is None else (f, f.split(".")) for f in fields]
    with open(path, "rb") as f:
        for line, data in enumerate(f, 1):
            if not data.strip():
                continue
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}:{line}: not UTF-8 ({e.reason} at byte {e.start})") from None
            if line == 1:
                text = text.removeprefix("\ufeff")
            try:
                record = json.loads(text)
            except (ValueError, RecursionError) as e:
                raise DataError(f"{path}:{line}: malformed JSON ({_first_line(e)})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line}: expected a JSON object, "
                                f"got {type(record).__name__}")

            def get(k, record=record):
                if k is None:
                    return _fields_of(record)
                return _ABSENT if parts[k] is None else _lookup(record, *parts[k])

            yield line, get


def _csv_records(path: Path, fields: list[str | None], delimiter: str | None):
    delimiter = delimiter or ("\t" if path.suffix == ".tsv" else ",")
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    line = 1
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=delimiter, strict=True)
            header = next(reader, None)
            if not header:
                raise DataError(f"{path}: empty file, expected a header row naming the columns")
            if len(set(header)) != len(header):
                raise DataError(f"{path}:1: repeated column names in the header {header}")
            where = {name: i for i, name in enumerate(header)}
            for f_name in fields:
                if f_name is not None and f_name not in where:
                    raise DataError(f"{path}: no column '{f_name}'; the columns are {header}")
            index = [None if f_name is None else where[f_name] for f_name in fields]
            end = reader.line_num
            for row in reader:
                line, end = end + 1, reader.line_num
                if not row:
                    continue
                if len(row) != len(header):
                    raise DataError(f"{path}:{line}: malformed row: {len(row)} fields, the "
                                    f"header has {len(header)}")

                def get(k, row=row):
                    if k is None:
                        return header
                    return _ABSENT if index[k] is None else row[index[k]]

                yield line, get
    except csv.Error as e:
        raise DataError(f"{path}:{line}: malformed CSV ({e})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 near line {line} ({e.reason})") from None


def _lookup(record: dict, field: str, parts: list[str]) -> Any:
    if field in record:
        return record[field]
    value: Any = record
    for p in parts:
        if not isinstance(value, dict) or p not in value:
            return _ABSENT
        value = value[p]
    return value


def _fields_of(record: dict, prefix: str = "", depth: int = 0) -> list[str]:
    out = []
    for k, v in record.items():
        out.append(prefix + str(k))
        if isinstance(v, dict) and depth < 2:
            out.extend(_fields_of(v, f"{prefix}{k}.", depth + 1))
    return out


def _all_fields(path: Path, fmt: str, delimiter: str | None) -> list[str]:
    if fmt == "csv":
        return []  # unreachable: a CSV header names every column up front
    names: dict[str, None] = {}
    for _, get in _jsonl_records(path, [], delimiter):
        names.update(dict.fromkeys(get(None)))
        if len(names) > 200:
            break
    return list(names)


def _text(value: Any, field: str, path: Path, line: int, get) -> str:
    if value is _ABSENT:
        raise DataError(f"{path}:{line}: no field '{field}'; the fields are {get(None)}")
    if not isinstance(value, str):
        raise DataError(f"{path}:{line}: field '{field}' must be a string, "
                        f"got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{path}:{line}: field '{field}' is not valid Unicode "
                        f"(lone surrogate at character {e.start})") from None
    return value


def _label_value(value: Any, col: TaskColumn, path: Path, line: int) -> Any:
    """A classification label name, a regression target, or None (missing)."""
    if value is _ABSENT or value is None or value == "":
        return None
    where = f"{path}:{line}: task {col.name} (field '{col.field}')"
    if col.kind == "regression":
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise DataError(f"{where}: a regression target must be a number, got {value!r}")
        try:
            target = float(value)
        except (ValueError, OverflowError):
            raise DataError(f"{where}: a regression target must be a number, "
                            f"got {value!r}") from None
        if not math.isfinite(target) or abs(target) > _FLOAT32_MAX:
            raise DataError(f"{where}: a regression target must be a finite float32, "
                            f"got {value!r}")
        return target
    if isinstance(value, str):
        label = value
    elif isinstance(value, bool):
        label = "true" if value else "false"
    elif isinstance(value, int):
        label = str(value)
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        label = str(int(value))
    else:
        raise DataError(f"{where}: a label must be a string, an integer, a boolean or null, "
                        f"got {value!r}")
    try:
        label.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{where}: label {label!r} is not valid Unicode") from None
    if col.labels is not None and label not in col.labels:
        raise DataError(f"{where}: label {label!r} is not one of the allowed labels "
                        f"{list(col.labels)}")
    return label


def _sorted_labels(names: set[str]) -> tuple[str, ...]:
    if all(_INT.fullmatch(n) for n in names):
        return tuple(sorted(names, key=int))
    return tuple(sorted(names))


def _specs_for(columns: Sequence[TaskColumn], specs: Sequence[TaskSpec]) -> tuple[TaskSpec, ...]:
    by_name = {s.name: s for s in specs}
    missing = [c.name for c in columns if c.name not in by_name]
    if missing:
        raise ConfigError(f"tasks {missing} of the data config are not in the task specs "
                          f"{list(by_name)}")
    return tuple(by_name[c.name] for c in columns)


def _format_of(path: Path) -> str:
    for fmt, suffixes in _SUFFIXES.items():
        if path.suffix.lower() in suffixes:
            return fmt
    raise ConfigError(f"{path}: cannot tell the format from the suffix; set data.source to "
                      f"one of {FORMATS}")


def _first_line(e: Exception) -> str:
    text = str(e)
    return text.splitlines()[0] if text else type(e).__name__


def _plain(x: Any) -> Any:
    """ConfigDicts (and FrozenConfigDicts) as plain dicts."""
    return x.to_dict() if hasattr(x, "to_dict") else x


"""Serving a trained model: load it anywhere, predict every task in one pass, embed.

``mtop_jax.load(path)`` takes a training workdir (its latest checkpoint) or an
exported model directory (``mtop-jax export``) and returns a :class:`Predictor`
whose parameters are restored with orbax onto the caller's devices, whatever
mesh trained them. Texts are tokenised with the model's own tokenizer and
padded to a few length and batch buckets, so new batch sizes do not recompile
each time; one jitted forward pass answers all tasks. On several devices
(``load(path, devices=[...])``) the parameters are replicated and each batch is
split over the devices by rows (data parallel): the batch buckets are multiples of
the device count, and each device computes its share of the rows.

Input contract (the same for ``predict``, ``logits``, ``embed``, ``batches``
and ``tokenize``): ``texts`` is a sequence of ``str`` (any other iterable is read
into a list first; a bare ``str`` or ``bytes`` is refused rather than split into
characters, and so are a mapping and a set). Every valid Unicode string is
answered: empty, whitespace only, control characters (NUL included), any
script, emoji, combining marks; text beyond the serving max length (in tokens)
is truncated. An item that is not a ``str``, or that is not valid Unicode (a
lone surrogate such as ``"\\ud800"``, which ``errors="surrogateescape"``
decoding produces), raises :class:`DataError` naming its index in ``texts``; it
is never silently altered (the training data readers refuse it too; decode with
``errors="replace"`` to get U+FFFD instead).
All texts are checked before any is computed. Memory is bounded by one batch:
texts are tokenised and run ``batch_size`` at a time (tokenising reads each
whole text, so its time grows with the text's length); only the outputs
(``n x tasks x classes`` logits) grow with the number of texts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence, Set
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from mtop_jax.errors import ConfigError, DataError, MtopError
from mtop_jax.models.spec import ModelSpec, abstract_model, placeholder_rest, read_model_spec
from mtop_jax.parallel.sharding import placed

EXPORT_PARAMS = "params"
LENGTH_BUCKETS = (16, 32, 64, 128, 256, 512)


def restore_params(path: Path, spec: ModelSpec, sharding: jax.sharding.Sharding,
                   step: int | None = None) -> tuple[nnx.State, int | None]:
    """Parameters of an exported model or of a workdir checkpoint (latest by default)."""
    _, abstract, _ = nnx.split(abstract_model(spec, eval_mode=True), nnx.Param, ...)
    target = placed(abstract, sharding)
    if (path / EXPORT_PARAMS).is_dir():
        with ocp.StandardCheckpointer() as ckpt:
            return ckpt.restore((path / EXPORT_PARAMS).absolute(), target), None
    from mtop_jax.training.checkpoints import Checkpoints

    checkpoints = Checkpoints(path, read_only=True)
    try:
        if step is not None:
            return checkpoints.restore_params(step, target), step
        # The newest good step: an unreadable or corrupted newer one is skipped, warned.
        restored = checkpoints.restore_latest(lambda at: checkpoints.restore_params(at, target))
    finally:
        checkpoints.close()
    if restored is None:
        raise MtopError(f"{path}: a workdir without any checkpoint")
    step, params = restored
    return params, step


def read_texts(path: str | Path, text_field: str = "text") -> list[str]:
    """Texts of a JSONL/CSV file (``text_field`` of each record) or of a .txt file (a line each).

    A .txt line ends at ``\\n`` (``\\r\\n`` too); other Unicode line breaks (U+2028,
    U+0085, form feed) stay inside the text, and a blank line is an empty text. Errors
    name the file and line (bytes that are not UTF-8 included); an empty file gives no
    texts.
    """
    path = Path(path)
    if path.suffix == ".txt":
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        texts = []
        with open(path, "rb") as f:
            for line, data in enumerate(f, 1):
                data = data.removesuffix(b"\n").removesuffix(b"\r")
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(
                        f"{path}:{line}: not UTF-8 ({e.reason} at byte {e.start})") from None
                texts.append(text.removeprefix("\ufeff") if line == 1 else text)
        return texts
    from mtop_jax.data.local_files import read_records

    if path.is_file() and path.stat().st_size == 0:
        return []
    return list(read_records(path, (), text_field=text_field).texts)


def check_texts(texts: Any) -> Sequence[str]:
    """``texts`` as a sequence of valid Unicode strings, else a DataError naming the index."""
    if isinstance(texts, (str, bytes, bytearray)):
        raise DataError(f"texts: expected a list of strings, got a single "
                        f"{type(texts).__name__} (wrap it in a list)")
    if isinstance(texts, (Mapping, Set)):  # keys, or no order to answer in
        raise DataError(f"texts: expected a list of strings, got {type(texts).__name__}")
    if not isinstance(texts, Sequence):
        try:
            texts = list(texts)
        except TypeError:
            raise DataError(f"texts: expected a list of strings, got "
                            f"{type(texts).__name__}") from None
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise DataError(f"text {i}: expected a string, got {type(t).__name__}")
        if not t.isascii():
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as e:
                raise DataError(f"text {i}: not valid Unicode (lone surrogate {t[e.start]!r} "
                                f"at character {e.start})") from None
    return texts


def serving_length(path: Path, spec: ModelSpec) -> int:
    """The max length the model was trained with (workdir config or export), else the encoder's."""
    for name, key in (("model.json", ("serving", "max_length")),
                      ("config.json", ("data", "max_length"))):
        f = path / name
        if f.is_file():
            node: Any = json.loads(f.read_text())
            for k in key:
                node = node.get(k) if isinstance(node, dict) else None
            if isinstance(node, int):
                return node
    return min(spec.encoder.max_length, 512)


def load(path: str | Path, *, devices: Sequence[jax.Device] | None = None,
         step: int | None = None, batch_size: int = 32,
         batch_buckets: Sequence[int] | None = None) -> Predictor:
    """A :class:`Predictor` from a training workdir or an exported model directory."""
    from mtop_jax.models.pretrained import load_tokenizer

    path = Path(path)
    if not path.is_dir():
        raise MtopError(f"{path}: no such directory (expected a workdir or an exported model)")
    spec = read_model_spec(path)
    if not (path / EXPORT_PARAMS).is_dir() and not (path / "checkpoints").is_dir():
        raise MtopError(f"{path}: has model.json but neither params/ nor checkpoints/")
    devices = list(devices or jax.devices()[:1])
    if len(devices) == 1:
        sharding = jax.sharding.SingleDeviceSharding(devices[0])
    else:
        mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params, step = restore_params(path, spec, sharding, step)
    tokenizer = load_tokenizer(path / "tokenizer")
    return Predictor(spec, params, tokenizer, max_length=serving_length(path, spec),
                     batch_size=batch_size, sharding=sharding, step=step,
                     batch_buckets=batch_buckets)


class Predictor:
    """Every task's prediction for a list of texts, from one forward pass per batch.

    See the module docstring for what ``texts`` may hold and which errors it raises.
    """

    def __init__(self, spec: ModelSpec, params: nnx.State, tokenizer: Any, *, max_length: int,
                 batch_size: int = 32, sharding: jax.sharding.Sharding | None = None,
                 step: int | None = None, batch_buckets: Sequence[int] | None = None):
        """``batch_buckets``: the row counts a batch is padded to (default 1, 8 and
        ``batch_size``; ``batch_size`` is always one), each rounded up to a multiple of the
        device count. More buckets waste fewer padding rows and compile more programs."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
                or batch_size < 1:
            raise ConfigError(f"batch_size: must be a positive integer, got {batch_size!r}")
        self.spec, self.params, self.tokenizer = spec, params, tokenizer
        self.max_length, self.batch_size, self.step = int(max_length), int(batch_size), step
        self.graphdef, _, abstract_rest = nnx.split(abstract_model(spec, eval_mode=True),
                                                     nnx.Param, ...)
        self.rest = placeholder_rest(abstract_rest)
        self.devices = tuple(sharding.device_set) if sharding is not None else tuple(
            jax.devices()[:1])
        if sharding is not None:
            self.rest = jax.device_put(self.rest, sharding)
        # Data parallel over a mesh: the rows of each batch split over every mesh axis.
        self.input_sharding: jax.sharding.Sharding | None = None
        if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh.size > 1:
            mesh = sharding.mesh
            self.input_sharding = jax.sharding.NamedSharding(
                mesh, jax.sharding.PartitionSpec(tuple(mesh.axis_names)))
        self.length_buckets = tuple(sorted(
            {b for b in LENGTH_BUCKETS if b < self.max_length} | {self.max_length}))
        wanted = tuple(b for b in (1, 8) if b <= self.batch_size) if batch_buckets is None \
            else tuple(batch_buckets)
        if not all(isinstance(b, (int, np.integer)) and 1 <= b <= self.batch_size
                   for b in wanted):
            raise ConfigError(f"batch_buckets: positive integers up to batch_size "
                              f"{self.batch_size}, got {list(wanted)}")
        self.batch_buckets = tuple(sorted({self._rows(int(b))
                                           for b in (*wanted, self.batch_size)}))
        graphdef = self.graphdef
        self._logits = jax.jit(lambda p, r, i, m, t: nnx.merge(graphdef, p, r).logits(i, m, t))
        self._features = jax.jit(
            lambda p, r, i, m, t: nnx.merge(graphdef, p, r).features(i, m, t))

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.spec.tasks)

    def _rows(self, n: int) -> int:
        """``n`` rounded up to a multiple of the device count (every device an equal share)."""
        d = len(self.devices) if self.input_sharding is not None else 1
        return -(-n // d) * d

    def place(self, batch: dict[str, np.ndarray]) -> tuple[Any, Any, Any]:
        """(ids, mask, types) of a tokenised batch, split by rows over the devices."""
        arrays = tuple(batch[k] for k in ("input_ids", "attention_mask", "token_type_ids"))
        if self.input_sharding is None:
            return arrays
        return tuple(jax.device_put(a, self.input_sharding) for a in arrays)

    # ------------------------------------------------------------------ batching

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Token ids padded to a length bucket and a batch bucket (padding rows: length 1)."""
        return self._tokenize(check_texts(texts))

    def _tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        if not len(texts):  # the tokenizer fails on an empty list
            enc: Any = {"input_ids": []}
        else:
            enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_length,
                                 padding=False)
        longest = max((len(x) for x in enc["input_ids"]), default=1)
        length = next(b for b in self.length_buckets if b >= longest)
        rows = next((b for b in self.batch_buckets if b >= len(texts)),
                    self._rows(len(texts)))
        pad = self.tokenizer.pad_token_id or 0
        ids = np.full((rows, length), pad, np.int32)
        mask = np.zeros((rows, length), np.int32)
        types = np.zeros((rows, length), np.int32)
        mask[len(texts):, 0] = 1  # padding rows: one unmasked token, no empty softmax
        for r, seq in enumerate(enc["input_ids"]):
            ids[r, :len(seq)] = seq
            mask[r, :len(seq)] = 1
            if "token_type_ids" in enc:
                types[r, :len(seq)] = enc["token_type_ids"][r]
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}

    def batches(self, texts: Sequence[str]) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(number of texts, encoded batch) per ``batch_size`` texts, tokenised lazily.

        Every text is checked before the first batch is encoded.
        """
        texts = check_texts(texts)
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start:start + self.batch_size]
            yield len(chunk), self._tokenize(chunk)

    def warm_up(self) -> int:
        """Compile (and run once) the forward of every batch bucket x length bucket: after
        this, ``logits`` of at most ``batch_size`` texts never compiles. Returns how many
        programs that is."""
        for rows in self.batch_buckets:
            for length in self.length_buckets:
                ids = np.zeros((rows, length), np.int32)
                mask = ids.copy()
                mask[:, 0] = 1
                batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": ids}
                np.asarray(self._logits(self.params, self.rest, *self.place(batch)))
        return len(self.batch_buckets) * len(self.length_buckets)

    # ------------------------------------------------------------------ outputs

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        """[n, N, C] padded logits (fp32), one forward pass per batch of texts."""
        out = [np.asarray(self._logits(self.params, self.rest, *self.place(b)))[:n]
               for n, b in self.batches(texts)]
        width = max(c for _, c in self.spec.head_tasks)
        return np.concatenate(out) if out else np.zeros((0, len(self.spec.tasks), width))

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """[n, N*H] the fixed text representation [h_1; ..; h_N] (DESIGN.md section 6)."""
        out = [np.asarray(self._features(self.params, self.rest, *self.place(b)))[:n]
               for n, b in self.batches(texts)]
        n_tasks, hidden = len(self.spec.tasks), self.spec.encoder.hidden_size
        feats = np.concatenate(out) if out else np.zeros((0, n_tasks, hidden), np.float32)
        return feats.reshape(len(feats), n_tasks * hidden)

    def predict(self, texts: Sequence[str], *, tasks: Sequence[str] | None = None,
                top_k: int | None = 1) -> list[dict[str, dict[str, Any]]]:
        """Per text, per task (all, or ``tasks`` in their given order): ``{"label", "score",
        "top_k": [[label, score], ...]}`` or ``{"value"}`` (regression).

        ``top_k`` is how many (label, probability) pairs, most probable first (a task with
        fewer classes gives all of them; ``None``: all). One forward pass per batch answers
        every task; asking for fewer only shortens the answer.
        """
        selected, top_k = self.check_request(tasks, top_k)
        return self.format(self.logits(texts), tasks=selected, top_k=top_k)

    def check_request(self, tasks: Any, top_k: Any) -> tuple[tuple[int, ...], int | None]:
        """Task indices and ``top_k`` of a request, else a DataError naming the field."""
        if tasks is None:
            selected = tuple(range(len(self.spec.tasks)))
        else:
            if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Sequence) \
                    or not all(isinstance(t, str) for t in tasks):
                raise DataError(f"tasks: expected a list of task names, got {tasks!r:.80}")
            index = {name: i for i, name in enumerate(self.task_names)}
            unknown = [t for t in tasks if t not in index]
            if unknown:
                raise DataError(f"tasks: unknown tasks {unknown!r:.200}; the model has "
                                f"{list(self.task_names)}")
            if len(set(tasks)) != len(tasks) or not tasks:
                raise DataError(f"tasks: expected distinct task names, at least one, got "
                                f"{list(tasks)!r:.200}")
            selected = tuple(index[t] for t in tasks)
        if top_k is not None and (isinstance(top_k, bool)
                                  or not isinstance(top_k, (int, np.integer)) or top_k < 1):
            raise DataError(f"top_k: expected a positive integer or null, got {top_k!r:.40}")
        return selected, None if top_k is None else int(top_k)

    def format(self, logits: np.ndarray, *, tasks: Sequence[int] | None = None,
               top_k: int | None = 1) -> list[dict[str, dict[str, Any]]]:
        """``predict``'s answers from ``logits`` [n, N, C], for task indices ``tasks``."""
        specs = self.spec.tasks
        chosen = range(len(specs)) if tasks is None else tasks
        results = []
        for row in logits:
            out: dict[str, dict[str, Any]] = {}
            for t in chosen:
                task = specs[t]
                if task.is_regression:
                    out[task.name] = {"value": float(task.value(row[t, 0]))}
                    continue
                z = row[t, :task.num_classes].astype(np.float64)
                p = np.exp(z - z.max())
                p /= p.sum()
                k = len(p) if top_k is None else min(top_k, len(p))
                order = np.argsort(-p, kind="stable")[:k]
                best = int(order[0])
                out[task.name] = {"label": task.labels[best], "score": float(p[best]),
                                  "top_k": [[task.labels[int(c)], float(p[c])] for c in order]}
            results.append(out)
        return results

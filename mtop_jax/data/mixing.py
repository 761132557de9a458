"""Mixing several sources into one stream of global batches.

Each row of a global batch picks a source at random with probability p_s:

- ``proportional``: p_s ∝ n_s (the sources' sizes);
- ``temperature``: p_s ∝ n_s^(1/T) (T=1 proportional, T→∞ uniform);
- ``uniform``: p_s = 1/S;
- ``dynamic``: p_s ∝ the mean over the source's tasks of the remaining loss
  ratio L_t(now)/L_t(start) (DESIGN.md section 7). The trainer reports
  per-task eval losses with ``update_losses`` at every evaluation; the first
  report of a task is its L_t(start). Before any report every ratio is 1.

Within a source, examples come without replacement from a permutation that is
redrawn every epoch of that source. With ``length_groups=k`` (and the sources'
token lengths) that permutation is cut into chunks of k batches, each chunk
sorted by length and its batches put back in random order (Hugging Face's
``group_by_length``): a batch pads to the bucket of texts of like length, not
to the longest of a random 32, and its texts are still drawn at random.
With ``repeat_threshold=t`` > 0 an epoch repeats the texts of sparsely labelled
tasks (LVIS's repeat factor sampling, Gupta et al. 2019, with tasks as its
categories): a task labelled on a fraction f of the source's texts gets the factor
r = max(1, sqrt(t / f)), a text the largest factor of the tasks it is labelled for,
and each epoch holds a text floor(r) times plus once more with probability r -
floor(r). A task labelled on 1% of the texts is seen sqrt(t / 0.01) times an epoch;
the epoch grows, so at a fixed number of steps the dense tasks see fewer distinct
texts. Everything is a function of the seed, the step and
each source's (epoch, cursor): ``state_dict()`` holds exactly that (plus the loss ratios), so a
restored sampler yields the very next batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mtop_jax.errors import ConfigError, DataError

STRATEGIES = ("proportional", "temperature", "uniform", "dynamic")
MIN_RATIO = 1e-3  # a task whose loss has all but vanished is still sampled, rarely
STATE_VERSION = 1


def mixing_probabilities(sizes: Sequence[int], strategy: str, *, temperature: float = 2.0,
                         source_ratios: Sequence[float] | None = None) -> np.ndarray:
    """Sampling probability of each source."""
    sizes = np.asarray(sizes, np.float64)
    if strategy not in STRATEGIES:
        raise ConfigError(f"data.mixing: expected one of {STRATEGIES}, got {strategy!r}")
    if strategy == "proportional":
        w = sizes
    elif strategy == "temperature":
        if not temperature > 0:
            raise ConfigError(f"data.temperature: must be positive, got {temperature!r}")
        w = sizes ** (1.0 / temperature)
    elif strategy == "uniform":
        w = np.ones_like(sizes)
    else:
        w = np.ones_like(sizes) if source_ratios is None else np.asarray(source_ratios, np.float64)
    w = np.where(sizes > 0, w, 0.0)
    return w / w.sum()


class SourceSampler:
    """Global batches of row indices into the concatenation of the sources."""

    def __init__(self, sizes: Sequence[int], batch_size: int, *, strategy: str = "proportional",
                 temperature: float = 2.0, seed: int = 0,
                 source_tasks: Sequence[Sequence[str]] | None = None,
                 lengths: Sequence[np.ndarray] | None = None, length_groups: int = 0,
                 repeat_factors: Sequence[np.ndarray] | None = None):
        self.sizes = [int(n) for n in sizes]
        if not self.sizes or min(self.sizes) < 1:
            raise DataError(f"every source needs at least one example, sizes {self.sizes}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"data.batch_size: must be a positive integer, got {batch_size!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed: must be a non-negative integer, got {seed!r}")
        self.batch_size = batch_size
        check_length_groups(length_groups)
        if length_groups and (lengths is None or [len(x) for x in lengths] != self.sizes):
            raise DataError("length_groups needs every source's token lengths")
        self.length_groups = length_groups
        self.lengths = [np.asarray(x) for x in lengths] if length_groups else None
        if repeat_factors is not None and (
                [len(x) for x in repeat_factors] != self.sizes
                or not all(np.all(np.asarray(x) >= 1) for x in repeat_factors)):
            raise DataError("repeat_factors: one factor >= 1 per example of every source")
        self.repeat_factors = ([np.asarray(x, np.float64) for x in repeat_factors]
                               if repeat_factors is not None else None)
        self.strategy = strategy
        self.temperature = temperature
        self.source_tasks = [list(t) for t in (source_tasks or [[] for _ in self.sizes])]
        if len(self.source_tasks) != len(self.sizes):
            raise DataError(f"{len(self.source_tasks)} task lists for {len(self.sizes)} sources")
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.seed = seed
        self.step = 0
        self.epochs = [0] * len(self.sizes)
        self.cursors = [0] * len(self.sizes)
        self.start_losses: dict[str, float] = {}
        self.ratios: dict[str, float] = {}
        self._perms: dict[int, tuple[int, np.ndarray]] = {}
        self.probabilities()  # validates the strategy now, not at the first batch

    def probabilities(self) -> np.ndarray:
        ratios = None
        if self.strategy == "dynamic":
            ratios = [np.mean([max(self.ratios.get(t, 1.0), MIN_RATIO) for t in tasks])
                      if tasks else 1.0 for tasks in self.source_tasks]
        return mixing_probabilities(self.sizes, self.strategy, temperature=self.temperature,
                                    source_ratios=ratios)

    def update_losses(self, losses: Mapping[str, float]) -> None:
        """Per-task losses at an evaluation; the first finite one of a task is its start."""
        for task, loss in losses.items():
            loss = float(loss)
            if not math.isfinite(loss) or loss < 0:
                continue  # a diverged or absent task keeps its last ratio
            start = self.start_losses.setdefault(task, loss)
            self.ratios[task] = loss / start if start > 0 else 1.0

    def next_rows(self) -> np.ndarray:
        """The next global batch: int64 [batch_size] rows of the concatenated sources."""
        n_sources = len(self.sizes)
        if n_sources == 1:
            choice = np.zeros(self.batch_size, np.int64)
        else:
            rng = np.random.default_rng([self.seed, 0, self.step])
            choice = rng.choice(n_sources, size=self.batch_size, p=self.probabilities())
        rows = np.empty(self.batch_size, np.int64)
        for s in range(n_sources):
            where = np.flatnonzero(choice == s)
            if len(where):
                rows[where] = self.offsets[s] + self._take(s, len(where))
        self.step += 1
        return rows

    def _take(self, s: int, k: int) -> np.ndarray:
        out = []
        while k:
            perm = self._perm(s)
            got = perm[self.cursors[s]:self.cursors[s] + k]
            out.append(got)
            k -= len(got)
            self.cursors[s] += len(got)
            if self.cursors[s] == len(perm):
                self.epochs[s] += 1
                self.cursors[s] = 0
        return np.concatenate(out)

    def _perm(self, s: int) -> np.ndarray:
        cached = self._perms.get(s)
        if cached is None or cached[0] != self.epochs[s]:
            rng = np.random.default_rng([self.seed, 1, s, self.epochs[s]])
            perm = rng.permutation(self.sizes[s])
            if self.repeat_factors is not None:
                r = self.repeat_factors[s][perm]
                perm = np.repeat(perm, np.floor(r).astype(np.int64)
                                 + (rng.random(len(r)) < r - np.floor(r)))
                perm = perm[rng.permutation(len(perm))]
            if self.length_groups:
                perm = group_by_length(perm, self.lengths[s],
                                       self.batch_size * self.length_groups, self.batch_size, rng)
            cached = (self.epochs[s], perm)
            self._perms[s] = cached
        return cached[1]

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: restoring it resumes at exactly the next batch."""
        return {"version": STATE_VERSION, "seed": self.seed, "step": self.step,
                "sizes": list(self.sizes), "epochs": list(self.epochs),
                "cursors": list(self.cursors), "start_losses": dict(self.start_losses),
                "ratios": dict(self.ratios)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        try:
            if int(state["version"]) != STATE_VERSION:
                raise DataError(f"data iterator state version {state['version']}, "
                                f"expected {STATE_VERSION}")
            sizes = [int(n) for n in state["sizes"]]
            if sizes != self.sizes:
                raise DataError(f"the saved data iterator ran over sources of sizes {sizes}, "
                                f"this data has {self.sizes}: not the same data")
            epochs = [int(e) for e in state["epochs"]]
            cursors = [int(c) for c in state["cursors"]]
            seed, step = int(state["seed"]), int(state["step"])
            start = {str(k): float(v) for k, v in dict(state.get("start_losses", {})).items()}
            ratios = {str(k): float(v) for k, v in dict(state.get("ratios", {})).items()}
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"not a data iterator state ({type(e).__name__}: {e})") from None
        if len(epochs) != len(sizes) or len(cursors) != len(sizes) or min(cursors) < 0:
            raise DataError(f"data iterator state: bad epochs {epochs} or cursors {cursors}")
        self.seed, self.step, self.epochs, self.cursors = seed, step, epochs, cursors
        self.start_losses, self.ratios = start, ratios
        self._perms.clear()
        for s, c in enumerate(cursors):  # an epoch with repeats is longer than its source
            if c >= len(self._perm(s)):
                raise DataError(f"data iterator state: cursor {c} past the end of source {s}'s "
                                f"epoch {epochs[s]} ({len(self._perm(s))} rows): saved with "
                                "other data.repeat_threshold or data")


def repeat_factors(labelled: np.ndarray, threshold: float) -> np.ndarray:
    """float64 [n]: each text's repeat factor from bool ``labelled`` [n, num_tasks] (which
    tasks label it): the largest max(1, sqrt(threshold / f_task)) of its tasks, f_task the
    fraction of the n texts the task labels; 1 for every text when ``threshold`` is 0."""
    check_repeat_threshold(threshold)
    labelled = np.asarray(labelled, bool)
    if not threshold or not len(labelled):
        return np.ones(len(labelled))
    per_task = np.sqrt(threshold / np.maximum(labelled.mean(0), 1e-12))
    return np.where(labelled, per_task, 1.0).max(1, initial=1.0)


def check_repeat_threshold(value: Any) -> None:
    """``data.repeat_threshold`` is a fraction in [0, 1] (0: off)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ConfigError(f"data.repeat_threshold: expected a fraction of the texts in [0, 1] "
                          f"(0: off), got {value!r}")


def check_length_groups(value: Any) -> None:
    """``data.length_groups`` is a number of batches >= 0 (0: off)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"data.length_groups: expected a number of batches >= 0 (0: off), "
                          f"got {value!r}")


def group_by_length(perm: np.ndarray, lengths: np.ndarray, chunk: int, batch_size: int,
                    rng: np.random.Generator) -> np.ndarray:
    """``perm`` cut into chunks of ``chunk`` rows, each sorted by length (longest first) and
    its ``batch_size`` blocks shuffled: the same rows, batches of texts of like length."""
    out = []
    for start in range(0, len(perm), chunk):
        part = perm[start:start + chunk]
        part = part[np.argsort(-lengths[part], kind="stable")]
        blocks = [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
        out.extend(blocks[i] for i in rng.permutation(len(blocks)))
    return np.concatenate(out)

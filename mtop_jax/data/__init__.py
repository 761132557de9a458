"""Data: task specs, sources (local JSONL/CSV, TFDS), tokenisation, batching, mixing.

Training and evaluation use one call, ``build_dataset(config.data, tokenizer,
split)``; see ``mtop_jax.data.pipeline`` for the config keys and
``mtop_jax.data.batching`` for what a batch holds.
"""

from mtop_jax.data.batching import make_batch, resolve_buckets
from mtop_jax.data.demo import DEBIAN_PACKAGES_DIR, debian_packages_config
from mtop_jax.data.examples import ExampleSet
from mtop_jax.data.local_files import read_examples
from mtop_jax.data.mixing import STRATEGIES, SourceSampler, mixing_probabilities
from mtop_jax.data.pipeline import (
    Dataset,
    TrainIterator,
    build_dataset,
    load_examples,
)
from mtop_jax.data.tasks import TaskSpec, load_task_specs, save_task_specs
from mtop_jax.data.tokenization import Encoded, tokenize

__all__ = [
    "DEBIAN_PACKAGES_DIR", "STRATEGIES", "Dataset", "Encoded", "ExampleSet", "SourceSampler",
    "TaskSpec", "TrainIterator", "build_dataset", "debian_packages_config", "load_examples",
    "load_task_specs", "make_batch", "mixing_probabilities", "read_examples", "resolve_buckets",
    "save_task_specs", "tokenize",
]

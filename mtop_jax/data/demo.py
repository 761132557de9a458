"""The embedded demo set, ``mtop_jax/data/debian-packages`` (package data: it
ships in the wheel and the sdist): the default data of the demo and of the
integration tests (its README says what it is and where it is from).

Its label sets are given here, not inferred: the ``tasks`` section (tasksel's
37 ``task-*`` packages) is in the test split only, never in train.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

# a real directory: the package is installed unzipped (a wheel, an editable install)
DEBIAN_PACKAGES_DIR = Path(__file__).resolve().parent / "debian-packages"

DEBIAN_PACKAGES_LABELS: dict[str, tuple[str, ...]] = {
    "section": (
        "admin", "cli-mono", "database", "devel", "doc", "editors", "fonts", "games", "gnome",
        "gnu-r", "golang", "graphics", "haskell", "interpreters", "introspection", "java",
        "javascript", "kde", "libdevel", "libs", "lisp", "localization", "mail", "math",
        "metapackages", "misc", "net", "ocaml", "perl", "php", "python", "ruby", "rust",
        "science", "sound", "tasks", "text", "utils", "video", "web", "x11"),
    "role": ("app-data", "data", "devel-lib", "documentation", "metapackage", "plugin",
             "program", "shared-lib"),
    "implemented_in": ("c", "c++", "java", "lisp", "perl", "python"),
    "interface": ("commandline", "daemon", "text-mode"),
}


def debian_packages_config(path: str | Path | None = None) -> ml_collections.ConfigDict:
    """``config.data`` for the demo set (``path``: another copy of it)."""
    data = ml_collections.ConfigDict()
    data.source = "jsonl"
    data.path = str(path or DEBIAN_PACKAGES_DIR)
    data.text_field = "text"
    data.pair_field = None
    data.id_field = "id"
    # A mapping, so that it can be frozen and overridden from the command line; a
    # ConfigDict orders it by name: implemented_in, interface, role, section.
    data.tasks = {name: {"field": f"labels.{name}", "labels": labels}
                  for name, labels in DEBIAN_PACKAGES_LABELS.items()}
    data.max_length = 128
    data.batch_size = 32
    data.eval_batch_size = 64
    data.buckets = (64, 128)
    # >0: training batches drawn from groups of this many batches sorted by length, so
    # they pad to short buckets (mtop_jax.data.mixing.group_by_length); 0: plain shuffle.
    data.length_groups = 0
    # >0: an epoch repeats the texts of tasks labelled on fewer than this fraction of the
    # texts, sqrt(threshold / fraction) times (mtop_jax.data.mixing.repeat_factors); 0: off
    # (0.3 helped the dev set, not the demo: benchmarks/README.md, the seventh ablation).
    data.repeat_threshold = 0.0
    data.mixing = "proportional"
    data.temperature = 2.0
    data.seed = 0
    data.cache = True
    data.cache_dir = ""
    data.max_examples = None
    data.unknown_labels = "error"
    return data

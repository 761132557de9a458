"""The package layout of the README: one folder per part of DESIGN.md, imports that run
one way (cli -> serving, training -> models, data, weighting, parallel, config)."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "mtop_jax"

#: part -> the parts its modules may import (besides itself and the shared leaves).
SHARED = {"errors", "files", "__init__"}
ALLOWED = {
    "models": {"data"},  # ModelSpec holds the data's TaskSpecs
    "data": set(),
    "weighting": set(),
    "parallel": {"models.axes"},  # the logical axis names the rules map
    "config": {"parallel"},  # the default rules
    "training": {"models", "data", "weighting", "parallel", "config"},
    "serving": {"models", "data", "parallel", "config", "training.checkpoints"},
    "cli": {"serving", "training", "models", "parallel", "config", "data"},
}


def part_of(module: str) -> str:
    """``mtop_jax.training.loop`` -> ``training``; ``mtop_jax.cli`` -> ``cli``."""
    return module.split(".")[1] if module.count(".") else "__init__"


def project_imports(path: Path) -> set[str]:
    """Every ``mtop_jax.*`` module a file imports (also inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("mtop_jax.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "mtop_jax":
                out |= {f"mtop_jax.{a.name}" for a in node.names}
            elif node.module.startswith("mtop_jax."):
                out.add(node.module)
    return out


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_one_way(path):
    me = part_of("mtop_jax." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
    if me == "__init__":
        return  # mtop_jax.load: the public entry point, lazily importing serving
    allowed = ALLOWED.get(me, set())  # errors.py, files.py: leaves
    for module in project_imports(path):
        name = module.removeprefix("mtop_jax.")
        part = part_of(module)
        if part in SHARED or part == me:
            continue
        assert part in allowed or any(name == a or name.startswith(a + ".") for a in allowed), (
            f"{path.relative_to(ROOT)} ({me}) imports {module}: {me} may import "
            f"{sorted(allowed | SHARED)}")


def test_public_packages_import():
    import mtop_jax.config
    import mtop_jax.parallel
    import mtop_jax.serving
    import mtop_jax.training  # noqa: F401

    assert callable(mtop_jax.load) and callable(mtop_jax.serving.load)


def test_readme_layout_table_matches_the_tree():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Layout"):]
    table = table[:table.index("\n## ", 4)]
    paths = set(re.findall(r"`(mtop_jax/[\w/.]*)`", table))
    assert paths, "no mtop_jax paths in the README's layout table"
    for p in paths:
        assert (ROOT / p).exists(), f"README layout names {p}, which does not exist"
    folders = {f"mtop_jax/{d.name}/" for d in PACKAGE.iterdir()
               if d.is_dir() and (d / "__init__.py").exists()}
    modules = {f"mtop_jax/{f.name}" for f in PACKAGE.glob("*.py") if f.name != "__init__.py"}
    missing = sorted(x for x in folders | modules if x not in paths)
    assert not missing, f"README layout table misses {missing}"

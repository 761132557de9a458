"""Packaging: ``--version``, TensorBoard writer failures, and a wheel that trains outside
the clone (the demo set is package data)."""

import json
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
from importlib.metadata import version as dist_version
from pathlib import Path

import pytest

import mtop_jax
from mtop_jax.cli import main
from mtop_jax.training.metric_writers import MetricWriter

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.py"
# The fault tests' child run (the same program: a compilation cache hit when they ran
# first), one checkpoint at the end: one device, no evaluation or sample predictions.
TINY_RUN = ["--config.train.steps=10", "--config.train.checkpoint_every=10",
            "--config.train.eval_split=", "--config.train.test_split=",
            "--config.predict_examples=0", "--config.train.best_metric=",
            "--config.mesh.data=1"]


# ---------------------------------------------------------------------- --version

def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])  # no subcommand: the version action exits first
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"mtop-jax {mtop_jax.__version__}"

    done = subprocess.run([sys.executable, "-m", "mtop_jax.cli", "--version"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"mtop-jax {mtop_jax.__version__}"


def test_no_subcommand_is_still_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


# ---------------------------------------------------------------------- TensorBoard

def tensorboard_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.levelno == logging.WARNING and "TensorBoard" in r.getMessage()]


def jsonl_lines(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_failing_summary_writer_warns_once(tmp_path, monkeypatch, caplog):
    import tensorboardX

    def refuse(logdir, *args, **kwargs):
        raise OSError(f"read-only file system: {logdir}")

    monkeypatch.setattr(tensorboardX, "SummaryWriter", refuse)
    caplog.set_level(logging.WARNING)
    writer = MetricWriter(tmp_path)
    for step in (1, 2, 3):
        writer.write(step, {"loss": 1.0 / step})
    writer.close()

    assert [(r["step"], r["loss"]) for r in jsonl_lines(tmp_path)] == [
        (1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    warnings = tensorboard_warnings(caplog)
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert str(tmp_path / "tensorboard") in message and "read-only file system" in message
    assert not (tmp_path / "tensorboard").exists()


def test_failing_tensorboard_writes_warn_once(tmp_path, monkeypatch, caplog):
    import tensorboardX

    calls = []

    class FullDisk:
        def __init__(self, logdir, *args, **kwargs):
            pass

        def add_scalar(self, tag, value, step):
            calls.append((tag, step))
            raise OSError(28, "No space left on device")

        def close(self):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(tensorboardX, "SummaryWriter", FullDisk)
    caplog.set_level(logging.WARNING)
    writer = MetricWriter(tmp_path)
    for step in (1, 2, 3):
        writer.write(step, {"loss": 1.0, "acc": 0.5})
    writer.close()

    assert [r["step"] for r in jsonl_lines(tmp_path)] == [1, 2, 3]
    assert calls == [("train/loss", 1)]  # dropped after the first failure, close included
    warnings = tensorboard_warnings(caplog)
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "No space left on device" in warnings[0].getMessage()


# ---------------------------------------------------------------------- the wheel

def _run(cmd, *, what: str, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, (f"{what} failed ({done.returncode}):\n"
                                  f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return done


def build_wheel(out: Path, tmp: Path) -> Path:
    """The wheel, built from a copy of the sources (the clone gets no build/ or
    egg-info). Without build isolation where the installed setuptools reads the
    project's SPDX ``license`` (77 and later), else in an isolated env (from PyPI)."""
    src = tmp / "src"
    shutil.copytree(REPO / "mtop_jax", src / "mtop_jax",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    cmd = [sys.executable, "-m", "build", "--wheel", "--outdir", out]
    if int(dist_version("setuptools").split(".")[0]) >= 77:
        cmd.append("--no-isolation")
    _run([*cmd, src], what="python -m build", cwd=src, timeout=600)
    (wheel,) = out.glob("mtop_jax-*.whl")
    return wheel


def test_wheel_installs_and_trains_outside_the_clone(tmp_path):
    wheel = build_wheel(tmp_path / "dist", tmp_path)

    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", None) or sys.executable
    _run([base, "-m", "venv", "--without-pip", venv], what="python -m venv", timeout=300)
    python = venv / "bin" / "python"
    # Installed before the project's packages are visible: pip must see no mtop-jax.
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
          "--no-index", "--quiet", wheel], what="pip install the wheel", timeout=300)
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     what="purelib", timeout=60).stdout.strip())
    # The project venv's dependencies by a plain path line: its .pth files (the
    # editable install's finder among them) are not run from there.
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "project_dependencies.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))

    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", XLA_FLAGS=" ".join(flags))

    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    where = _run([python, "-c", "import mtop_jax; print(mtop_jax.__file__)"],
                 what="import mtop_jax", cwd=run_dir, env=env, timeout=120).stdout.strip()
    assert Path(where).resolve().is_relative_to(site.resolve()), where
    assert not Path(where).resolve().is_relative_to(REPO), where

    script = venv / "bin" / "mtop-jax"
    version = _run([script, "--version"], what="mtop-jax --version", cwd=run_dir, env=env,
                   timeout=120).stdout.strip()
    assert version == f"mtop-jax {mtop_jax.__version__}"

    shutil.copy2(TINY, run_dir / "tiny.py")
    _run([script, "train", "--config", "tiny.py", "--workdir", "wd",
          *TINY_RUN], what="mtop-jax train", cwd=run_dir, env=env, timeout=600)

    wd = run_dir / "wd"
    assert (wd / "checkpoints" / "10").is_dir(), sorted(p.name for p in (wd / "checkpoints")
                                                       .iterdir())
    data_path = Path(json.loads((wd / "config.json").read_text())["data"]["path"]).resolve()
    assert data_path.is_relative_to(site.resolve()), data_path
    assert (data_path / "train.jsonl").is_file()

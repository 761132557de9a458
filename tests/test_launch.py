"""The launchers: ``launch/tpu_vm.py --dry-run`` prints the exact gcloud commands;
``launch/gpu.sh --dry-run`` exports the JAX coordinator variables, from flags or Slurm."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
LAUNCH = ROOT / "launch"
sys.path.insert(0, str(LAUNCH))
import tpu_vm  # noqa: E402

REPO = "https://github.com/example/mtop-jax.git"
WORKDIR = "gs://my-bucket/runs/demo"

SETUP = ("gcloud compute tpus tpu-vm ssh mtop --zone={zone} --worker=all --command "
         "'set -e; if [ -d mtop-jax/.git ]; then git -C mtop-jax pull --ff-only; "
         f"else git clone {REPO} mtop-jax; fi; bash mtop-jax/launch/remote_setup.sh'")
RUN = ("gcloud compute tpus tpu-vm ssh mtop --zone={zone} --worker=all --command "
       "'cd mtop-jax && if [ -f ~/mtop-jax-train.pid ] && kill -0 $(cat ~/mtop-jax-train.pid) "
       "2>/dev/null; then echo \"$(hostname): already training (pid $(cat "
       "~/mtop-jax-train.pid))\"; else {env}nohup .venv/bin/mtop-jax train --config "
       f"configs/debian_packages.py --workdir {WORKDIR} --config.train.steps=2000 "
       "'\"'\"'--config.data.buckets=(64, 128)'\"'\"' >> ~/mtop-jax-train.log 2>&1 "
       "< /dev/null & echo $! > ~/mtop-jax-train.pid; echo \"$(hostname): started\"; fi'")


def launcher(*args: str) -> list[str]:
    out = subprocess.run([sys.executable, str(LAUNCH / "tpu_vm.py"), *args], check=True,
                         capture_output=True, text=True, cwd=ROOT)
    return out.stdout.splitlines()


def all_dry_run(accelerator: str, zone: str, *extra: str) -> list[str]:
    return launcher("all", "--dry-run", "--name", "mtop", "--zone", zone,
                    "--accelerator-type", accelerator, "--repo", REPO, "--workdir", WORKDIR,
                    *extra, "--", "--config.train.steps=2000",
                    "--config.data.buckets=(64, 128)")


def test_v4_8_dry_run():
    zone = "us-central2-b"
    assert all_dry_run("v4-8", zone) == [
        "gcloud compute tpus tpu-vm describe mtop --zone=us-central2-b '--format=value(state)'",
        "gcloud compute tpus tpu-vm create mtop --zone=us-central2-b --accelerator-type=v4-8 "
        "--version=tpu-ubuntu2204-base",
        SETUP.format(zone=zone),
        RUN.format(zone=zone, env=""),  # one host: no jax.distributed
    ]


def test_v5e_16_dry_run():
    zone = "us-west4-a"
    assert all_dry_run("v5e-16", zone, "--spot", "--project", "my-project") == [
        "gcloud compute tpus tpu-vm describe mtop --zone=us-west4-a --project=my-project "
        "'--format=value(state)'",
        "gcloud compute tpus tpu-vm create mtop --zone=us-west4-a --project=my-project "
        "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite --spot",
        SETUP.format(zone=zone).replace("--worker", "--project=my-project --worker"),
        # 4 hosts: every worker joins jax.distributed
        RUN.format(zone=zone, env="MTOP_JAX_DISTRIBUTED=1 ").replace(
            "--worker", "--project=my-project --worker"),
    ]


def test_the_shell_wrapper_and_the_other_commands():
    wrapper = subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), "delete", "--dry-run",
                              "--name", "mtop", "--zone", "europe-west4-a"],
                             check=True, capture_output=True, text=True,
                             env={**os.environ, "PYTHON": sys.executable})
    assert wrapper.stdout.splitlines() == [
        "gcloud compute tpus tpu-vm describe mtop --zone=europe-west4-a '--format=value(state)'",
        "gcloud compute tpus tpu-vm delete mtop --zone=europe-west4-a --quiet",
    ]
    common = ["--dry-run", "--name", "mtop", "--zone", "z"]
    assert launcher("logs", *common) == [
        "gcloud compute tpus tpu-vm ssh mtop --zone=z --worker=0 --command "
        "'tail -n 100 -F ~/mtop-jax-train.log'"]
    assert launcher("stop", *common) == [
        "gcloud compute tpus tpu-vm ssh mtop --zone=z --worker=all --command "
        "'if [ -f ~/mtop-jax-train.pid ]; then kill -TERM $(cat ~/mtop-jax-train.pid) "
        "2>/dev/null || true; fi'"]
    # Copies go into an existing parent (--dest, default workdirs): a re-run overwrites.
    assert launcher("fetch", *common, "--workdir", WORKDIR + "/", "--dest", "back") == [
        "mkdir -p back", f"gcloud storage cp -r {WORKDIR} back/"]
    assert launcher("fetch", *common, "--workdir", WORKDIR, "--step", "300") == [
        "mkdir -p workdirs/demo/checkpoints",
        f"gcloud storage cp -r {WORKDIR}/config.json {WORKDIR}/model.json "
        f"{WORKDIR}/metrics.jsonl {WORKDIR}/tokenizer workdirs/demo/",
        f"gcloud storage cp -r {WORKDIR}/checkpoints/300 workdirs/demo/checkpoints/"]
    assert launcher("fetch", *common, "--workdir", "workdirs/demo") == [
        "mkdir -p workdirs",
        "gcloud compute tpus tpu-vm scp mtop:mtop-jax/workdirs/demo workdirs/ --zone=z "
        "--worker=0 --recurse"]


def test_setup_from_a_local_checkout(tmp_path):
    lines = launcher("setup", "--dry-run", "--name", "mtop", "--zone", "z", "--repo",
                     str(tmp_path), "--python", "python3.12")
    assert lines == [
        "tar -czf /tmp/mtop-mtop-jax.tar.gz --exclude=.git --exclude=.venv --exclude=workdirs "
        "'--exclude=*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache "
        f"--exclude=.ruff_cache -C {tmp_path} .",
        "gcloud compute tpus tpu-vm scp /tmp/mtop-mtop-jax.tar.gz mtop:mtop-jax.tar.gz "
        "--zone=z --worker=all",
        "gcloud compute tpus tpu-vm ssh mtop --zone=z --worker=all --command 'set -e; "
        "mkdir -p mtop-jax; tar -xzf mtop-jax.tar.gz -C mtop-jax; "
        "bash mtop-jax/launch/remote_setup.sh --python python3.12'",
    ]


def test_multi_host_needs_a_shared_workdir():
    out = subprocess.run([sys.executable, str(LAUNCH / "tpu_vm.py"), "run", "--dry-run",
                          "--zone", "z", "--accelerator-type", "v4-32", "--workdir", "runs/x"],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "gs://" in out.stderr and not out.stdout
    with pytest.raises(SystemExit):
        tpu_vm.main(["create", "--zone", "z", "--accelerator-type", "v3-8", "--dry-run"])


@pytest.mark.parametrize("name,gcloud_type,chips,hosts,version", [
    ("v4-8", "v4-8", 4, 1, "tpu-ubuntu2204-base"),
    ("v4-32", "v4-32", 16, 4, "tpu-ubuntu2204-base"),
    ("v5e-8", "v5litepod-8", 8, 1, "v2-alpha-tpuv5-lite"),
    ("v5e-16", "v5litepod-16", 16, 4, "v2-alpha-tpuv5-lite"),
    ("v5litepod-256", "v5litepod-256", 256, 64, "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v5p-8", 4, 1, "v2-alpha-tpuv5"),
    ("v5p-32", "v5p-32", 16, 4, "v2-alpha-tpuv5"),
    ("v6e-8", "v6e-8", 8, 1, "v2-alpha-tpuv6e"),
    ("v6e-16", "v6e-16", 16, 4, "v2-alpha-tpuv6e"),
])
def test_accelerator_types(name, gcloud_type, chips, hosts, version):
    acc = tpu_vm.parse_accelerator(name)
    assert (acc.type, acc.chips, acc.hosts, acc.runtime_version) == (
        gcloud_type, chips, hosts, version)


# ---------------------------------------------------------------------------- gpu.sh


def gpu_dry_run(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("SLURM_", "JAX_", "MTOP_JAX"))}  # no outer cluster
    return subprocess.run(["bash", str(LAUNCH / "gpu.sh"), "--dry-run", *args],
                          env={**clean, "MTOP_JAX": "mtop-jax", **env},
                          capture_output=True, text=True)


TRAIN = ["--config", "configs/debian_packages.py", "--workdir", "/shared/runs/a b"]
COMMAND = "mtop-jax train --config configs/debian_packages.py --workdir /shared/runs/a\\ b"


def test_gpu_one_node_sets_nothing():
    out = gpu_dry_run(*TRAIN)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [COMMAND]


def test_gpu_nodes_from_flags():
    out = gpu_dry_run("--coordinator", "10.0.0.1", "--num-processes", "2", "--process-id", "1",
                      "--", *TRAIN, "--config.train.steps=10")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "export JAX_COORDINATOR_ADDRESS=10.0.0.1:12355", "export JAX_NUM_PROCESSES=2",
        "export JAX_PROCESS_ID=1", COMMAND + " --config.train.steps=10"]
    bad = gpu_dry_run("--coordinator", "h:1", "--num-processes", "2", "--process-id", "2")
    assert bad.returncode == 2 and "0..1" in bad.stderr
    assert gpu_dry_run("--coordinator", "h:1", "--process-id", "0").returncode == 2


SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
         "SLURM_JOB_NODELIST": "gpu[07-08]"}


def test_gpu_nodes_from_slurm(tmp_path):
    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[07-08]" ] && '
                    'printf "gpu07\\ngpu08\\n"\n')
    fake.chmod(0o755)
    for scontrol in (str(fake), str(tmp_path / "missing")):  # scontrol, then its fallback
        out = gpu_dry_run(*TRAIN, SCONTROL=scontrol, **SLURM)
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == [
            "export JAX_COORDINATOR_ADDRESS=gpu07:61586",  # 61440 + 4242 % 4096
            "export JAX_NUM_PROCESSES=2", "export JAX_PROCESS_ID=1", COMMAND]
    out = gpu_dry_run("--port", "9999", *TRAIN, SCONTROL=str(tmp_path / "missing"),
                      **{**SLURM, "SLURM_JOB_NODELIST": "a01,b[1-2]", "SLURM_PROCID": "0"})
    assert out.stdout.splitlines()[:3] == [
        "export JAX_COORDINATOR_ADDRESS=a01:9999", "export JAX_NUM_PROCESSES=2",
        "export JAX_PROCESS_ID=0"]
    # One task: a one-node job, nothing to join.
    assert gpu_dry_run(*TRAIN, **{**SLURM, "SLURM_NTASKS": "1"}).stdout.splitlines() == [COMMAND]


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_shell_scripts_parse():
    for script in ("gpu.sh", "tpu_vm.sh", "remote_setup.sh", "slurm_example.sbatch"):
        subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)
    sbatch = (LAUNCH / "slurm_example.sbatch").read_text()
    assert "#SBATCH --nodes=2" in sbatch and "#SBATCH --ntasks-per-node=1" in sbatch
    assert "#SBATCH --gpus-per-node=8" in sbatch and "srun" in sbatch and "launch/gpu.sh" in sbatch


def alive(pid: int) -> bool:
    """Running (a zombie, left to an init that does not reap, counts as ended)."""
    if not Path("/proc").is_dir():
        return subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode == 0
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_run_and_stop_commands_work_in_a_shell(tmp_path):
    """The remote side of ``run`` and ``stop``, executed here against a fake trainer:
    started once (a second ``run`` leaves it alone), logs appended, SIGTERM stops it."""
    import shlex
    import time

    fake = tmp_path / "mtop-jax" / ".venv" / "bin" / "mtop-jax"
    fake.parent.mkdir(parents=True)
    fake.write_text('#!/bin/sh\necho "train args: $*; distributed=$MTOP_JAX_DISTRIBUTED"\n'
                    "exec sleep 60\n")
    fake.chmod(0o755)
    common = ["--dry-run", "--name", "mtop", "--zone", "z"]
    run = shlex.split(launcher("run", *common, "--accelerator-type", "v4-32", "--workdir",
                               WORKDIR, "--", "--config.data.buckets=(64, 128)")[0])[-1]
    stop = shlex.split(launcher("stop", *common)[0])[-1]
    env = {**os.environ, "HOME": str(tmp_path)}

    def remote(command: str) -> str:
        return subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, check=True,
                              capture_output=True, text=True, timeout=30).stdout

    assert remote(run).endswith(": started\n")
    pid = int((tmp_path / "mtop-jax-train.pid").read_text())
    try:
        assert f"already training (pid {pid})" in remote(run)
        log = tmp_path / "mtop-jax-train.log"
        for _ in range(100):
            if log.exists() and log.read_text():
                break
            time.sleep(0.05)
        assert log.read_text() == (f"train args: train --config configs/debian_packages.py "
                                   f"--workdir {WORKDIR} --config.data.buckets=(64, 128); "
                                   "distributed=1\n")
        remote(stop)
        for _ in range(100):
            if not alive(pid):
                break
            time.sleep(0.05)
        else:
            pytest.fail("stop did not end the training process")
    finally:
        subprocess.run(["kill", "-9", str(pid)], capture_output=True)

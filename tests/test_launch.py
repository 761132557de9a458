"""The launchers: ``launch/tpu_vm.py --dry-run`` prints the exact gcloud commands;
``launch/gpu.sh --dry-run`` exports the JAX coordinator variables, from flags or Slurm."""

from __future__ import annotations

import json
import os
import shlex
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
# What every worker runs: the trainer under a bash that records its pid and exit status.
TRAIN_ON_WORKER = (
    "cd mtop-jax && if [ -f ~/mtop-jax-train.pid ] && kill -0 $(cat ~/mtop-jax-train.pid) "
    "2>/dev/null; then echo \"$(hostname): already training (pid $(cat "
    "~/mtop-jax-train.pid))\"; else rm -f ~/mtop-jax-train.pid ~/mtop-jax-train.exit; "
    "{env}nohup bash -c '\"$@\" & echo $! > \"$HOME/mtop-jax-train.pid\"; wait $!; "
    "echo $? > \"$HOME/mtop-jax-train.exit\"' mtop-jax-train .venv/bin/mtop-jax train "
    f"--config configs/debian_packages.py --workdir {WORKDIR} --config.train.steps=2000 "
    "'--config.data.buckets=(64, 128)' >> ~/mtop-jax-train.log 2>&1 < /dev/null & "
    "for _ in $(seq 100); do [ -s ~/mtop-jax-train.pid ] && break; sleep 0.1; done; "
    "echo \"$(hostname): started\"; fi")
RUN = ("gcloud compute tpus tpu-vm ssh mtop --zone={zone} --worker=all --command "
       + shlex.quote(TRAIN_ON_WORKER))


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
    describe = "gcloud compute tpus tpu-vm describe mtop --zone=us-central2-b --format=json"
    assert all_dry_run("v4-8", zone) == [
        describe,
        "gcloud compute tpus tpu-vm create mtop --zone=us-central2-b --accelerator-type=v4-8 "
        "--version=tpu-ubuntu2204-base",
        SETUP.format(zone=zone),
        describe,  # run reads the VM's type and workers (a dry run takes the flag's)
        RUN.format(zone=zone, env=""),  # one host: no jax.distributed
    ]


def test_v5e_16_dry_run():
    zone = "us-west4-a"
    describe = ("gcloud compute tpus tpu-vm describe mtop --zone=us-west4-a "
                "--project=my-project --format=json")
    assert all_dry_run("v5e-16", zone, "--spot", "--project", "my-project") == [
        describe,
        "gcloud compute tpus tpu-vm create mtop --zone=us-west4-a --project=my-project "
        "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite --spot",
        SETUP.format(zone=zone).replace("--worker", "--project=my-project --worker"),
        describe,
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
        "gcloud compute tpus tpu-vm describe mtop --zone=europe-west4-a --format=json",
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
    assert out.returncode != 0 and "gs://" in out.stderr
    assert out.stdout == "gcloud compute tpus tpu-vm describe mtop-jax --zone=z --format=json\n"
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


# ---------------------------------------------------------------------------- fake gcloud
# tpu_vm.py run for real against tests/fake_gcloud.py on PATH: it records every call and
# answers describe (node and queued resource) the way the Cloud TPU docs document, and
# rejects flags those commands do not take.

WORKERS = {"v4-8": 1, "v4-32": 4, "v5litepod-16": 4}


class FakeGcloud:
    def __init__(self, root: Path):
        self.root = root

    def set(self, **state) -> None:
        (self.root / "state.json").write_text(json.dumps({"workers": WORKERS, **state}))

    def state(self) -> dict:
        return json.loads((self.root / "state.json").read_text())

    def calls(self) -> list[str]:
        """Every call so far, as ``VERB NAME FLAGS...`` (without ``gcloud compute tpus``),
        and forgets them."""
        path = self.root / "calls.jsonl"
        if not path.exists():
            return []
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        path.unlink()
        return [" ".join(a for a in argv if a not in ("compute", "tpus", "--zone=z"))
                for argv in lines]


@pytest.fixture
def gcloud(tmp_path, monkeypatch) -> FakeGcloud:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "gcloud"
    script.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} '
                      f'{shlex.quote(str(ROOT / "tests" / "fake_gcloud.py"))} "$@"\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_GCLOUD_DIR", str(tmp_path))
    fake = FakeGcloud(tmp_path)
    fake.set()
    return fake


def node(acc: str, state: str = "READY") -> dict:
    return {"state": state, "acceleratorType": acc,
            "networkEndpoints": [{"ipAddress": f"10.0.0.{i}"} for i in range(WORKERS[acc])]}


def tpu(*argv: str) -> None:
    tpu_vm.main([*argv[:1], "--name", "mtop", "--zone", "z", *argv[1:]])


def train_call(calls: list[str]) -> str:
    [train] = [c for c in calls if "mtop-jax train" in c]
    return train


def test_create_passes_the_creation_flags(gcloud):
    tpu("create", "--accelerator-type", "v4-8", "--spot", "--service-account",
        "sa@p.iam.gserviceaccount.com", "--internal-ips", "--labels", "team=nlp,run=demo")
    assert gcloud.calls() == [
        "tpu-vm describe mtop --format=json",
        "tpu-vm create mtop --accelerator-type=v4-8 --version=tpu-ubuntu2204-base --spot "
        "--service-account=sa@p.iam.gserviceaccount.com --internal-ips "
        "--labels=team=nlp,run=demo"]
    assert gcloud.state()["nodes"]["mtop"]["state"] == "READY"
    tpu("create", "--accelerator-type", "v4-8")  # exists and READY: left alone
    assert gcloud.calls() == ["tpu-vm describe mtop --format=json"]
    with pytest.raises(SystemExit, match="exists as v4-8, not v4-32"):
        tpu("create", "--accelerator-type", "v4-32")
    # --autocheckpoint-enabled exists on the alpha track only (the fake rejects it on GA).
    tpu("delete")
    gcloud.calls()
    tpu("create", "--accelerator-type", "v4-8", "--autocheckpoint")
    assert gcloud.calls()[-1] == ("alpha tpu-vm create mtop --accelerator-type=v4-8 "
                                  "--version=tpu-ubuntu2204-base --autocheckpoint-enabled")


@pytest.mark.parametrize("dead", ["PREEMPTED", "TERMINATED"])
def test_a_preempted_vm_is_deleted_and_created_again(gcloud, dead):
    gcloud.set(nodes={"mtop": node("v4-8", dead)})
    with pytest.raises(SystemExit, match=f"mtop is {dead}, not READY"):
        tpu("run", "--workdir", "runs/a")
    assert gcloud.calls() == ["tpu-vm describe mtop --format=json"]  # no ssh
    tpu("create", "--accelerator-type", "v4-8", "--spot")
    assert gcloud.calls() == [
        "tpu-vm describe mtop --format=json",
        "tpu-vm delete mtop --quiet",
        "tpu-vm create mtop --accelerator-type=v4-8 --version=tpu-ubuntu2204-base --spot"]
    assert gcloud.state()["nodes"]["mtop"]["state"] == "READY"


def test_run_takes_the_workers_from_describe(gcloud):
    gcloud.set(nodes={"mtop": node("v4-8")})
    tpu("run", "--workdir", "runs/a")  # one worker: a local workdir, no jax.distributed
    train = train_call(gcloud.calls())
    assert "--worker=all" in train and "MTOP_JAX_DISTRIBUTED" not in train

    gcloud.set(nodes={"mtop": node("v4-32")})  # no --accelerator-type: describe says v4-32
    with pytest.raises(SystemExit, match="v4-32 has 4 hosts.*gs://"):
        tpu("run", "--workdir", "runs/a")
    assert gcloud.calls() == ["tpu-vm describe mtop --format=json"]
    tpu("run", "--workdir", WORKDIR)
    train = train_call(gcloud.calls())
    assert "MTOP_JAX_DISTRIBUTED=1 nohup bash -c" in train
    assert f"mtop-jax-train .venv/bin/mtop-jax train --config configs/debian_packages.py " \
           f"--workdir {WORKDIR} >>" in train

    with pytest.raises(SystemExit, match="--accelerator-type v4-8 but mtop is v4-32 "
                                         r"\(4 workers\)"):
        tpu("run", "--accelerator-type", "v4-8", "--workdir", WORKDIR)
    assert gcloud.calls() == ["tpu-vm describe mtop --format=json"]
    tpu("run", "--accelerator-type", "v4-32", "--workdir", WORKDIR)  # agrees: runs
    assert len(gcloud.calls()) == 2


def test_describe_errors_other_than_not_found_stop(gcloud):
    (gcloud.root / "state.json").write_text("not json")  # the fake itself crashes
    with pytest.raises(SystemExit, match="describe mtop --zone=z --format=json failed"):
        tpu("create", "--accelerator-type", "v4-8")
    assert [c for c in gcloud.calls() if "create" in c] == []


def verbs(calls: list[str]) -> list[str]:
    """``GROUP VERB`` of each call, ``ssh:train``/``ssh:setup``/``ssh:status`` for ssh."""
    out = []
    for call in calls:
        group, verb = call.split()[:2]
        if verb == "ssh":
            verb = ("ssh:train" if "mtop-jax train" in call else
                    "ssh:status" if "echo RUNNING" in call else "ssh:setup")
        out.append(f"{group} {verb}")
    return out


QUEUED_CREATE = ("queued-resources create mtop-qr --node-id=mtop --accelerator-type=v4-32 "
                 "--runtime-version=tpu-ubuntu2204-base --spot")


def test_queued_create_waits_until_active_and_delete_removes_it(gcloud):
    gcloud.set(queued_states=["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"])
    tpu("create", "--queued", "--poll-seconds", "0", "--accelerator-type", "v4-32", "--spot")
    assert gcloud.calls() == [
        "tpu-vm describe mtop --format=json",
        "queued-resources describe mtop-qr --format=json",
        QUEUED_CREATE,
        *["queued-resources describe mtop-qr --format=json"] * 3]
    assert gcloud.state()["nodes"]["mtop"]["acceleratorType"] == "v4-32"
    tpu("run", "--workdir", WORKDIR)  # the queued resource's VM, 4 workers
    assert "MTOP_JAX_DISTRIBUTED=1" in train_call(gcloud.calls())
    tpu("delete", "--queued")
    assert gcloud.calls() == ["queued-resources describe mtop-qr --format=json",
                              "queued-resources delete mtop-qr --force --quiet"]
    assert gcloud.state()["nodes"] == {} and gcloud.state()["queued"] == {}
    tpu("delete", "--queued")  # gone: nothing to do
    assert gcloud.calls() == ["queued-resources describe mtop-qr --format=json"]


def test_queued_failures_are_clear(gcloud):
    create = ["create", "--queued", "--poll-seconds", "0", "--accelerator-type", "v4-32",
              "--spot"]
    gcloud.set(queued_states=["WAITING_FOR_RESOURCES", "FAILED"])
    with pytest.raises(SystemExit, match="queued resource mtop-qr is FAILED"):
        tpu(*create)
    # Again: the FAILED request is deleted and a new one queued.
    gcloud.set(queued=gcloud.state()["queued"], queued_states=["ACTIVE"])
    gcloud.calls()
    tpu(*create)
    assert verbs(gcloud.calls()) == [
        "tpu-vm describe", "queued-resources describe", "queued-resources delete",
        "queued-resources create", "queued-resources describe"]

    gcloud.set(queued_states=["WAITING_FOR_RESOURCES"])
    with pytest.raises(SystemExit, match="still WAITING_FOR_RESOURCES after 0 s"):
        tpu(*create, "--queued-timeout", "0")
    gcloud.calls()
    gcloud.set(queued=gcloud.state()["queued"], queued_states=["PROVISIONING", "ACTIVE"])
    tpu(*create)  # still queued: waits for it, does not queue a second request
    assert verbs(gcloud.calls()) == ["tpu-vm describe", *["queued-resources describe"] * 2]

    # A Spot VM of a queued resource reclaimed: PREEMPTED, its request SUSPENDED.
    gcloud.set(nodes={"mtop": node("v4-32", "PREEMPTED")},
               queued={"mtop-qr": {"state": {"state": "SUSPENDED"}, "nodeId": "mtop",
                                   "acceleratorType": "v4-32"}},
               queued_states=["ACCEPTED", "ACTIVE"])
    tpu(*create)
    assert gcloud.calls()[2:4] == ["queued-resources delete mtop-qr --force --quiet",
                                   QUEUED_CREATE]
    assert gcloud.state()["nodes"]["mtop"]["state"] == "READY"


def test_a_dead_vm_made_without_a_queue_is_deleted_directly(gcloud):
    gcloud.set(nodes={"mtop": node("v4-32", "PREEMPTED")}, queued_states=["ACTIVE"])
    tpu("create", "--queued", "--poll-seconds", "0", "--accelerator-type", "v4-32", "--spot")
    assert gcloud.calls() == ["tpu-vm describe mtop --format=json",
                              "queued-resources describe mtop-qr --format=json",
                              "tpu-vm delete mtop --quiet", QUEUED_CREATE,
                              "queued-resources describe mtop-qr --format=json"]


def test_watch_recreates_after_a_preemption_until_the_run_exits(gcloud, capsys):
    gcloud.set(preempt_runs=1)  # the first training start ends with the VM PREEMPTED
    watch = ["watch", "--accelerator-type", "v4-32", "--spot", "--poll-seconds", "0",
             "--repo", REPO, "--workdir", WORKDIR]
    tpu(*watch)
    all_ = ["tpu-vm describe", "tpu-vm create", "tpu-vm ssh:setup", "tpu-vm describe",
            "tpu-vm ssh:train"]
    calls = gcloud.calls()
    assert verbs(calls) == [*all_,
                            "tpu-vm describe",  # PREEMPTED: all again, create deletes it
                            "tpu-vm describe", "tpu-vm delete", *all_[1:],
                            "tpu-vm describe", "tpu-vm ssh:status"]  # READY, EXITED 0
    trains = [c for c in calls if "mtop-jax train" in c]
    assert trains[0] == trains[1] and "MTOP_JAX_DISTRIBUTED=1" in trains[0]
    assert "mtop is PREEMPTED: restart 1" in capsys.readouterr().out

    # The trainer gone on a READY VM (rebooted) twice in a row: run again; a failure ends.
    gcloud.set(statuses=["RUNNING", "GONE", "GONE", "RUNNING", "EXITED 1"])
    with pytest.raises(SystemExit, match="exited with status 1: see `logs`"):
        tpu(*watch)
    status = ["tpu-vm describe", "tpu-vm ssh:status"]
    assert verbs(gcloud.calls()) == [*all_, *status * 3, "tpu-vm describe",
                                     "tpu-vm ssh:train", *status * 2]

    gcloud.set(preempt_runs=10**6)  # reclaimed every time: the deadline ends it
    with pytest.raises(SystemExit, match=r"still not finished after .* h \(\d+ restart"):
        tpu(*watch, "--watch-hours", "0.0002")


# ---------------------------------------------------------------------------- worker Python


sys.path.insert(0, str(LAUNCH))
import check_constraints  # noqa: E402


def test_workers_get_python_3_12_and_the_constraints():
    setup = (LAUNCH / "remote_setup.sh").read_text()
    assert "PY=3.12" in setup and 'uv venv --python "$PY" .venv' in setup
    assert "apt-get" not in setup and "python3.11" not in setup
    installs = [line for line in setup.splitlines() if line.startswith("uv pip install")]
    assert len(installs) == 2 and all('-c "$CONSTRAINTS"' in line for line in installs)
    # mtop-jax with its gcs extra (gcsfs, google-cloud-storage), under the worker-only pins
    assert '-c "$GCS_CONSTRAINTS"' in installs[0] and '-e ".[gcs]"' in setup
    assert "GCS_CONSTRAINTS=launch/constraints-gcs.txt" in setup
    assert '.venv/bin/python launch/check_constraints.py "$CONSTRAINTS" "$GCS_CONSTRAINTS"' \
        in setup


def test_worker_only_pins_cover_the_gcs_extra():
    """constraints-gcs.txt pins what the gcs extra adds: nothing constraints.txt pins
    (two pins of one package could disagree), and versions the extra accepts."""
    import tomllib
    from packaging.requirements import Requirement

    pins = check_constraints.read_pins(LAUNCH / "constraints.txt")
    gcs = check_constraints.read_pins(LAUNCH / "constraints-gcs.txt")
    assert not set(pins) & set(gcs)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for line in extras["gcs"]:
        req = Requirement(line)
        name = check_constraints.canonical(req.name)
        assert name in gcs and gcs[name] in req.specifier, line
    assert {"gcsfs", "google-cloud-storage"} <= set(gcs)
    assert check_constraints.DEFAULT_FILES == ("constraints.txt", "constraints-gcs.txt")


def test_constraints_pin_this_venv_and_agree_with_pyproject():
    from importlib import metadata

    from packaging.specifiers import SpecifierSet

    pins = check_constraints.read_pins(LAUNCH / "constraints.txt")
    assert "mtop-jax" not in pins and {"jax", "jaxlib", "flax"} <= set(pins)
    assert pins["jax"] == metadata.version("jax")  # the jax the tests run on
    jax_needs = SpecifierSet(metadata.metadata("jax")["Requires-Python"])
    [line] = [ln for ln in (ROOT / "pyproject.toml").read_text().splitlines()
              if ln.startswith("requires-python")]
    ours = SpecifierSet(line.split("=", 1)[1].split("#")[0].strip().strip('"'))
    # Every Python our metadata admits, jax admits too (3.10 would not install jax).
    for minor in range(9, 16):
        if f"3.{minor}.0" in ours:
            assert f"3.{minor}.0" in jax_needs, f"requires-python admits 3.{minor}"
    assert "3.12.0" in ours and "3.12.0" in jax_needs  # the workers' Python


def test_check_constraints_finds_a_wrong_or_missing_package(tmp_path):
    pins = {"jax": "0.10.2", "flax": "0.12.8", "gone": "1.0"}
    have = {"jax": "0.10.2", "jaxlib": "0.10.2", "flax": "0.12.7", "optax": "0.2.8"}
    assert check_constraints.problems(pins, have) == [
        "flax: 0.12.7 installed, constraints say 0.12.8",
        "orbax-checkpoint: not installed"]
    assert check_constraints.canonical("Orbax_Checkpoint") == "orbax-checkpoint"
    # This venv satisfies the committed file; a changed pin makes the script fail.
    script = [sys.executable, str(LAUNCH / "check_constraints.py")]
    ok = subprocess.run(script, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "constraints.txt"
    bad.write_text((LAUNCH / "constraints.txt").read_text().replace(
        f"jax=={pins['jax']}\n", "jax==0.0.1\n"))
    out = subprocess.run([*script, str(bad)], capture_output=True, text=True)
    assert out.returncode == 1 and "jax: 0.10.2 installed, constraints say 0.0.1" in out.stderr


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
    import time

    fake = tmp_path / "mtop-jax" / ".venv" / "bin" / "mtop-jax"
    fake.parent.mkdir(parents=True)
    fake.write_text('#!/bin/sh\necho "train args: $*; distributed=$MTOP_JAX_DISTRIBUTED"\n'
                    "exec sleep 60\n")
    fake.chmod(0o755)
    common = ["--dry-run", "--name", "mtop", "--zone", "z"]
    run = shlex.split(launcher("run", *common, "--accelerator-type", "v4-32", "--workdir",
                               WORKDIR, "--", "--config.data.buckets=(64, 128)")[-1])[-1]
    stop = shlex.split(launcher("stop", *common)[0])[-1]
    env = {**os.environ, "HOME": str(tmp_path)}

    def remote(command: str) -> str:
        return subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, check=True,
                              capture_output=True, text=True, timeout=30).stdout

    assert remote(run).endswith(": started\n")
    pid = int((tmp_path / "mtop-jax-train.pid").read_text())
    try:
        assert f"already training (pid {pid})" in remote(run)
        assert remote(tpu_vm.STATUS_COMMAND) == "RUNNING\n"
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
        for _ in range(100):
            if (tmp_path / "mtop-jax-train.exit").exists():
                break
            time.sleep(0.05)
        assert remote(tpu_vm.STATUS_COMMAND) == "EXITED 143\n"  # sleep killed by SIGTERM
        (tmp_path / "mtop-jax-train.exit").unlink()
        assert remote(tpu_vm.STATUS_COMMAND) == "GONE\n"
    finally:
        subprocess.run(["kill", "-9", str(pid)], capture_output=True)

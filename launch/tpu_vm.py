#!/usr/bin/env python3
"""Cloud TPU VMs for mtop-jax: create, set up, train on every worker, logs, fetch, delete.

    python launch/tpu_vm.py create --name mtop --zone us-central2-b --accelerator-type v4-8
    python launch/tpu_vm.py setup  --name mtop --zone us-central2-b --repo https://host/mtop-jax.git
    python launch/tpu_vm.py run    --name mtop --zone us-central2-b --accelerator-type v4-8 \\
        --config configs/debian_packages.py --workdir gs://BUCKET/runs/demo \\
        -- --config.train.steps=2000
    python launch/tpu_vm.py logs   --name mtop --zone us-central2-b
    python launch/tpu_vm.py fetch  --name mtop --zone us-central2-b --workdir gs://BUCKET/runs/demo
    python launch/tpu_vm.py delete --name mtop --zone us-central2-b

``all`` does create, setup and run in one go; ``watch`` does ``all`` and then
again after every preemption until the training exits. ``--queued`` goes
through a queued resource; ``--spot``, ``--autocheckpoint`` and friends pass
through to gcloud. ``run`` takes the accelerator and the worker count from
``describe --format=json``, never from a default. ``--dry-run`` prints every
command (one a line, shell-quoted) and runs none. Every subcommand is safe to
re-run: ``create`` and ``delete`` look first (``describe``; a PREEMPTED or
TERMINATED VM is deleted and created again), ``setup`` pulls or re-copies and
reinstalls into the existing venv, ``run`` does nothing on a worker whose
training is still alive, and a restarted run resumes from the workdir's latest
checkpoint. See launch/README.md (none of this has run on real TPUs; the tests
use a fake gcloud).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: The TPU software version (``--version``) for JAX, per generation (Cloud TPU docs).
RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}

#: Short names people use -> the accelerator type gcloud wants.
ALIASES = {"v5e": "v5litepod"}

LIBTPU_INDEX = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"
REMOTE_DIR = "mtop-jax"  # in the home directory of every worker
LOG = "~/mtop-jax-train.log"
PIDFILE = "~/mtop-jax-train.pid"
EXITFILE = "~/mtop-jax-train.exit"
#: Runs the trainer ("$@") in the background of a nohup'd bash that records its pid (for
#: ``stop`` and the liveness check) and, once it ends, its exit status (for ``watch``:
#: finished, failed, or gone with its VM's reboot).
WRAPPER = ('"$@" & echo $! > "$HOME/mtop-jax-train.pid"; wait $!; '
           'echo $? > "$HOME/mtop-jax-train.exit"')


@dataclass(frozen=True)
class Accelerator:
    generation: str  # v4, v5litepod, v5p, v6e
    size: int  # the number in the type: TensorCores (v4, v5p) or chips (v5e, v6e)

    @property
    def type(self) -> str:
        return f"{self.generation}-{self.size}"

    @property
    def chips(self) -> int:
        return self.size // 2 if self.generation in ("v4", "v5p") else self.size

    @property
    def hosts(self) -> int:
        """TPU VM workers: 4 chips a host on slices of more than one host; v5e and v6e
        fit up to 8 chips on one host."""
        if self.generation in ("v5litepod", "v6e") and self.chips <= 8:
            return 1
        return max(1, self.chips // 4)

    @property
    def runtime_version(self) -> str:
        return RUNTIME_VERSIONS[self.generation]


def parse_accelerator(text: str) -> Accelerator:
    match = re.fullmatch(r"(v4|v5e|v5litepod|v5p|v6e)-(\d+)", text.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(
            f"accelerator type {text!r}: expected v4-N, v5e-N (= v5litepod-N), v5p-N or v6e-N")
    generation = ALIASES.get(match[1], match[1])
    return Accelerator(generation, int(match[2]))


#: What ``create`` asks for without ``--accelerator-type``.
DEFAULT_ACCELERATOR = parse_accelerator("v4-8")


# ---------------------------------------------------------------------------- commands


def gcloud_tpu(verb: str, args: argparse.Namespace, *rest: str, group: str = "tpu-vm",
               alpha: bool = False) -> list[str]:
    """``gcloud [alpha] compute tpus GROUP VERB`` + positional ``rest`` + zone, project +
    flags. ``alpha``: flags only the alpha track has (``--autocheckpoint-enabled``)."""
    positional = [r for r in rest if not r.startswith("-")]
    flags = [r for r in rest if r.startswith("-")]
    if positional != list(rest[:len(positional)]):
        raise ValueError(f"positional arguments first: {rest}")
    cmd = ["gcloud", *(["alpha"] if alpha else []), "compute", "tpus", group, verb,
           *positional, f"--zone={args.zone}"]
    if args.project:
        cmd.append(f"--project={args.project}")
    return cmd + flags


def ssh(args: argparse.Namespace, worker: str, command: str) -> list[str]:
    return [*gcloud_tpu("ssh", args, args.name, f"--worker={worker}"), "--command", command]


def describe(args: argparse.Namespace) -> list[str]:
    """JSON, not one field: the state, ``acceleratorType`` and one ``networkEndpoints``
    entry per worker are what ``create``, ``run`` and ``watch`` act on."""
    return gcloud_tpu("describe", args, args.name, "--format=json")


def queued_id(args: argparse.Namespace) -> str:
    return f"{args.name}-qr"


def describe_queued(args: argparse.Namespace) -> list[str]:
    return gcloud_tpu("describe", args, queued_id(args), "--format=json",
                      group="queued-resources")


def creation_flags(args: argparse.Namespace) -> list[str]:
    """The flags ``tpu-vm create`` and ``queued-resources create`` share (gcloud docs)."""
    flags = []
    if args.spot:
        flags.append("--spot")
    if args.reserved:
        flags.append("--reserved")
    if args.autocheckpoint:
        flags.append("--autocheckpoint-enabled")
    if args.service_account:
        flags.append(f"--service-account={args.service_account}")
    if args.internal_ips:
        flags.append("--internal-ips")
    if args.labels:
        flags.append(f"--labels={args.labels}")
    return flags


def create_commands(args: argparse.Namespace) -> list[list[str]]:
    acc = args.accelerator_type or DEFAULT_ACCELERATOR
    version = args.version or acc.runtime_version
    if args.queued:
        return [gcloud_tpu("create", args, queued_id(args), f"--node-id={args.name}",
                           f"--accelerator-type={acc.type}", f"--runtime-version={version}",
                           *creation_flags(args), group="queued-resources",
                           alpha=args.autocheckpoint)]
    return [gcloud_tpu("create", args, args.name, f"--accelerator-type={acc.type}",
                       f"--version={version}", *creation_flags(args), alpha=args.autocheckpoint)]


def is_git_url(repo: str) -> bool:
    return "://" in repo or repo.startswith("git@") or repo.endswith(".git")


def setup_commands(args: argparse.Namespace) -> list[list[str]]:
    """Code onto every worker (clone or pull; or a tarball of a local checkout), then
    ``launch/remote_setup.sh`` there: a Python 3.12 venv (uv) with the TPU jax wheel
    and the ``gcs`` extra, installed under ``launch/constraints.txt`` and
    ``launch/constraints-gcs.txt``."""
    install = f"bash {REMOTE_DIR}/launch/remote_setup.sh"
    if args.python:
        install += f" --python {shlex.quote(args.python)}"
    if is_git_url(args.repo):
        url = shlex.quote(args.repo)
        branch = f" --branch {shlex.quote(args.branch)}" if args.branch else ""
        get = (f"if [ -d {REMOTE_DIR}/.git ]; then git -C {REMOTE_DIR} pull --ff-only; "
               f"else git clone{branch} {url} {REMOTE_DIR}; fi")
        return [ssh(args, "all", f"set -e; {get}; {install}")]
    local = Path(args.repo).expanduser().resolve()
    tarball = f"/tmp/{args.name}-mtop-jax.tar.gz"
    excludes = [f"--exclude={p}" for p in (".git", ".venv", "workdirs", "*.egg-info",
                                           "__pycache__", ".pytest_cache", ".ruff_cache")]
    return [
        ["tar", "-czf", tarball, *excludes, "-C", str(local), "."],
        gcloud_tpu("scp", args, tarball, f"{args.name}:mtop-jax.tar.gz", "--worker=all"),
        ssh(args, "all", f"set -e; mkdir -p {REMOTE_DIR}; "
                         f"tar -xzf mtop-jax.tar.gz -C {REMOTE_DIR}; {install}"),
    ]


def train_command(args: argparse.Namespace, hosts: int) -> str:
    """The command line every worker runs (in ``~/mtop-jax``); ``hosts`` from describe."""
    train = shlex.join([".venv/bin/mtop-jax", "train", "--config", args.config,
                        "--workdir", args.workdir, *args.overrides])
    env = "MTOP_JAX_DISTRIBUTED=1 " if hosts > 1 else ""
    return (f"cd {REMOTE_DIR} && if [ -f {PIDFILE} ] && kill -0 $(cat {PIDFILE}) 2>/dev/null; "
            f"then echo \"$(hostname): already training (pid $(cat {PIDFILE}))\"; "
            f"else rm -f {PIDFILE} {EXITFILE}; {env}nohup bash -c {shlex.quote(WRAPPER)} "
            f"mtop-jax-train {train} >> {LOG} 2>&1 < /dev/null & "
            f"for _ in $(seq 100); do [ -s {PIDFILE} ] && break; sleep 0.1; done; "
            f"echo \"$(hostname): started\"; fi")


def run_commands(args: argparse.Namespace, acc: Accelerator, hosts: int) -> list[list[str]]:
    if hosts > 1 and not args.workdir.startswith("gs://"):
        raise SystemExit(f"tpu_vm.py run: {acc.type} has {hosts} hosts; "
                         "all of them write the checkpoint, so --workdir must be shared: "
                         "gs://BUCKET/PATH")
    return [ssh(args, "all", train_command(args, hosts))]


#: What worker 0 prints for ``watch``: RUNNING, ``EXITED <status>``, or GONE (no live
#: process and no status: killed with the VM, or never started).
STATUS_COMMAND = (f"if [ -f {PIDFILE} ] && kill -0 $(cat {PIDFILE}) 2>/dev/null; "
                  f"then echo RUNNING; elif [ -f {EXITFILE} ]; "
                  f"then echo \"EXITED $(cat {EXITFILE})\"; else echo GONE; fi")


def logs_commands(args: argparse.Namespace) -> list[list[str]]:
    tail = ["tail", "-n", str(args.lines), *(["-F"] if args.follow else []), LOG]
    return [ssh(args, str(args.worker), " ".join(tail))]


def stop_commands(args: argparse.Namespace) -> list[list[str]]:
    """SIGTERM on every worker: the trainer saves a checkpoint and exits."""
    return [ssh(args, "all", f"if [ -f {PIDFILE} ]; then kill -TERM $(cat {PIDFILE}) "
                             f"2>/dev/null || true; fi")]


def fetch_commands(args: argparse.Namespace) -> list[list[str]]:
    """The workdir (every kept checkpoint), or with ``--step`` its model files, metrics and
    that one checkpoint, into ``--dest``/<workdir's name> here. Every copy targets an
    existing parent directory, so a second fetch overwrites instead of nesting."""
    remote = args.workdir.rstrip("/")
    here = f"{args.dest.rstrip('/') or '.'}/{remote.rsplit('/', 1)[-1]}"
    on_gcs = remote.startswith("gs://")
    if not on_gcs:
        remote = f"{args.name}:{REMOTE_DIR}/{remote}"

    def copy(sources: list[str], target: str) -> list[str]:
        if on_gcs:
            return ["gcloud", "storage", "cp", "-r", *sources, target]
        return gcloud_tpu("scp", args, *sources, target, "--worker=0", "--recurse")

    if args.step is None:
        return [["mkdir", "-p", args.dest], copy([remote], f"{args.dest.rstrip('/')}/")]
    files = [f"{remote}/{f}" for f in ("config.json", "model.json", "metrics.jsonl", "tokenizer")]
    return [["mkdir", "-p", f"{here}/checkpoints"],
            copy(files, f"{here}/"),
            copy([f"{remote}/checkpoints/{args.step}"], f"{here}/checkpoints/")]


def delete_commands(args: argparse.Namespace) -> list[list[str]]:
    return [gcloud_tpu("delete", args, args.name, "--quiet")]


# ---------------------------------------------------------------------------- running

#: Node states after which the VM never runs again: delete it and create it anew.
DEAD_STATES = ("PREEMPTED", "TERMINATED")
#: Queued-resource states that will not become ACTIVE without a new request.
QUEUED_FAILED = ("FAILED", "SUSPENDED", "SUSPENDING")


class Runner:
    """Runs (or with ``dry_run`` prints) the gcloud commands; every call goes through it."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run

    def __call__(self, cmd: list[str], check: bool = True) -> int:
        print(shlex.join(cmd) if self.dry_run else f"+ {shlex.join(cmd)}", flush=True)
        if self.dry_run:
            return 0
        rc = subprocess.run(cmd).returncode
        if check and rc:
            raise SystemExit(f"tpu_vm.py: command failed (exit {rc}): {shlex.join(cmd)}")
        return rc

    def query(self, cmd: list[str]) -> dict | None:
        """A ``describe --format=json``: the resource, or None if gcloud says it does not
        exist (any other failure stops, so a broken login is not read as "absent"). A dry
        run prints the command and answers None."""
        if self.dry_run:
            print(shlex.join(cmd), flush=True)
            return None
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            if "NOT_FOUND" in out.stderr or "not found" in out.stderr.lower():
                return None
            raise SystemExit(f"tpu_vm.py: {shlex.join(cmd)} failed (exit {out.returncode}):"
                             f" {out.stderr.strip()}")
        return json.loads(out.stdout)

    def output(self, cmd: list[str]) -> str | None:
        """stdout of a command, None if it failed (an ssh to a VM being reclaimed)."""
        print(shlex.join(cmd) if self.dry_run else f"+ {shlex.join(cmd)}", flush=True)
        if self.dry_run:
            return None
        out = subprocess.run(cmd, capture_output=True, text=True)
        return out.stdout if out.returncode == 0 else None


def node_state(node: dict | None) -> str:
    return "ABSENT" if node is None else str(node.get("state", "STATE_UNSPECIFIED"))


def queued_state(resource: dict | None) -> str:
    """``state`` of a queued resource is an object: ``{"state": "ACTIVE", ...}``."""
    if resource is None:
        return "ABSENT"
    state = resource.get("state", {})
    return str(state.get("state", "STATE_UNSPECIFIED") if isinstance(state, dict) else state)


def node_shape(node: dict) -> tuple[Accelerator, int]:
    """The accelerator and the worker count as the VM reports them: ``acceleratorType``
    and one ``networkEndpoints`` entry per worker."""
    try:
        acc = parse_accelerator(node["acceleratorType"])
    except (KeyError, argparse.ArgumentTypeError) as e:
        raise SystemExit(f"tpu_vm.py: describe gave no usable acceleratorType: {e}") from None
    endpoints = node.get("networkEndpoints") or []
    return acc, max(1, len(endpoints))


def wait_queued(args: argparse.Namespace, run: Runner) -> None:
    """Poll the queued resource until ACTIVE; FAILED/SUSPENDED or ``--queued-timeout``
    stop with an error (a request that waits forever would bill nothing but block)."""
    deadline = time.monotonic() + args.queued_timeout
    while True:
        state = queued_state(run.query(describe_queued(args)))
        if run.dry_run or state == "ACTIVE":
            return
        print(f"# {queued_id(args)}: {state}", flush=True)
        if state in QUEUED_FAILED or state == "ABSENT":
            raise SystemExit(f"tpu_vm.py: queued resource {queued_id(args)} is {state}; "
                             f"see `gcloud compute tpus queued-resources describe "
                             f"{queued_id(args)} --zone={args.zone}`, then delete and retry")
        if time.monotonic() >= deadline:
            raise SystemExit(f"tpu_vm.py: queued resource {queued_id(args)} still {state} "
                             f"after {args.queued_timeout:.0f} s (--queued-timeout); it stays "
                             "queued: `delete --queued` to withdraw it")
        time.sleep(args.poll_seconds)


def delete_vm(args: argparse.Namespace, run: Runner, queued: bool) -> None:
    """Delete the VM, or the queued resource and (``--force``) its VM."""
    if queued:
        run(gcloud_tpu("delete", args, queued_id(args), "--force", "--quiet",
                       group="queued-resources"))
    else:
        run(gcloud_tpu("delete", args, args.name, "--quiet"))


def do_create(args: argparse.Namespace, run: Runner) -> None:
    node = run.query(describe(args))
    state = node_state(node)
    request = queued_state(run.query(describe_queued(args))) if args.queued else "ABSENT"
    if state == "ABSENT" and request in ("WAITING_FOR_RESOURCES", "PROVISIONING", "ACCEPTED",
                                         "CREATING"):
        print(f"# {queued_id(args)} is already queued ({request}): waiting", flush=True)
        wait_queued(args, run)
        return
    if state == "ABSENT" and request != "ABSENT":
        delete_vm(args, run, queued=True)  # FAILED, SUSPENDED, or ACTIVE without its VM
    if node is not None:
        acc, _ = node_shape(node)
        if args.accelerator_type is not None and acc != args.accelerator_type:
            raise SystemExit(f"tpu_vm.py create: {args.name} exists as {acc.type}, not "
                             f"{args.accelerator_type.type}: delete it first")
        if state not in DEAD_STATES:
            print(f"# {args.name} already exists ({state}): not creating it", flush=True)
            return
        print(f"# {args.name} is {state}: it never runs again; deleting and recreating it",
              flush=True)
        delete_vm(args, run, queued=request != "ABSENT")  # the request takes its VM along
    for cmd in create_commands(args):
        run(cmd)
    if args.queued:
        wait_queued(args, run)


def do_delete(args: argparse.Namespace, run: Runner) -> None:
    if args.queued:
        if queued_state(run.query(describe_queued(args))) == "ABSENT":
            print(f"# {queued_id(args)} does not exist: nothing to delete", flush=True)
            return
    elif run.query(describe(args)) is None and not run.dry_run:
        print(f"# {args.name} does not exist: nothing to delete", flush=True)
        return
    delete_vm(args, run, queued=args.queued)


def simple(build: Callable[[argparse.Namespace], list[list[str]]]
           ) -> Callable[[argparse.Namespace, Runner], None]:
    """A subcommand that runs the commands ``build`` makes, one after the other."""
    def do(args: argparse.Namespace, run: Runner) -> None:
        for cmd in build(args):
            run(cmd)
    return do


def do_run(args: argparse.Namespace, run: Runner) -> None:
    """Train on the VM as ``describe`` reports it: its accelerator and worker count decide
    MTOP_JAX_DISTRIBUTED and the gs:// check, never a default. ``--accelerator-type``
    is a check: a mismatch stops. A dry run cannot describe, so there it is needed."""
    node = run.query(describe(args))
    if run.dry_run:
        if args.accelerator_type is None:
            raise SystemExit("tpu_vm.py run --dry-run: cannot describe the VM; "
                             "pass --accelerator-type")
        acc, hosts = args.accelerator_type, args.accelerator_type.hosts
    else:
        if node_state(node) != "READY":
            raise SystemExit(f"tpu_vm.py run: {args.name} is {node_state(node)}, not READY"
                             + (" (`create` deletes and recreates it)"
                                if node_state(node) in DEAD_STATES else ""))
        acc, hosts = node_shape(node)
        if args.accelerator_type is not None and args.accelerator_type != acc:
            raise SystemExit(f"tpu_vm.py run: --accelerator-type "
                             f"{args.accelerator_type.type} but {args.name} is {acc.type} "
                             f"({hosts} workers) according to describe; drop the flag or "
                             "use the right VM")
        print(f"# {args.name}: {acc.type}, {hosts} worker(s)", flush=True)
    for cmd in run_commands(args, acc, hosts):
        run(cmd)


def do_all(args: argparse.Namespace, run: Runner) -> None:
    if run.dry_run and args.accelerator_type is None:
        args.accelerator_type = DEFAULT_ACCELERATOR  # what create would make
    do_create(args, run)
    simple(setup_commands)(args, run)
    do_run(args, run)


def do_watch(args: argparse.Namespace, run: Runner) -> None:
    """``all``, then until the training exits or ``--watch-hours`` pass: a VM found
    PREEMPTED/TERMINATED (or gone) is deleted, created, set up and the run started again;
    the trainer resumes from the workdir's latest checkpoint."""
    if run.dry_run:
        raise SystemExit("tpu_vm.py watch: loops on live state; use `all --dry-run`")
    deadline = time.monotonic() + args.watch_hours * 3600
    do_all(args, run)
    restarts = gone = 0
    while time.monotonic() < deadline:
        time.sleep(args.poll_seconds)
        state = node_state(run.query(describe(args)))
        if state in (*DEAD_STATES, "ABSENT"):
            restarts += 1
            print(f"# {args.name} is {state}: restart {restarts}", flush=True)
            try:  # create deletes the dead VM (and its request), waits on a queued one
                do_all(args, run)
            except SystemExit as e:  # no Spot capacity now, ssh not up yet: try again
                print(f"# restart {restarts} failed ({e}); trying again", flush=True)
            continue
        if state != "READY":
            continue  # CREATING, REPAIRING, ...: look again later
        status = (run.output(ssh(args, "0", STATUS_COMMAND)) or "").strip()
        gone = gone + 1 if status == "GONE" else 0
        if status == "EXITED 0":
            print(f"# training on {args.name} has finished ({restarts} restart(s)); "
                  "see `logs`, then `fetch` and `delete`", flush=True)
            return
        if status.startswith("EXITED"):
            raise SystemExit(f"tpu_vm.py watch: training on {args.name} exited with status "
                             f"{status.split()[-1]}: see `logs`; not restarting a failure")
        if gone >= 2:  # twice: not the moment between the trainer's end and its status
            restarts += 1
            print(f"# training on {args.name} is gone (VM restarted?): run {restarts}",
                  flush=True)
            try:
                do_run(args, run)
            except SystemExit as e:
                print(f"# run failed ({e}); trying again", flush=True)
            gone = 0
    raise SystemExit(f"tpu_vm.py watch: still not finished after {args.watch_hours} h "
                     f"({restarts} restart(s)); the VM is left as it is")


# ---------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", default="mtop-jax", help="TPU VM name (default mtop-jax)")
    common.add_argument("--zone", required=True, help="e.g. us-central2-b (v4), "
                        "us-west4-a (v5e), us-east5-a (v5p), us-east1-d (v6e)")
    common.add_argument("--project", default=None, help="default: gcloud's configured project")
    common.add_argument("--dry-run", action="store_true",
                        help="print every command instead of running it")

    accel = argparse.ArgumentParser(add_help=False)
    accel.add_argument("--accelerator-type", type=parse_accelerator, default=None,
                       help="v4-8, v4-32, v5e-16 (= v5litepod-16), v5p-8, v6e-8, ...: what "
                            "`create` asks for (default v4-8); elsewhere only a check against "
                            "what describe reports")

    create = argparse.ArgumentParser(add_help=False)
    create.add_argument("--version", default=None, help="TPU software version; default per "
                        "generation: " + ", ".join(f"{k} {v}" for k, v in RUNTIME_VERSIONS.items()))
    kind = create.add_mutually_exclusive_group()
    kind.add_argument("--spot", action="store_true", help="Spot VM: cheaper, can be preempted")
    kind.add_argument("--reserved", action="store_true", help="use the project's reservation")
    create.add_argument("--autocheckpoint", action="store_true",
                        help="--autocheckpoint-enabled (TPU autocheckpoint, gcloud alpha): "
                             "the service signals a checkpoint before maintenance")
    create.add_argument("--service-account", default=None,
                        help="the VM's service account (needs write access to the bucket)")
    create.add_argument("--internal-ips", action="store_true",
                        help="no external IPs (VPC with Cloud NAT / Private Google Access)")
    create.add_argument("--labels", default=None, help="KEY=VALUE,... on the VM (billing)")
    create.add_argument("--queued-timeout", type=float, default=3600.0,
                        help="with --queued: seconds to wait for ACTIVE (default 3600)")

    queue = argparse.ArgumentParser(add_help=False)
    queue.add_argument("--queued", action="store_true",
                       help="through a queued resource (NAME-qr): create waits in the queue "
                            "until ACTIVE; delete removes the request and its VM")
    queue.add_argument("--poll-seconds", type=float, default=30.0,
                       help="seconds between describe calls while waiting (default 30)")

    setup = argparse.ArgumentParser(add_help=False)
    setup.add_argument("--repo", default=str(ROOT),
                       help="git URL to clone on every worker, or a local checkout to copy "
                            "(default: this one)")
    setup.add_argument("--branch", default=None, help="with a git URL: the branch to clone")
    setup.add_argument("--python", default=None,
                       help="the Python (>= 3.11) for the workers' venv, as `uv venv "
                            "--python` takes it (default 3.12; uv downloads it if absent)")

    run = argparse.ArgumentParser(add_help=False)
    run.add_argument("--config", default="configs/debian_packages.py")
    run.add_argument("--workdir", required=True,
                     help="gs://BUCKET/PATH (required on multi-host slices), or a path on the "
                          "worker relative to ~/mtop-jax (one host)")

    parser = argparse.ArgumentParser(
        prog="tpu_vm.py", description=__doc__.split("\n\n")[0],
        epilog="Training overrides follow '--': ... -- --config.train.steps=100",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, func, parents, help_):
        p = sub.add_parser(name, parents=[common, *parents], help=help_)
        p.set_defaults(func=func)
        return p

    add("create", do_create, [accel, create, queue],
        "create the TPU VM or slice (if absent; PREEMPTED/TERMINATED: delete and recreate)")
    add("setup", simple(setup_commands), [setup], "code + venv + jax[tpu] on every worker")
    add("run", do_run, [accel, run], "start `mtop-jax train` on every worker")
    p = add("logs", simple(logs_commands), [], "the training log of one worker")
    p.add_argument("--worker", default=0, help="worker number (default 0, the one that logs)")
    p.add_argument("--lines", type=int, default=100)
    p.add_argument("--no-follow", dest="follow", action="store_false",
                   help="print and return instead of following the log")
    add("stop", simple(stop_commands), [], "SIGTERM the training: save and exit")
    p = add("fetch", simple(fetch_commands), [], "copy the workdir (or one checkpoint) back")
    p.add_argument("--workdir", required=True)
    p.add_argument("--dest", default="workdirs",
                   help="local directory to copy into (default workdirs): "
                        "gs://B/runs/demo lands in workdirs/demo")
    p.add_argument("--step", type=int, default=None,
                   help="only this checkpoint (with config, model files, metrics, tokenizer)")
    add("delete", do_delete, [queue], "delete the TPU VM (if present)")
    add("all", do_all, [accel, create, queue, setup, run], "create, setup and run")
    p = add("watch", do_watch, [accel, create, queue, setup, run],
            "all, then recreate + setup + run after every preemption until training exits")
    p.add_argument("--watch-hours", type=float, default=72.0,
                   help="give up (leaving the VM) after this many hours (default 72)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    args.overrides = overrides
    if overrides and args.command not in ("run", "all", "watch"):
        raise SystemExit(f"tpu_vm.py {args.command}: takes no training overrides after '--'")
    args.func(args, Runner(args.dry_run))
    return 0


if __name__ == "__main__":
    sys.exit(main())

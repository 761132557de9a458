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

``all`` does create, setup and run in one go. ``--dry-run`` prints every
command (one a line, shell-quoted) and runs none. Every subcommand is safe to
re-run: ``create`` and ``delete`` look first (``describe``), ``setup`` pulls
or re-copies and reinstalls into the existing venv, ``run`` does nothing on a
worker whose training is still alive, and a restarted run resumes from the
workdir's latest checkpoint. See launch/README.md.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
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


# ---------------------------------------------------------------------------- commands


def gcloud_tpu(verb: str, args: argparse.Namespace, *rest: str) -> list[str]:
    """``gcloud compute tpus tpu-vm VERB`` + positional ``rest`` + zone, project + flags."""
    positional = [r for r in rest if not r.startswith("-")]
    flags = [r for r in rest if r.startswith("-")]
    if positional != list(rest[:len(positional)]):
        raise ValueError(f"positional arguments first: {rest}")
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", verb, *positional, f"--zone={args.zone}"]
    if args.project:
        cmd.append(f"--project={args.project}")
    return cmd + flags


def ssh(args: argparse.Namespace, worker: str, command: str) -> list[str]:
    return [*gcloud_tpu("ssh", args, args.name, f"--worker={worker}"), "--command", command]


def describe(args: argparse.Namespace) -> list[str]:
    return gcloud_tpu("describe", args, args.name, "--format=value(state)")


def create_commands(args: argparse.Namespace) -> list[list[str]]:
    acc = args.accelerator_type
    cmd = gcloud_tpu("create", args, args.name, f"--accelerator-type={acc.type}",
                     f"--version={args.version or acc.runtime_version}")
    if args.spot:
        cmd.append("--spot")
    if args.reserved:
        cmd.append("--reserved")
    return [cmd]


def is_git_url(repo: str) -> bool:
    return "://" in repo or repo.startswith("git@") or repo.endswith(".git")


def setup_commands(args: argparse.Namespace) -> list[list[str]]:
    """Code onto every worker (clone or pull; or a tarball of a local checkout), then
    ``launch/remote_setup.sh`` there: a Python >= 3.11 venv with the TPU jax wheel."""
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


def train_command(args: argparse.Namespace) -> str:
    """The command line every worker runs (in ``~/mtop-jax``)."""
    train = shlex.join([".venv/bin/mtop-jax", "train", "--config", args.config,
                        "--workdir", args.workdir, *args.overrides])
    env = "MTOP_JAX_DISTRIBUTED=1 " if args.accelerator_type.hosts > 1 else ""
    return (f"cd {REMOTE_DIR} && if [ -f {PIDFILE} ] && kill -0 $(cat {PIDFILE}) 2>/dev/null; "
            f"then echo \"$(hostname): already training (pid $(cat {PIDFILE}))\"; "
            f"else {env}nohup {train} >> {LOG} 2>&1 < /dev/null & echo $! > {PIDFILE}; "
            f"echo \"$(hostname): started\"; fi")


def run_commands(args: argparse.Namespace) -> list[list[str]]:
    hosts = args.accelerator_type.hosts
    if hosts > 1 and not args.workdir.startswith("gs://"):
        raise SystemExit(f"tpu_vm.py run: {args.accelerator_type.type} has {hosts} hosts; "
                         "all of them write the checkpoint, so --workdir must be shared: "
                         "gs://BUCKET/PATH")
    return [ssh(args, "all", train_command(args))]


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


class Runner:
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

    def exists(self, args: argparse.Namespace, dry_answer: bool) -> bool:
        """Whether the TPU VM exists (``describe`` succeeds). A dry run prints the check
        and answers ``dry_answer``: the answer that lets the action go ahead."""
        cmd = describe(args)
        if self.dry_run:
            print(shlex.join(cmd))
            return dry_answer
        found = subprocess.run(cmd, capture_output=True, text=True)
        if found.returncode == 0:
            print(f"{args.name}: exists ({found.stdout.strip() or 'state unknown'})")
        return found.returncode == 0


def do_create(args, run: Runner) -> None:
    if run.exists(args, dry_answer=False):
        print(f"# {args.name} already exists: not creating it", flush=True)
        return
    for cmd in create_commands(args):
        run(cmd)


def do_delete(args, run: Runner) -> None:
    if not run.exists(args, dry_answer=True):
        print(f"# {args.name} does not exist: nothing to delete", flush=True)
        return
    for cmd in delete_commands(args):
        run(cmd)


def simple(build):
    def do(args, run: Runner) -> None:
        for cmd in build(args):
            run(cmd)
    return do


def do_all(args, run: Runner) -> None:
    do_create(args, run)
    simple(setup_commands)(args, run)
    simple(run_commands)(args, run)


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
    accel.add_argument("--accelerator-type", type=parse_accelerator,
                       default=parse_accelerator("v4-8"),
                       help="v4-8, v4-32, v5e-16 (= v5litepod-16), v5p-8, v6e-8, ...")

    create = argparse.ArgumentParser(add_help=False)
    create.add_argument("--version", default=None, help="TPU software version; default per "
                        "generation: " + ", ".join(f"{k} {v}" for k, v in RUNTIME_VERSIONS.items()))
    kind = create.add_mutually_exclusive_group()
    kind.add_argument("--spot", action="store_true", help="Spot VM: cheaper, can be preempted")
    kind.add_argument("--reserved", action="store_true", help="use the project's reservation")

    setup = argparse.ArgumentParser(add_help=False)
    setup.add_argument("--repo", default=str(ROOT),
                       help="git URL to clone on every worker, or a local checkout to copy "
                            "(default: this one)")
    setup.add_argument("--branch", default=None, help="with a git URL: the branch to clone")
    setup.add_argument("--python", default=None,
                       help="the Python (>= 3.11) for the workers' venv; default: the newest "
                            "python3.1x there, else python3.11 from apt")

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

    add("create", do_create, [accel, create], "create the TPU VM or slice (if absent)")
    add("setup", simple(setup_commands), [setup], "code + venv + jax[tpu] on every worker")
    add("run", simple(run_commands), [accel, run], "start `mtop-jax train` on every worker")
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
    add("delete", do_delete, [], "delete the TPU VM (if present)")
    add("all", do_all, [accel, create, setup, run], "create, setup and run")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    args.overrides = overrides
    if overrides and args.command not in ("run", "all"):
        raise SystemExit(f"tpu_vm.py {args.command}: takes no training overrides after '--'")
    args.func(args, Runner(args.dry_run))
    return 0


if __name__ == "__main__":
    sys.exit(main())

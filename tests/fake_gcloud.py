"""A fake ``gcloud`` for tests/test_launch.py: the TPU VM and queued-resource commands that
launch/tpu_vm.py uses, answering as the Cloud TPU docs describe them.

It appends its argv (JSON, one call a line) to ``$FAKE_GCLOUD_DIR/calls.jsonl`` and keeps
its world in ``$FAKE_GCLOUD_DIR/state.json``:

- ``nodes``: name -> node as ``tpu-vm describe --format=json`` prints it (``state``:
  READY, PREEMPTED, ...; ``acceleratorType``; ``networkEndpoints``, one per worker);
- ``queued``: id -> queued resource (``state``: ``{"state": "ACTIVE"}``) with its node id;
- ``workers``: accelerator type -> workers a created node gets;
- ``queued_states``: the states successive ``queued-resources describe`` calls move
  through (ACTIVE creates the node; the last one stays);
- ``preempt_runs``: how many training starts end with the node PREEMPTED;
- ``statuses``: what worker 0's status check prints, call by call (then ``EXITED 0``).

A flag the docs do not list for a command, or a missing required one, exits 2 like
gcloud's argument errors, so a wrongly built command fails the test.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(os.environ["FAKE_GCLOUD_DIR"])
STATE = ROOT / "state.json"

# gcloud reference pages (GA, and alpha for --autocheckpoint-enabled).
TPU_CREATE = {"--zone", "--project", "--accelerator-type", "--version", "--spot",
              "--reserved", "--service-account", "--internal-ips", "--labels"}
QUEUED_CREATE = {"--zone", "--project", "--accelerator-type", "--runtime-version",
                 "--node-id", "--spot", "--reserved", "--service-account", "--internal-ips",
                 "--labels", "--valid-until-duration"}
ALPHA_ONLY = {"--autocheckpoint-enabled"}


def fail(message: str, code: int = 1) -> None:
    print(f"ERROR: (gcloud) {message}", file=sys.stderr)
    sys.exit(code)


def not_found(kind: str, name: str) -> None:
    fail(f"NOT_FOUND: Resource 'projects/p/locations/z/{kind}/{name}' was not found")


def parse(argv: list[str]) -> tuple[list[str], dict[str, str | bool]]:
    positional, flags = [], {}
    it = iter(argv)
    for arg in it:
        if arg == "--command":  # ssh's command: the next argument whole
            flags[arg] = next(it)
        elif arg.startswith("--"):
            key, eq, value = arg.partition("=")
            flags[key] = value if eq else True
        else:
            positional.append(arg)
    return positional, flags


def check_flags(flags: dict, allowed: set[str], required: set[str], alpha: bool) -> None:
    allowed = allowed | (ALPHA_ONLY if alpha else set())
    unknown = set(flags) - allowed
    if unknown:
        fail(f"unrecognized arguments: {sorted(unknown)}", 2)
    missing = required - set(flags)
    if missing:
        fail(f"argument {sorted(missing)}: must be specified", 2)


def make_node(state: dict, name: str, acc: str) -> dict:
    workers = state.get("workers", {}).get(acc, 1)
    return {"name": f"projects/p/locations/z/nodes/{name}", "state": "READY",
            "acceleratorType": acc, "runtimeVersion": "tpu-ubuntu2204-base",
            "networkEndpoints": [{"ipAddress": f"10.0.0.{i + 2}", "port": 8470}
                                 for i in range(workers)]}


def main() -> None:
    argv = sys.argv[1:]
    with (ROOT / "calls.jsonl").open("a") as f:
        f.write(json.dumps(argv) + "\n")
    state = json.loads(STATE.read_text()) if STATE.exists() else {}
    nodes, queued = state.setdefault("nodes", {}), state.setdefault("queued", {})
    alpha = argv[:1] == ["alpha"]
    if alpha:
        argv = argv[1:]
    if argv[:2] != ["compute", "tpus"] or len(argv) < 5:
        fail(f"fake gcloud: unexpected command {argv}", 2)
    group, verb = argv[2], argv[3]
    positional, flags = parse(argv[4:])
    if "--zone" not in flags:
        fail("argument --zone: must be specified", 2)
    name = positional[0]

    if group == "tpu-vm" and verb == "describe":
        check_flags(flags, {"--zone", "--project", "--format"}, {"--format"}, alpha)
        if name not in nodes:
            not_found("nodes", name)
        print(json.dumps(nodes[name]))
    elif group == "tpu-vm" and verb == "create":
        check_flags(flags, TPU_CREATE, {"--accelerator-type", "--version"}, alpha)
        if name in nodes:
            fail(f"ALREADY_EXISTS: node {name} already exists")
        nodes[name] = make_node(state, name, flags["--accelerator-type"])
    elif group == "tpu-vm" and verb == "delete":
        check_flags(flags, {"--zone", "--project", "--quiet"}, set(), alpha)
        if name not in nodes:
            not_found("nodes", name)
        del nodes[name]
    elif group == "tpu-vm" and verb == "ssh":
        check_flags(flags, {"--zone", "--project", "--worker", "--command"},
                    {"--worker", "--command"}, alpha)
        node = nodes.get(name)
        if node is None or node["state"] != "READY":
            fail(f"ssh: {name} is not reachable", 255)
        command = flags["--command"]
        if "echo RUNNING" in command:  # tpu_vm.STATUS_COMMAND
            script = state.get("statuses", [])
            print(script.pop(0) if script else "EXITED 0")
        elif "mtop-jax train" in command:
            print("t1v-n-0-w-0: started")
            state["runs"] = state.get("runs", 0) + 1
            if state["runs"] <= state.get("preempt_runs", 0):
                node["state"] = "PREEMPTED"
    elif group == "queued-resources" and verb == "create":
        check_flags(flags, QUEUED_CREATE, {"--accelerator-type", "--runtime-version",
                                           "--node-id"}, alpha)
        if name in queued:
            fail(f"ALREADY_EXISTS: queued resource {name} already exists")
        queued[name] = {"name": f"projects/p/locations/z/queuedResources/{name}",
                        "state": {"state": "ACCEPTED"}, "nodeId": flags["--node-id"],
                        "acceleratorType": flags["--accelerator-type"]}
    elif group == "queued-resources" and verb == "describe":
        check_flags(flags, {"--zone", "--project", "--format"}, {"--format"}, alpha)
        if name not in queued:
            not_found("queuedResources", name)
        resource = queued[name]
        script = state.get("queued_states", [])
        if script:
            resource["state"]["state"] = script.pop(0) if len(script) > 1 else script[0]
        if resource["state"]["state"] == "ACTIVE" and resource["nodeId"] not in nodes:
            nodes[resource["nodeId"]] = make_node(state, resource["nodeId"],
                                                  resource["acceleratorType"])
        print(json.dumps({k: v for k, v in resource.items()
                          if k not in ("nodeId", "acceleratorType")}))
    elif group == "queued-resources" and verb == "delete":
        check_flags(flags, {"--zone", "--project", "--quiet", "--force"}, set(), alpha)
        if name not in queued:
            not_found("queuedResources", name)
        node = queued[name]["nodeId"]
        if node in nodes and "--force" not in flags:
            fail(f"FAILED_PRECONDITION: {name} still has node {node}; delete it or --force")
        nodes.pop(node, None)
        del queued[name]
    else:
        fail(f"fake gcloud: unexpected command {argv}", 2)
    STATE.write_text(json.dumps(state))


if __name__ == "__main__":
    main()

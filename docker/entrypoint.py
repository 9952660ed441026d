"""Entry point of the deepreduce-pi image: the first argument (or $PI_ROLE) picks the role.

    dealer              pi-dealer on $PI_HOST:$PI_PORT (default 0.0.0.0:7001)
    server              pi-server on $PI_HOST:$PI_PORT (default 0.0.0.0:7000) with plan $PI_PLAN
                        (default: the plan baked in with --build-arg PLAN=..., else /plan/model.plan)
                        and dealer $PI_DEALER (default dealer:7001)
    client              the demo client: pi-client infer on every image in $PI_IMAGES (default
                        /data/images) against $PI_SERVER (default server:7000), $PI_BATCH_SIZE images
                        per session (default 4); prints each prediction and ends with one line
                        `summary: secure==plaintext K/N, accuracy A/N, median S s/image`. The
                        plaintext comparison needs $PI_CHECK_PLAN (the demo mounts the same plan:
                        a real client has no weights; without it the summary says `unchecked`).
    health              the container's health check (Dockerfile HEALTHCHECK): the dealer and the
                        server answer a ping on their control port; the client reaches its server
    pi-dealer|pi-server|pi-client|deepreduce ARGS...   run that command as is

Arguments after a role are added to its command line (e.g. `server --max-sessions 2`). The CLIs read
the shared token from $DEEPREDUCE_TOKEN (give every role the same one: single-operator trust; the
party links' keys are derived from it). Sessions use no port but the server's and the dealer's.
Errors are one `error: ...` line and exit code 2.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys

from deepreduce.errors import ProjectError

BAKED_PLAN = "/opt/deepreduce/model.plan"
MOUNTED_PLAN = "/plan/model.plan"
HEALTH_FILE = "/tmp/pi-role.json"
COMMANDS = ("pi-dealer", "pi-server", "pi-client", "deepreduce")


class EntryError(ProjectError):
    """The container was started with a command or plan it cannot run."""


def env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def env_int(name: str, default: int) -> int:
    text = env(name, str(default))
    if not text.isdigit() or int(text) < 1:
        raise EntryError(f"${name}={text!r} must be a positive integer")
    return int(text)


def exec_role(role: str, port: int, argv: list[str]) -> None:
    with open(HEALTH_FILE, "w") as f:  # what the health check pings
        json.dump({"role": role, "port": port}, f)
    sys.stdout.flush()
    os.execvp(argv[0], argv)


def dealer(extra: list[str]) -> None:
    port = env_int("PI_PORT", 7001)
    cmd = ["pi-dealer", "--host", env("PI_HOST", "0.0.0.0"), "--port", str(port)]
    exec_role("dealer", port, cmd + extra)


def server(extra: list[str]) -> None:
    plan = os.environ.get("PI_PLAN") or (BAKED_PLAN if os.path.isfile(BAKED_PLAN) else MOUNTED_PLAN)
    if not os.path.isfile(plan):
        raise EntryError(f"no plan at {plan}: mount one (-v $PWD/demo/model.plan:{MOUNTED_PLAN}:ro), "
                         "bake one in (docker build --build-arg PLAN=demo/model.plan) or set $PI_PLAN")
    port = env_int("PI_PORT", 7000)
    cmd = ["pi-server", "--plan", plan, "--host", env("PI_HOST", "0.0.0.0"), "--port", str(port),
           "--dealer", env("PI_DEALER", "dealer:7001")]
    exec_role("server", port, cmd + extra)


# -- the demo client ---------------------------------------------------------------------------------

def find_images(folder: str) -> list[str]:
    from client.images import image_files  # imports torch: only in the client role
    try:
        return image_files(folder, hint="mount one (-v $PWD/demo/images:/data/images:ro) or set $PI_IMAGES")
    except ValueError as exc:
        raise EntryError(str(exc)) from None


def client(extra: list[str]) -> None:
    folder, address = env("PI_IMAGES", "/data/images"), env("PI_SERVER", "server:7000")
    batch = env_int("PI_BATCH_SIZE", 4)
    paths = find_images(folder)
    check_plan = os.environ.get("PI_CHECK_PLAN")
    if check_plan and not os.path.isfile(check_plan):
        raise EntryError(f"$PI_CHECK_PLAN {check_plan} does not exist")
    with open(HEALTH_FILE, "w") as f:
        json.dump({"role": "client", "server": address}, f)
    info = pi_client(["info", "--server", address, "--json"])
    print(f"classifying {len(paths)} images on {address} (plan {info['plan_hash'][:12]}), "
          f"{batch} per session ...", flush=True)
    secure = pi_client(["infer", "--server", address, "--json", "--batch-size", str(batch), *extra, *paths])
    plain = None
    if check_plan:
        from secure.core.plaintext import predict_files
        from secure.core.plan import SecurePlan  # imports torch
        plain = predict_files(SecurePlan.load(check_plan), paths)
    print(summary(paths, folder, info["classes"], secure, plain), flush=True)


def pi_client(args: list[str]) -> dict:
    done = subprocess.run(["pi-client", *args], capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise EntryError(f"pi-client {args[0]} failed: {lines[-1] if lines else f'exit code {done.returncode}'}")
    return json.loads(done.stdout)


def summary(paths: list[str], root: str, classes: list[str], secure: dict, plain: list[dict] | None) -> str:
    from client.images import true_label
    same = correct = 0
    width = max(len(os.path.relpath(p, root)) for p in paths)
    print(f"{'image':<{width}}  {'true':<11} {'secure':<18} plaintext")
    for i, (path, s) in enumerate(zip(paths, secure["images"])):
        label = true_label(path, root, classes)
        p = plain[i] if plain else None
        correct += s["class_name"] == label
        shown = "" if p is None else f"{p['class_name']} {p['probability']:.2f}"
        if p is not None:
            same += s["class_index"] == p["class_index"]
            shown += "" if s["class_index"] == p["class_index"] else "  MISMATCH"
        print(f"{os.path.relpath(path, root):<{width}}  {label or '?':<11} "
              f"{s['class_name'] + ' ' + format(s['probability'], '.2f'):<18} {shown}".rstrip())
    lat = secure["latency"]
    print(f"latency: total {lat['total_s']:.1f} s for {len(paths)} images in {lat['sessions']} session(s); "
          f"online {lat['online_s']:.2f} s/image, sent {lat['mb_sent']:.1f} MB, "
          f"received {lat['mb_received']:.1f} MB, {lat['rounds']} rounds")
    per_image = [s["total_s"] / s["images"] for s in secure["sessions"]]
    n = len(paths)
    agreement = f"{same}/{n}" if plain else "unchecked"
    return (f"summary: secure==plaintext {agreement}, accuracy {correct}/{n}, "
            f"median {statistics.median(per_image):.2f} s/image")


# -- health ---------------------------------------------------------------------------------------------

def health() -> None:
    """dealer: its control port accepts connections (it is ready once it listens); server, and client
    (its server): `pi-client info` succeeds, i.e. the server has loaded its plan, checked its dealer
    and completes a control request, TLS handshake included."""
    try:
        with open(HEALTH_FILE) as f:
            state = json.load(f)
    except (OSError, ValueError):
        raise EntryError("the role has not started yet") from None
    if state["role"] == "dealer":
        try:
            socket.create_connection(("127.0.0.1", state["port"]), timeout=5).close()
        except OSError as exc:
            raise EntryError(f"the dealer's port {state['port']} does not answer ({exc})") from None
        return
    address = state["server"] if state["role"] == "client" else f"127.0.0.1:{state['port']}"
    pi_client(["info", "--server", address, "--json", "--connect-timeout", "3", "--timeout", "8"])


USAGE = __doc__


def main(argv: list[str]) -> int:
    role, extra = (argv[0], argv[1:]) if argv else (os.environ.get("PI_ROLE", "help"), [])
    try:
        if role in COMMANDS:
            os.execvp(role, [role, *extra])
        elif role == "dealer":
            dealer(extra)
        elif role == "server":
            server(extra)
        elif role == "client":
            client(extra)
        elif role == "health":
            health()
        elif role in ("help", "-h", "--help"):
            print(USAGE)
        else:
            raise EntryError(f"unknown role {role!r}: use dealer, server, client, health, "
                             "or one of pi-dealer, pi-server, pi-client, deepreduce")
    except Exception as exc:
        if not isinstance(exc, EntryError) and type(exc).__name__ != "UserError":
            raise
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

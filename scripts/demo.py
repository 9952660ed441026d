"""`make demo`: secure inference end to end on the shipped plan and images, checked against plaintext.

Starts pi-dealer and pi-server on free 127.0.0.1 ports (single-operator trust: a fresh random token in
their environment, from which every role's TLS key is derived), runs pi-client on every image, compares each secure prediction with the true label
(the parent folder's name, or the file name's prefix as in ``cat_0123.png``) and with the plaintext prediction of the same plan, stops everything it started
(also on Ctrl-C or failure) and ends with one line:

    summary: secure==plaintext K/N, accuracy A/N, median S s/image
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from client.images import image_files, true_label
from deepreduce.errors import ProjectError
from secure.tools.roleproc import RoleProcess

ROOT = Path(__file__).resolve().parent.parent


class DemoError(ProjectError):
    """The demo could not run end to end (a role did not start, a result disagrees)."""


def start_role(name: str, module: str, args: list[str], log_dir: str, timeout: float) -> tuple[RoleProcess, str]:
    """One long-running role (pi-dealer or pi-server) and the address it prints once it listens."""
    proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    role = RoleProcess(name, proc, log_dir)
    line = role.wait_for("listening on ", timeout)
    if line is None:
        role.stop()
        raise DemoError(f"{name} did not start listening: {role.tail()}")
    return role, line.split()[-1]


# One operator runs all three roles here: a fresh random shared token (secure/control/auth.py), passed in
# their environment, never on a command line; every role's TLS key is derived from it.
DEMO_TOKEN = secrets.token_hex(32)


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["DEEPREDUCE_TOKEN"] = DEMO_TOKEN
    return env


# -- images and labels --------------------------------------------------------------------------

def find_images(folder: str) -> list[str]:
    try:
        return image_files(folder, hint="pass --images DIR")
    except ValueError as exc:
        raise DemoError(str(exc)) from None


def plaintext_predictions(plan_path: str, paths: list[str], resize: bool) -> tuple[list[str], list[dict]]:
    from secure.core.plaintext import predict_files
    from secure.core.plan import SecurePlan
    plan = SecurePlan.load(plan_path)
    return plan.classes, predict_files(plan, paths, resize=resize)


# -- the demo ---------------------------------------------------------------------------------------

def run_client(server: str, paths: list[str], args) -> dict:
    cmd = [sys.executable, "-m", "client", "infer", "--server", server, "--json",
           "--batch-size", str(args.batch_size), *(["--resize"] if args.resize else []), *paths]
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        raise DemoError(f"pi-client did not finish within {args.timeout:g} s (--timeout)") from None
    if done.returncode != 0:
        raise DemoError(f"pi-client failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    return json.loads(done.stdout)


def report(paths, root, classes, secure: dict, plain: list[dict]) -> str:
    same, correct = 0, 0
    width = max(len(os.path.relpath(p, root)) for p in paths)
    print(f"{'image':<{width}}  {'true':<11} {'secure':<18} plaintext")
    for path, s, p in zip(paths, secure["images"], plain):
        label = true_label(path, root, classes)
        same += s["class_index"] == p["class_index"]
        correct += s["class_name"] == label
        mark = "" if s["class_index"] == p["class_index"] else "  MISMATCH"
        print(f"{os.path.relpath(path, root):<{width}}  {label or '?':<11} {_pred(s):<18} {_pred(p):<18}{mark}".rstrip())
    lat = secure["latency"]
    print(f"latency: total {lat['total_s']:.1f} s for {len(paths)} images in {lat['sessions']} session(s); "
          f"setup {lat['setup_s']:.1f} s, online {lat['online_s']:.2f} s/image, "
          f"sent {lat['mb_sent']:.1f} MB, received {lat['mb_received']:.1f} MB, {lat['rounds']} rounds")
    if secure.get("insecure_tfp"):
        print("WARNING: INSECURE TFP mode (no dealer)")
    per_image = [s["total_s"] / s["images"] for s in secure["sessions"]]
    n = len(paths)
    return (f"summary: secure==plaintext {same}/{n}, accuracy {correct}/{n}, "
            f"median {statistics.median(per_image):.2f} s/image")


def _pred(record: dict) -> str:
    return f"{record['class_name']} {record['probability']:.2f}"


def demo(args) -> str:
    if not os.path.isfile(args.plan):
        raise DemoError(f"{args.plan} is missing: the demo needs the shipped secure plan "
                        "(export a trained model with `deepreduce export` to that path, or pass --plan)")
    paths = find_images(args.images)
    roles = []
    with tempfile.TemporaryDirectory(prefix="pi-demo-") as logs:
        try:
            dealer, dealer_addr = start_role("pi-dealer", "secure.control.dealer", ["--host", "127.0.0.1", "--port", "0"],
                                             logs, 60)
            roles.append(dealer)
            server, server_addr = start_role("pi-server", "server", ["--plan", args.plan, "--host", "127.0.0.1",
                                                                     "--port", "0", "--dealer", dealer_addr], logs, 60)
            roles.append(server)
            if server.wait_for("serving plan", 120) is None:
                raise DemoError(f"pi-server is not ready: {server.tail()}")
            print(f"pi-dealer on {dealer_addr}, pi-server on {server_addr}; "
                  f"classifying {len(paths)} images, {args.batch_size} per session ...", flush=True)
            secure = run_client(server_addr, paths, args)
        finally:
            for role in reversed(roles):
                role.stop()
    classes, plain = plaintext_predictions(args.plan, paths, args.resize)
    return report(paths, args.images, classes, secure, plain)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", default="demo/model.plan", help="the secure plan (default demo/model.plan)")
    p.add_argument("--images", default="demo/images", help="image folder (default demo/images/)")
    p.add_argument("--batch-size", type=int, default=4, help="images per secure session (default 4)")
    p.add_argument("--resize", action="store_true", help="resize images to the plan's input size")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds the client may take (default 1800)")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        summary = demo(args)
    except KeyboardInterrupt:
        print("error: interrupted; everything the demo started was stopped", file=sys.stderr)
        return 130
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if type(exc).__name__ != "UserError":
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary, flush=True)
    return 0


def _interrupt(*_):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())

"""pi-dealer, pi-server and pi-client as processes: their command-line bounds, the shared control
token, a process wrapper that collects output lines, /proc helpers (party processes, listening
ports), bounded waits, and the plan and plaintext truth the process tests compare against."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from secure.control import auth
from support.env import CIFAR10_CLASSES, ROOT, subprocess_env

IMAGES = sorted((ROOT / "demo" / "images").glob("*.png"))
CLASSES = CIFAR10_CLASSES  # the test plan's classes
FAST = ["--read-timeout", "10", "--session-timeout", "240"]
SERVER_FAST = FAST + ["--rendezvous-timeout", "60", "--dealer-timeout", "5"]
CLIENT_FAST = ["--connect-timeout", "10", "--timeout", "240"]
TOKEN = "0123456789abcdef" * 4  # hex, 256 bits (a token is a hex secret of at least 128 bits)


def role_credentials(directory) -> dict[str, list[str]]:
    """A fresh role credential per role in `directory`, and each role's flags: its own key and
    certificate, and the certificates of the two roles it links with (`--trust-*`)."""
    from secure.transport.credentials import RoleCredential
    roles = ("server", "client", "dealer")
    for role in roles:
        RoleCredential.generate(role, f"test-{role}").save(f"{directory}/{role}.key", f"{directory}/{role}.crt")
    return {role: ["--key", f"{directory}/{role}.key", "--cert", f"{directory}/{role}.crt",
                   *(arg for peer in roles if peer != role for arg in (f"--trust-{peer}", f"{directory}/{peer}.crt"))]
            for role in roles}


def security(role: str = "client", token: str = TOKEN) -> auth.Security:
    """What a test process uses to talk to the roles as `role` (single-operator trust from the token the
    roles get in role_env)."""
    from secure.transport.credentials import PartyIdentity
    return auth.Security(PartyIdentity.from_secret(bytes.fromhex(token), role), role)


def role_env(**extra) -> dict:
    """The environment of a role or client process: the shared token unless `extra` says otherwise
    (DEEPREDUCE_TOKEN="" removes it)."""
    env = subprocess_env(**{"DEEPREDUCE_TOKEN": TOKEN, **extra})
    if not env["DEEPREDUCE_TOKEN"]:
        del env["DEEPREDUCE_TOKEN"]
    return env


class Proc:
    """A role started as `python -m MODULE ...`; stdout/stderr are collected line by line."""

    def __init__(self, module: str, *args: str, env: dict | None = None):
        self.p = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env or role_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self._cond = threading.Condition()
        self._readers = [threading.Thread(target=self._pump, args=(s, l), daemon=True)
                         for s, l in ((self.p.stdout, self.out), (self.p.stderr, self.err))]
        for t in self._readers:
            t.start()

    def _pump(self, stream, lines: list[str]) -> None:
        for line in stream:
            with self._cond:
                lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait_line(self, pattern: str, timeout: float, stream: str = "out", start: int = 0) -> re.Match:
        """The first line (from line `start` on) that matches, waiting up to `timeout` seconds for it."""
        lines, deadline = (self.out if stream == "out" else self.err), time.monotonic() + timeout
        with self._cond:
            while True:
                for line in lines[start:]:
                    m = re.search(pattern, line)
                    if m:
                        return m
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.p.poll() is not None and all(not t.is_alive() for t in self._readers)):
                    raise AssertionError(f"no line matching {pattern!r} within {timeout} s; "
                                         f"stdout={self.out[-5:]} stderr={self.err[-5:]}")
                self._cond.wait(min(remaining, 0.2))

    def address(self, timeout: float = 30.0) -> str:
        return self.wait_line(r"^listening on (\S+)$", timeout).group(1)

    def children(self) -> set[int]:
        return worker_children(self.p.pid)

    def terminate(self, timeout: float = 30.0) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        try:
            return self.p.wait(timeout)
        finally:
            if self.p.poll() is None:
                self.p.kill()
                self.p.wait()
            for t in self._readers:
                t.join(5)


def worker_children(pid: int) -> set[int]:
    """Party processes of the role `pid`: its children, except multiprocessing's resource tracker (one
    per role, not per session), and the children of its fork server (which itself is not counted)."""
    kids = set()
    for kid in _children(pid):
        command = cmdline(kid)
        if "resource_tracker" in command:
            continue
        if "forkserver" in command:
            kids |= _children(kid)
        else:
            kids.add(kid)
    return kids


def _children(pid: int) -> set[int]:
    kids = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            continue
    return kids


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def listening_ports() -> set[int]:
    ports = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A":  # LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def eventually(check, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.2)


def assert_port_free(port: int) -> None:
    eventually(lambda: port not in listening_ports(), 20, f"rendezvous port {port} closed")
    with socket.socket() as s:  # what a fresh c10d store would do
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", port))


def client(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "client", *args], cwd=ROOT, env=env or role_env(),
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(done: subprocess.CompletedProcess, pattern: str) -> None:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert re.search(pattern, lines[0]), lines[0]


def start_dealer() -> tuple[Proc, str]:
    dealer = Proc("secure.control.dealer", "--host", "127.0.0.1", "--port", "0", *FAST)
    return dealer, dealer.address()


def start_server(plan_file, *args: str) -> tuple[Proc, str]:
    server = Proc("server", "--plan", str(plan_file), "--host", "127.0.0.1", "--port", "0", *SERVER_FAST, *args)
    address = server.address()
    server.wait_line(r"serving plan", 120)
    return server, address


def plaintext(plan, paths):
    from secure.core.plaintext import predict_files
    return predict_files(plan, [str(p) for p in paths])


def assert_matches_plaintext(records: list[dict], expected: list[dict]) -> None:
    assert [r["image"] for r in records] == [e["image"] for e in expected]
    for r, e in zip(records, expected):
        assert r["class_index"] == e["class_index"] and r["class_name"] == e["class_name"], (r, e)
        assert abs(r["probability"] - e["probability"]) < 0.02, (r, e)


def session_ports(doc: dict) -> list[int]:
    return [int(s["rendezvous"].rsplit(":", 1)[1]) for s in doc["sessions"]]


def write_plan(folder: Path) -> Path:
    """A random-weight ResNet18 (alpha 0.25, culled, thinned) exported to folder/model.plan; batch-norm
    statistics calibrated on the demo images so the logits are spread out."""
    import torch
    from deepreduce.checkpoint import Checkpoint
    from deepreduce.data import load_image_files, normalize
    from deepreduce.models import build_model
    from deepreduce.spec import ModelSpec
    from secure.core.export import export_plan
    torch.manual_seed(0)
    spec = ModelSpec(alpha=0.25, cull=(1, 4), thin="bottom", stem_relu=False)
    model = build_model(spec)
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    x = normalize(load_image_files([str(p) for p in IMAGES], 3, 32), mean, std)
    for m in model.modules():  # batch-norm statistics from real images: well-scaled activations
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model.train()(x)
    Checkpoint(spec, model.eval().state_dict(), mean, std, CLASSES).save(str(folder / "model.pt"))
    export_plan(str(folder / "model.pt")).save(str(folder / "model.plan"))
    return folder / "model.plan"

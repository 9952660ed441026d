"""Dealer, server and client on three "hosts" of one machine: Linux network namespaces joined by veth
pairs and a bridge, with real IP addresses, optional `tc tbf` rate limits, always cleaned up.

    with Testbed(["dealer", "server", "client"], rate="100mbit") as tb:
        tb.ip("server")                       # 10.213.0.2
        proc = tb.popen("server", [...])      # a process inside the server's namespace
        tb.set_rate("1gbit")                  # every link; None lifts the limit

Layout: one namespace per host (``drpi<PID>-<role>``, interface ``eth0`` with an address of the private
test subnet, default 10.213.0.0/24) and one switch namespace (``drpi<PID>-sw``) holding the bridge and
the other end of every veth pair. Nothing is added to the machine's own network namespace: no address,
no route, no firewall rule; deleting the namespaces deletes every link. `Testbed` deletes them on exit,
on an exception or Ctrl-C, and at interpreter exit; namespaces left by a process that was killed
(the PID in the name is gone) are deleted when the next Testbed starts.

A rate limit is a `tbf` qdisc on both ends of each host's veth pair (the host's upload and download),
so every host has a full-duplex link of that rate into the bridge. `netem` (delay) is not used.

The fast engine's party links run to the server's and the dealer's ports only (secure.transport);
`--two-ports` adds an nftables rule in every host's namespace that drops any other TCP, so a run shows
that nothing else is needed. The CrypTen reference engine meets over gloo, which binds and advertises
the address of the interface named by GLOO_SOCKET_IFNAME (else the host name's address, absent in a
namespace): `Testbed.popen` and `Testbed.env` set GLOO_SOCKET_IFNAME=eth0.

`Deployment` runs pi-dealer and pi-server in their namespaces and pi-client in the client's, with the
CLIs only; `python -m secure.tools.netns` uses it to measure latency per image at several rates and to check
`secure.tools.netmodel`'s projections (see docs/DEPLOY.md):

    python -m secure.tools.netns --plan demo/model.plan      # rates none,1gbit,none,100mbit,none; 2 images each
    python -m secure.tools.netns --alpha 1                   # the same for a random-weight full ResNet18
    python -m secure.tools.netns --plan demo/model.plan --two-ports   # only ports 7000 and 7001 open
"""

from __future__ import annotations

import argparse
import atexit
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from deepreduce.errors import ProjectError
from secure.tools.roleproc import RoleProcess

PREFIX = "drpi"
IFNAME = "eth0"
DEFAULT_SUBNET = "10.213.0.0/24"
_RATE = re.compile(r"^(\d+(?:\.\d+)?)(k|m|g)?bit$", re.IGNORECASE)


class NetnsError(ProjectError):
    """The testbed cannot be set up here (not root, no `ip netns`) or a command in it failed."""


def parse_rate(rate: str | None) -> float | None:
    """'1gbit' -> 1e9 bits/s; None, '' or 'none' -> None (no limit)."""
    if rate is None or str(rate).lower() in ("", "none"):
        return None
    m = _RATE.match(str(rate).strip())
    if not m:
        raise NetnsError(f"rate {rate!r} is not like 100mbit, 1gbit or none")
    return float(m.group(1)) * {None: 1, "k": 1e3, "m": 1e6, "g": 1e9}[(m.group(2) or "").lower() or None]


def unavailable_reason() -> str | None:
    """Why a Testbed cannot run here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "the `ip` and `tc` commands (iproute2) are not installed"
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip() or made.returncode}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def firewall_unavailable_reason() -> str | None:
    """Why `Testbed.allow_only_tcp_ports` cannot run here, or None."""
    return None if shutil.which("nft") else "the `nft` command (nftables) is not installed"


# Every namespace accepts TCP only to or from the listed ports (both ends of each connection are
# checked where its packets arrive); loopback and other protocols pass.
_NFT_RULES = """table inet deepreduce_pi_testbed {{
  chain input {{
    type filter hook input priority 0; policy accept;
    iifname "lo" accept
    tcp dport {{ {ports} }} accept
    tcp sport {{ {ports} }} accept
    meta l4proto tcp drop
  }}
}}
"""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done


def _tc(ns: str, *args: str) -> None:
    done = subprocess.run(["tc", "-n", ns, *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise NetnsError(f"tc -n {ns} {' '.join(args)}: {done.stderr.strip() or done.returncode}")


def list_namespaces() -> list[str]:
    done = _ip("netns", "list", check=False)
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


def cleanup_stale() -> list[str]:
    """Delete testbed namespaces whose owning process is gone; returns their names."""
    removed = []
    for name in list_namespaces():
        m = re.match(rf"^{PREFIX}(\d+)-", name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            _ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


class Testbed:
    """Hosts named by `roles`, each in its own network namespace with one address of `subnet`."""

    def __init__(self, roles=("dealer", "server", "client"), subnet: str = DEFAULT_SUBNET, rate: str | None = None):
        self.roles = list(roles)
        net = ipaddress.ip_network(subnet)
        if net.num_addresses < len(self.roles) + 2:
            raise NetnsError(f"subnet {subnet} is too small for {len(self.roles)} hosts")
        self.prefixlen = net.prefixlen
        self._ips = {role: str(net.network_address + i + 1) for i, role in enumerate(self.roles)}
        self.tag = f"{PREFIX}{os.getpid()}"
        self.switch = f"{self.tag}-sw"
        self.namespaces = {role: f"{self.tag}-{role}" for role in self.roles}
        self.rate = rate
        self._procs: list[subprocess.Popen] = []
        self._up = False
        self.open_ports: list[int] | None = None  # set by allow_only_tcp_ports

    # -- set-up and tear-down ---------------------------------------------------------------------
    def __enter__(self) -> "Testbed":
        reason = unavailable_reason()
        if reason:
            raise NetnsError(reason)
        cleanup_stale()
        atexit.register(self.close)
        self._up = True
        try:
            self._create()
            self.set_rate(self.rate)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _create(self) -> None:
        for ns in [self.switch, *self.namespaces.values()]:
            if ns in list_namespaces():
                raise NetnsError(f"network namespace {ns} exists already (another testbed of this process?)")
            _ip("netns", "add", ns)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        _ip("-n", self.switch, "link", "set", "lo", "up")
        for role, ns in self.namespaces.items():
            port = self._port(role)
            _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", IFNAME, "netns", ns)
            _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self._ips[role]}/{self.prefixlen}", "dev", IFNAME)
            _ip("-n", ns, "link", "set", IFNAME, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def _port(self, role: str) -> str:
        return f"v{self.roles.index(role)}-{role}"[:15]

    def close(self) -> None:
        """Stop every process started here, then delete every namespace. Idempotent."""
        if not self._up:
            return
        self._up = False
        for proc in self._procs:
            _stop(proc)
        self._procs.clear()
        for ns in [*self.namespaces.values(), self.switch]:
            _ip("netns", "del", ns, check=False)
        left = [ns for ns in list_namespaces() if ns.startswith(f"{self.tag}-")]
        if left:
            raise NetnsError(f"could not delete network namespaces {left}: `ip netns del` them by hand")
        atexit.unregister(self.close)

    # -- links ------------------------------------------------------------------------------------------
    def set_rate(self, rate: str | None) -> None:
        """tbf at `rate` (e.g. '100mbit') on both ends of every host's link; None removes the limit."""
        bps = parse_rate(rate)
        self.rate = rate if bps else None
        for role, ns in self.namespaces.items():
            for where, dev in ((ns, IFNAME), (self.switch, self._port(role))):
                subprocess.run(["tc", "-n", where, "qdisc", "del", "dev", dev, "root"], capture_output=True)
                if bps:
                    # burst: 1 ms at the rate, at least 64 KiB (a TSO segment); queue: 50 ms at the rate
                    burst = max(65536, int(bps / 8 * 1e-3))
                    _tc(where, "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{int(bps)}bit",
                        "burst", str(burst), "latency", "50ms")

    def ip(self, role: str) -> str:
        return self._ips[role]

    def allow_only_tcp_ports(self, ports: list[int]) -> None:
        """An nftables rule in every host's namespace: TCP between the hosts only to or from `ports`."""
        reason = firewall_unavailable_reason()
        if reason:
            raise NetnsError(reason)
        rules = _NFT_RULES.format(ports=", ".join(str(int(p)) for p in ports))
        for ns in self.namespaces.values():
            done = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules, capture_output=True,
                                  text=True, timeout=30)
            if done.returncode != 0:
                raise NetnsError(f"nft in {ns}: {done.stderr.strip() or done.returncode}")
        self.open_ports = sorted(int(p) for p in ports)

    # -- processes ----------------------------------------------------------------------------------------
    def env(self, extra: dict | None = None) -> dict:
        return {**os.environ, "GLOO_SOCKET_IFNAME": IFNAME, **(extra or {})}

    def command(self, role: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[role], *argv]

    def popen(self, role: str, argv: list[str], **kwargs) -> subprocess.Popen:
        """A process in `role`'s namespace (its own process group); stopped by close()."""
        kwargs.setdefault("env", self.env())
        proc = subprocess.Popen(self.command(role, argv), start_new_session=True, **kwargs)
        self._procs.append(proc)
        return proc

    def run(self, role: str, argv: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("env", self.env())
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.command(role, argv), timeout=timeout, **kwargs)


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to the process group we created, then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except (ProcessLookupError, PermissionError):
        pass
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


# -- the three roles, through their CLIs ---------------------------------------------------------------------

def cli(name: str, module: str) -> list[str]:
    """The console script next to this interpreter, else `python -m module` (the same CLI)."""
    script = Path(sys.executable).parent / name
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


def _start_role(tb: Testbed, role: str, argv: list[str], log_dir: str, env: dict, ready: str,
                timeout: float) -> RoleProcess:
    """A long-running role in its namespace, once it prints `ready`."""
    proc = RoleProcess(role, tb.popen(role, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=env), log_dir)
    if proc.wait_for(ready, timeout) is None:
        raise NetnsError(f"{role} did not print {ready!r} within {timeout:g} s: {proc.tail()}")
    return proc


class Deployment:
    """pi-dealer and pi-server running in a Testbed; `infer` runs pi-client in the client's namespace.
    The three share the control-channel token $DEEPREDUCE_TOKEN (a fresh random one if unset)."""

    DEALER_PORT, SERVER_PORT = 7001, 7000

    def __init__(self, tb: Testbed, plan_path: str, log_dir: str, startup_timeout: float = 180.0):
        self.tb = tb
        self.env = tb.env({"DEEPREDUCE_TOKEN": os.environ.get("DEEPREDUCE_TOKEN") or secrets.token_hex(16)})
        dealer_addr = f"{tb.ip('dealer')}:{self.DEALER_PORT}"
        self.server_addr = f"{tb.ip('server')}:{self.SERVER_PORT}"
        self.dealer = _start_role(tb, "dealer", cli("pi-dealer", "secure.control.dealer")
                                  + ["--host", tb.ip("dealer"), "--port", str(self.DEALER_PORT)], log_dir, self.env,
                                  "listening on", startup_timeout)
        self.server = _start_role(tb, "server", cli("pi-server", "server")
                                  + ["--plan", plan_path, "--host", tb.ip("server"), "--port", str(self.SERVER_PORT),
                                     "--dealer", dealer_addr], log_dir, self.env, "serving plan", startup_timeout)

    def infer(self, images: list[str], batch_size: int = 1, timeout: float = 1800.0) -> dict:
        """pi-client infer --json from the client's namespace: its JSON document, plus `wall_s`."""
        start = time.monotonic()
        done = self.tb.run("client", cli("pi-client", "client")
                           + ["infer", "--server", self.server_addr, "--json", "--batch-size", str(batch_size),
                              "--timeout", str(timeout), *images], timeout=timeout + 60, env=self.env)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines()
            raise NetnsError(f"pi-client failed: {lines[-1] if lines else done.returncode}; "
                             f"server: {self.server.tail()}")
        doc = json.loads(done.stdout)
        doc["wall_s"] = time.monotonic() - start
        return doc


# -- measurement: latency per image at several rates, against the network model ----------------------------

def loopback_profile(plan, batch_size: int = 1, repeats: int = 1) -> dict:
    """The server party's profile (dict) of a run with all parties on 127.0.0.1 (median online time)."""
    import torch

    from secure.tools.local import run_local_parties
    profiles = []
    for seed in range(repeats):
        x = torch.randn(batch_size, *plan.input_shape, generator=torch.Generator().manual_seed(seed))
        profiles.append(run_local_parties(plan, x).server.profile.to_dict())
    profiles.sort(key=lambda p: p["online_s"])
    return profiles[len(profiles) // 2]


def measure(plan_path: str, images: list[str], rates: list[str | None], batch_size: int = 1,
            profile: dict | None = None, log=print, two_ports: bool = False) -> dict:
    """Run the client on `images` once per rate (in this order; a rate may repeat) across a Testbed;
    compare with plaintext and with `secure.tools.netmodel.predict_latency` (see `_predict`). With
    `two_ports`, the hosts exchange TCP only on the server's and the dealer's ports (nftables)."""
    from secure.core.plaintext import predict_files
    from secure.core.plan import SecurePlan

    plan = SecurePlan.load(plan_path)
    plain = [r["class_index"] for r in predict_files(plan, images)]
    rows = []
    with Testbed() as tb, tempfile.TemporaryDirectory(prefix="pi-netns-") as logs:
        log(f"testbed: dealer {tb.ip('dealer')}, server {tb.ip('server')}, client {tb.ip('client')} "
            f"(namespaces {', '.join(tb.namespaces.values())})")
        if two_ports:
            tb.allow_only_tcp_ports([Deployment.SERVER_PORT, Deployment.DEALER_PORT])
            log(f"firewall: TCP between the hosts only to or from ports {tb.open_ports}")
        dep = Deployment(tb, os.path.abspath(plan_path), logs)
        for rate in rates:
            tb.set_rate(rate)
            doc = dep.infer(images, batch_size)
            online = [s["online_s"] / s["images"] for s in doc["sessions"]]
            wall = [s["total_s"] / s["images"] for s in doc["sessions"]]
            secure = [r["class_index"] for r in doc["images"]]
            dealers = {s["dealer"] for s in doc["sessions"]}
            row = {"rate": rate or "none", "rate_bps": parse_rate(rate), "images": len(images),
                   "batch_size": batch_size, "online_s_per_image": statistics.median(online),
                   "wall_s_per_image": statistics.median(wall), "same_as_plaintext": sum(
                       a == b for a, b in zip(secure, plain)), "dealer_addresses": sorted(dealers),
                   "open_ports": tb.open_ports, "trust": doc.get("trust"),
                   "client_mb_sent": doc["latency"]["mb_sent"], "client_mb_received": doc["latency"]["mb_received"],
                   "load_avg_1m": round(os.getloadavg()[0], 2)}  # the machine's load: latency depends on it
            rows.append(row)
            log(_format_row(row))
    if profile is not None:
        _predict(rows, profile)
        for row in rows:
            if "predicted_s_per_image" in row:
                log(f"model at {row['rate']}: {row['predicted_s_per_image']:.2f} s/image (compute from "
                    f"{row['compute_from']}), measured {row['online_s_per_image']:.2f}: {100 * row['error']:+.1f}%")
    return {"plan": plan_path, "relu_count": plan.relu_count, "profile": _profile_summary(profile), "runs": rows}


def _predict(rows: list[dict], profile: dict) -> None:
    """Add secure.tools.netmodel's projection to every limited row. Traffic and rounds come from the loopback
    profile; the compute term is the online time of the unlimited runs (rate none) just before and
    after the limited one (their mean, or the one there is), else the profile's own. On a shared
    machine the CPU load drifts between runs minutes apart far more than the network term checked."""
    from secure.tools.netmodel import cost_of, predict_latency
    n = cost_of(profile).batch_size
    for i, row in enumerate(rows):
        if not row["rate_bps"]:
            continue
        before = [r["online_s_per_image"] for r in rows[:i] if not r["rate_bps"]][-1:]
        after = [r["online_s_per_image"] for r in rows[i + 1:] if not r["rate_bps"]][:1]
        near = before + after
        basis = {**profile, "online_s": statistics.mean(near) * n} if near else profile
        row["compute_from"] = (f"unlimited testbed run{'s' if len(near) > 1 else ''}" if near
                               else "loopback profile")
        row["compute_s_per_image"] = cost_of(basis).compute_s / n
        row["predicted_s_per_image"] = predict_latency(basis, row["rate_bps"], 0.0) / n
        row["error"] = row["predicted_s_per_image"] / row["online_s_per_image"] - 1


def _profile_summary(profile: dict | None) -> dict | None:
    if profile is None:
        return None
    keys = ("online_s", "setup_s", "bytes_sent", "bytes_received", "rounds", "batch_size")
    return {k: profile[k] for k in keys}


def _format_row(row: dict) -> str:
    text = (f"rate {row['rate']:>8}: online {row['online_s_per_image']:.2f} s/image, "
            f"wall {row['wall_s_per_image']:.2f} s/image, secure==plaintext {row['same_as_plaintext']}/{row['images']} "
            f"(load average {row['load_avg_1m']:.1f})")
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m secure.tools.netns", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", help="a secure plan (default: --alpha's random-weight ResNet18)")
    p.add_argument("--alpha", type=float, default=1.0, help="width of the random-weight ResNet18 without --plan")
    p.add_argument("--images", default="demo/images", help="image folder (default demo/images)")
    p.add_argument("--n", type=int, default=2, help="images to classify per rate (default 2)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--rates", default="none,1gbit,none,100mbit,none",
                   help="comma-separated tbf rates in run order; none = unlimited (default none,1gbit,none,100mbit,none)")
    p.add_argument("--no-model", action="store_true", help="skip the loopback profile and the model check")
    p.add_argument("--two-ports", action="store_true",
                   help="drop all TCP between the hosts but to or from the server's and the dealer's port (nftables)")
    p.add_argument("--json-out", help="write every figure to this JSON file")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        reason = unavailable_reason() or (firewall_unavailable_reason() if args.two_ports else None)
        if reason:
            raise NetnsError(reason)
        images = sorted(str(x) for x in Path(args.images).glob("*.png"))[: args.n] if os.path.isdir(args.images) else []
        if not images:
            raise NetnsError(f"no .png images in {args.images}: pass --images DIR")
        rates = [r.strip() for r in args.rates.split(",") if r.strip()]
        for r in rates:
            parse_rate(r)
        with tempfile.TemporaryDirectory(prefix="pi-netns-plan-") as tmp:
            plan_path = args.plan or _random_plan(args.alpha, os.path.join(tmp, "model.plan"))
            from secure.core.plan import SecurePlan
            profile = None
            if not args.no_model:
                print("loopback profile (all parties on 127.0.0.1) ...", flush=True)
                profile = loopback_profile(SecurePlan.load(plan_path), args.batch_size)
                print(f"  online {profile['online_s']:.2f} s, {profile['bytes_sent'] / 1e6:.1f} MB sent, "
                      f"{profile['bytes_received'] / 1e6:.1f} MB received, {profile['rounds']} rounds", flush=True)
            result = measure(plan_path, images, rates, args.batch_size, profile,
                             log=lambda s: print(s, flush=True), two_ports=args.two_ports)
        result["plan"] = args.plan or f"random ResNet18 alpha {args.alpha:g}"
        if args.json_out:
            from deepreduce.fileio import atomic_write_json
            atomic_write_json(args.json_out, result)
    except KeyboardInterrupt:
        print("error: interrupted; the testbed was removed", file=sys.stderr)
        return 130
    except Exception as exc:
        if not isinstance(exc, NetnsError) and type(exc).__name__ not in ("UserError", "ControlError"):
            raise
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0


def _random_plan(alpha: float, path: str) -> str:
    from deepreduce.spec import ModelSpec

    from secure.core.export import plan_from_checkpoint
    from deepreduce.checkpoint import random_checkpoint
    plan_from_checkpoint(random_checkpoint(ModelSpec(alpha=alpha))).save(path)
    return path


if __name__ == "__main__":
    sys.exit(main())

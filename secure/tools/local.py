"""All three parties on this machine, each in a fresh process on 127.0.0.1: the harness behind the
tests, `secure.measure`, `secure.agreement` and `deepreduce bench`.

The fast engine meets over the same TLS links as the roles (`secure.transport.meeting`): this process
listens for the server and the dealer and hands each accepted connection to that party's process, as
pi-server and pi-dealer do; the credentials are derived from a fresh secret (single-operator trust).
The CrypTen reference engine meets over gloo at a rendezvous port, as it does between the roles.

`link=` (a `secure.tools.linkemu.Link`, e.g. `parse_link("rtt=20ms,rate=100mbit")`) puts an emulated link
between the parties: the listeners relay each accepted connection to its party through a delaying,
rate-limiting `linkemu.Relay` instead of handing it over as it is. Fast engine only (gloo's own sockets
cannot be relayed here); bytes and rounds do not change, only the timing.

`relu_protocol=` picks the fast engine's ReLU protocol for both parties: gmw (default), fss, or auto
(`secure.core.costmodel.resolve_relu_protocol` for the plan and `link`: LAN without one). The tools' choice
`--relu-protocol {auto,gmw,fss,fss-exact,both}` goes through `relu_protocols` (which protocols to run) and
`relu_choice_note` (what to print about it)."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import queue
import secrets
import socket
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field

import numpy as np
import torch

from deepreduce.errors import UserError
from secure.control.protocol import free_port
from secure.core.party import AUTO_CANDIDATES, RELU_CHOICES, RELU_PROTOCOLS, PartyResult, Rendezvous, SecureSessionError
from secure.core.plan import PublicPlan, SecurePlan
from secure.core.profiling import Profile
from secure.core.runtime import (CRYPTEN_RELU_REFUSAL, DEFAULT_ENGINE, DEFAULT_RELU_PROTOCOL, check_relu_protocol,
                                  get_engine, run_client, run_dealer, run_server)
from secure.transport import TransportError
from secure.transport.credentials import PartyIdentity, new_secret
from secure.transport.meeting import Meeting
from secure.transport.preface import read_preface, send_connection
from secure.tools.linkemu import LAN, Link, Relay, tcp_pair

__all__ = ["LocalRun", "RELU_TOOL_CHOICES", "check_relu_choice", "relu_choice_note", "relu_protocols", "resolve_relu",
           "run_local", "run_local_parties", "run_processes"]

# The tools' --relu-protocol: a protocol, auto, or both (each protocol in turn, reported side by side).
RELU_TOOL_CHOICES = RELU_CHOICES + ("both",)
DEFAULT_TOOL_RELU_CHOICE = "auto"


def resolve_relu(choice: str, public: PublicPlan, link: Link = LAN) -> str:
    """A concrete ReLU protocol: `choice` itself, or what auto picks for `public` on `link` (LAN: a LAN)."""
    if choice in RELU_PROTOCOLS:
        return choice
    if choice != "auto":
        raise ValueError(f"unknown ReLU protocol {str(choice)[:32]!r}: one of {', '.join(RELU_CHOICES)}")
    from secure.core.costmodel import resolve_relu_protocol
    return resolve_relu_protocol("auto", public, rtt_s=link.rtt_s, rate_bps=link.rate_bps)


def check_relu_choice(choice: str, engine: str = DEFAULT_ENGINE) -> str | None:
    """A tool's --relu-protocol `choice` checked against `engine` (a UserError, one `error:` line, if it does
    not fit); None for the crypten engine, which runs its own and takes only auto."""
    if choice not in RELU_TOOL_CHOICES:
        raise UserError(f"--relu-protocol {str(choice)[:32]!r}: choose one of {', '.join(RELU_TOOL_CHOICES)}")
    if engine != "fast":
        if choice != "auto":
            raise UserError(CRYPTEN_RELU_REFUSAL)
        return None
    return choice


def relu_protocols(choice: str, public: PublicPlan, engine: str = DEFAULT_ENGINE, link: Link = LAN) -> list[str | None]:
    """The ReLU protocols a tool runs for its --relu-protocol `choice` (auto, gmw, fss, fss-exact or both): gmw
    and fss for "both", auto resolved for `public` on `link`; [None] for the crypten engine (CrypTen's own
    comparison), which takes only auto. A bad choice is a UserError (one `error:` line)."""
    if check_relu_choice(choice, engine) is None:
        return [None]
    return list(AUTO_CANDIDATES) if choice == "both" else [resolve_relu(choice, public, link)]


def relu_choice_note(choice: str, protocols: list[str | None], link: Link = LAN, what: str = "") -> str | None:
    """The line a tool prints when auto picked the protocol (None otherwise)."""
    if choice != "auto" or protocols == [None]:
        return None
    where = "a LAN (no link given)" if not link.emulated else f"the emulated link {link.spec}"
    return f"--relu-protocol auto picked {', '.join(p for p in protocols if p)}{' for ' + what if what else ''} on {where}"


def run_local(plan: SecurePlan, images: torch.Tensor, insecure_tfp: bool = False, port: int | None = None,
              timeout_s: float = 60, engine: str = DEFAULT_ENGINE, batch_size: int | None = None,
              link: Link = LAN, relu_protocol: str = DEFAULT_RELU_PROTOCOL) -> PartyResult:
    """Run server, client and dealer (no dealer with TFP) as fresh processes on 127.0.0.1 and
    return the client's result."""
    return run_local_parties(plan, images, insecure_tfp, port, timeout_s, engine=engine, batch_size=batch_size,
                             link=link, relu_protocol=relu_protocol).client


@dataclass
class LocalRun:
    server: PartyResult
    client: PartyResult
    dealer: dict | None  # {"bytes_sent", "bytes_received"}; None with TFP
    pids: dict  # role -> process id: every party ran in its own process
    link: Link = LAN  # the emulated link between the parties (LAN: none)
    relays: list = field(default_factory=list)  # with an emulated link: each relay's accounting (linkemu)
    relu_protocol: str | None = None  # the fast engine's ReLU protocol that ran (None: crypten's own)


def run_local_parties(plan: SecurePlan, images: torch.Tensor, insecure_tfp: bool = False,
                      port: int | None = None, timeout_s: float = 60, client_public: PublicPlan | None = None,
                      engine: str = DEFAULT_ENGINE, batch_size: int | None = None, link: Link = LAN,
                      relu_protocol: str = DEFAULT_RELU_PROTOCOL) -> LocalRun:
    """Like run_local, but returns every party's outcome. `client_public` gives the client another
    public description than `plan`'s (tests: a client holding a stale plan). `batch_size` splits
    `images` into several queries of one session (fast engine); by default they are one batch.
    `link`: an emulated link between the parties (fast engine only; default LAN: none). The returned
    `LocalRun.link` records it, `LocalRun.relays` each relayed connection's byte and time accounting.
    `relu_protocol`: the fast engine's ReLU protocol, gmw (default), fss or auto (resolved here for `plan`
    and `link`); the crypten engine takes gmw or auto and runs its own. `LocalRun.relu_protocol` and each
    party's profile say which ran."""
    get_engine(engine)  # an unknown name fails here, before any process starts
    if engine == "fast":
        relu_protocol = resolve_relu(relu_protocol, plan.public_info(), link)
    elif relu_protocol == "auto":
        relu_protocol = DEFAULT_RELU_PROTOCOL  # crypten runs its own: nothing to pick
    check_relu_protocol(relu_protocol, engine)  # ValueError before any process starts
    if not isinstance(link, Link):
        raise TypeError(f"link must be a secure.tools.linkemu.Link, got {type(link).__name__}")
    if link.emulated and engine != "fast":
        raise ValueError(f"link emulation relays the fast engine's TLS links only; the {engine!r} engine meets "
                         "over gloo (use engine='fast' or no link)")
    roles = ["server", "client"] + ([] if insecure_tfp else ["dealer"])
    listeners = _Listeners([r for r in ("server", "dealer") if r in roles], link) if engine == "fast" else None
    meet = (lambda role: listeners.meeting(role, timeout_s)) if listeners else \
        (lambda role, rdv=Rendezvous("127.0.0.1", port or free_port(), timeout_s): rdv)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="secure-local-") as tmp, listeners or contextlib.nullcontext():
        plan_path = os.path.join(tmp, "model.plan")
        plan.save(plan_path)  # each party loads it, as the images below: arguments stay small (run_processes)
        public = json.dumps((client_public or plan.public_info()).to_dict())  # only what crosses the network
        pixels_path = os.path.join(tmp, "images.npy")
        np.save(pixels_path, images.detach().float().numpy())
        procs = {role: ctx.Process(target=_local_party, name=f"secure-{role}", daemon=True,
                                   args=(role, plan_path, public, pixels_path, meet(role), insecure_tfp, results,
                                         engine, batch_size or len(images),
                                         listeners.child_end(role) if listeners else None, relu_protocol))
                 for role in roles}
        outcomes, pids = run_processes(procs, results, timeout_s)
    return LocalRun(server=_party_result(outcomes["server"]), client=_party_result(outcomes["client"]),
                    dealer=outcomes.get("dealer"), pids=pids, link=link,
                    relays=listeners.relay_stats() if listeners else [],
                    relu_protocol=relu_protocol if engine == "fast" else None)


def run_processes(procs: dict, results, timeout_s: float) -> tuple[dict, dict]:
    """Start every party process, collect each one's ("ok", payload with its "pid") from `results`,
    stop them all whatever happens; returns (role -> payload without the pid, role -> pid).

    The processes' arguments must stay small (paths, not tensors): spawn writes them into a pipe that
    the child reads only after importing __main__, so a child that dies there (a script without a
    `__main__` guard) would leave start() blocked on a full pipe instead of reporting the dead party."""
    try:
        for p in procs.values():
            p.start()
        outcomes = _collect(procs, results, deadline=time.monotonic() + 10 * timeout_s + 60)
    finally:
        _stop(procs.values())
    return outcomes, {role: outcome.pop("pid") for role, outcome in outcomes.items()}


def _local_party(role, plan_path, public_json, pixels_path, rdv, insecure_tfp, results, engine, batch_size,
                 handoff=None, relu_protocol: str = DEFAULT_RELU_PROTOCOL) -> None:
    try:
        if handoff is not None:
            rdv.handoff = handoff
        if role == "dealer":
            traffic = run_dealer(rdv, engine)
            results.put((role, "ok", {"pid": os.getpid(), **traffic}))
            return
        batches = list(torch.from_numpy(np.load(pixels_path)).split(batch_size))
        if role == "server":
            outcome = run_server(SecurePlan.load(plan_path), rdv, [len(b) for b in batches], insecure_tfp, engine,
                                 relu_protocol)
        else:
            outcome = run_client(PublicPlan.from_dict(json.loads(public_json)), batches, rdv, insecure_tfp, engine,
                                 relu_protocol)
        results.put((role, "ok", {"pid": os.getpid(), **outcome.to_dict()}))
    except BaseException as exc:
        results.put((role, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


class _Listeners:
    """The server's and the dealer's listening sockets of one local session, on 127.0.0.1: a thread per
    socket reads each connection's preface and hands the connection to that party's process. With an
    emulated `link`, the party gets one end of a fresh TCP pair instead, and a `linkemu.Relay` carries
    the bytes between the accepted connection and the pair's other end."""

    def __init__(self, roles: list[str], link: Link = LAN):
        self.session_id, self.secret = secrets.token_bytes(16), new_secret()
        self.roles = roles
        self.link = link
        self.relays: list[tuple[str, str, Relay]] = []  # (listening role, connecting role, relay)
        self._socks = {role: socket.create_server(("127.0.0.1", 0)) for role in roles}
        self._pairs = {role: socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for role in roles}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._serve, args=(role,), daemon=True) for role in roles]
        for t in self._threads:
            t.start()

    def meeting(self, role: str, timeout_s: float) -> Meeting:
        dial = {"server": ("client",), "dealer": ("server", "client")}  # listener -> who connects to it
        return Meeting(role, self.session_id, PartyIdentity.from_secret(self.secret, role),
                       dial={peer: self._socks[peer].getsockname()[:2] for peer in self.roles if role in dial[peer]},
                       accept=dial.get(role, ()) if role in self.roles else (), timeout_s=timeout_s)

    def child_end(self, role: str) -> socket.socket | None:
        return self._pairs[role][1] if role in self._pairs else None

    def _serve(self, role: str) -> None:
        listener = self._socks[role]
        listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = listener.accept()
            except (socket.timeout, OSError):
                continue
            try:
                preface = read_preface(conn, 10.0, f"the local {role}")
                if self.link.emulated:
                    near, far = tcp_pair()
                    relay = Relay(conn, near, self.link, name=f"{preface.role}->{role}")
                    self.relays.append((role, preface.role, relay))
                    relay.start()
                    conn = far  # the party's end of the emulated link
                send_connection(self._pairs[role][0], conn, preface)
            except (TransportError, OSError):
                conn.close()

    def relay_stats(self) -> list[dict]:
        """Each relayed connection: who dialled whom, and both directions' accounting (a->b: from the
        connecting party to the listening one)."""
        return [{"listener": listener, "connector": connector, **relay.stats()}
                for listener, connector, relay in self.relays]

    def __enter__(self) -> "_Listeners":
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(2.0)
        for _, _, relay in self.relays:  # the parties have ended: their links with them
            relay.join(2.0)
            relay.close()
        for sock in (*self._socks.values(), *(s for pair in self._pairs.values() for s in pair)):
            sock.close()


def _collect(procs: dict, results, deadline: float) -> dict:
    outcomes = {}
    while len(outcomes) < len(procs):
        try:
            role, status, payload = results.get(timeout=0.5)
        except queue.Empty:
            dead = [r for r, p in procs.items() if r not in outcomes and not p.is_alive()]
            if dead:
                # a result put just before exiting may still be in flight
                try:
                    role, status, payload = results.get(timeout=2.0)
                except queue.Empty:
                    raise SecureSessionError(f"party {dead[0]} exited with code "
                                             f"{procs[dead[0]].exitcode} without a result") from None
            elif time.monotonic() > deadline:
                waiting = sorted(set(procs) - set(outcomes))
                raise SecureSessionError(f"local secure run timed out; waiting for {waiting}")
            else:
                continue
        if status == "error":
            raise SecureSessionError(_failures(role, payload, results))
        outcomes[role] = payload
    return outcomes


def _failures(role: str, payload: str, results) -> str:
    """The first failure plus any other party's that follows shortly: the root cause may be
    in the party that reports second (a crash at one end shows as a reset at the other)."""
    failures = [f"party {role} failed: {payload}"]
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        try:
            other, status, text = results.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            break
        if status == "error":
            failures.append(f"party {other} failed: {text}")
    return "\n".join(failures)


def _party_result(d: dict) -> PartyResult:
    logits = None if d["logits"] is None else torch.tensor(d["logits"], dtype=torch.float64)
    profile = None if d["profile"] is None else Profile.from_dict(d["profile"])
    return PartyResult(d["role"], logits, profile, d["insecure_tfp"])


def _stop(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.join(timeout=5)
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()

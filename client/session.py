"""One secure session from the client's side: the session request, the client party in a worker process,
the dealer check, and retries. Library code: it takes a `ClientSettings`, not the command line."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from secure.control import auth, protocol
from secure.control.workers import PartyJob, Worker, peer_reason, supervise, wait_done
from secure.core.party import DEFAULT_ENGINE, DEFAULT_RELU_CHOICE, RELU_CHOICES, RELU_PROTOCOLS, Rendezvous
from secure.transport.meeting import Meeting

if TYPE_CHECKING:
    from secure.core.plan import PublicPlan


@dataclass
class ClientSettings:
    """How the client talks to a server (`pi-client` builds it from its flags)."""
    server: tuple[str, int]
    security: auth.Security
    connect_timeout: float = 30.0
    timeout: float = 900.0  # a reply or a whole secure computation
    retries: int = 0
    retry_backoff: float = 2.0
    engine: str = DEFAULT_ENGINE  # the client asks for its engine itself; a server running another one refuses
    dealer: tuple[str, int] | None = None  # the dealer's address; default: as the server names it
    allow_insecure_tfp: bool = False  # run with a dealer-less server, which could decrypt the images
    # The fast engine's ReLU protocol: gmw, fss, or auto (resolved per plan before the session request by
    # secure.core.costmodel.resolve_relu_protocol, for a link of `link_rtt_s` and `link_rate_bps`: by
    # default a LAN). The crypten engine runs its own: only auto goes with it.
    relu_protocol: str = DEFAULT_RELU_CHOICE
    link_rtt_s: float = 0.0
    link_rate_bps: float | None = None  # None: no rate limit assumed


class Transient(protocol.ControlError):
    """A failure that trying again may fix (the server went away, is restarting or is busy)."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def with_retries(settings: ClientSettings, action):
    """action(); failures that may pass (busy, server gone or restarting) are retried --retries times,
    waiting --retry-backoff seconds (doubling each time) or the server's retry-after hint if longer."""
    delay = settings.retry_backoff
    for attempt in range(settings.retries + 1):
        try:
            return action()
        except (protocol.RemoteError, Transient, protocol.PeerClosed, protocol.Unreachable) as exc:
            hint = getattr(exc, "retry_after", None)
            retryable = not isinstance(exc, protocol.RemoteError) or hint is not None
            wait = max(delay, hint or 0.0)
            if not retryable or attempt == settings.retries or wait > settings.timeout:
                raise
            print(f"note: {protocol.one_line(str(exc), 200)}; retrying in {wait:g} s "
                  f"({attempt + 1}/{settings.retries})", file=sys.stderr, flush=True)
            time.sleep(wait)
            delay *= 2
    raise AssertionError("unreachable")


def fetch_info(settings: ClientSettings) -> dict:
    def once():
        with auth.open_channel(*settings.server, settings.security, settings.connect_timeout, settings.timeout,
                               "server") as ch:
            ch.send("info")
            return protocol.expect(ch.recv(settings.timeout), "info")
    info = with_retries(settings, once)
    plan = info.get("plan")
    if not isinstance(plan, dict) or not {"input_shape", "classes", "mean", "std", "plan_hash", "ops"} <= set(plan):
        raise protocol.ProtocolError("the server's info reply lacks the public plan")
    return info


def public_plan(info: dict):
    """The server's public plan as a checked `PublicPlan` (loads torch: for the commands that compute)."""
    from secure.core.plan import PublicPlan
    try:
        return PublicPlan.from_dict(info["plan"])
    except ValueError as exc:
        raise protocol.ProtocolError(f"the server's public plan is malformed: {exc}") from None


def check_relu_choice(settings: ClientSettings) -> None:
    """A ReLU protocol choice the client's engine takes (before anything is sent)."""
    if settings.relu_protocol not in RELU_CHOICES:
        raise protocol.ControlError(f"--relu-protocol {str(settings.relu_protocol)[:32]!r}: choose one of "
                                    f"{', '.join(RELU_CHOICES)}")
    if settings.engine != "fast" and settings.relu_protocol != "auto":
        raise protocol.ControlError("the crypten engine has its own ReLU protocol; --relu-protocol applies to the "
                                    "fast engine")
    if not (settings.link_rtt_s >= 0 and (settings.link_rate_bps is None or settings.link_rate_bps > 0)):
        raise protocol.ControlError("--rtt-ms must be at least 0 and --rate-mbit positive")


def relu_protocol_for(settings: ClientSettings, plan: PublicPlan, info: dict | None = None) -> str | None:
    """The concrete ReLU protocol this client asks for: its choice, or what auto picks for `plan` and the
    link hint (LAN unless given) among the protocols the server's `info` offers; None for the crypten
    engine (CrypTen's own). A choice the server does not offer fails here, before any image is read."""
    check_relu_choice(settings)
    if settings.engine != "fast":
        return None
    offered = offered_relu_protocols(info)
    if settings.relu_protocol in RELU_PROTOCOLS:
        if settings.relu_protocol not in offered:
            raise protocol.ControlError(f"the server runs the ReLU protocols {', '.join(offered)} (its --relu-protocols), "
                                        f"not {settings.relu_protocol}: pass --relu-protocol auto or {offered[0]}")
        return settings.relu_protocol
    from secure.core.costmodel import resolve_relu_protocol
    try:
        return resolve_relu_protocol(settings.relu_protocol, plan, settings.link_rtt_s, settings.link_rate_bps,
                                     offered)
    except ValueError as exc:
        raise protocol.ControlError(str(exc)) from None


def offered_relu_protocols(info: dict | None) -> tuple[str, ...]:
    """The ReLU protocols a server's info reply lists (all, for a server that lists none); names this
    client does not know are ignored."""
    listed = (info or {}).get("relu_protocols")
    if not isinstance(listed, list):
        return RELU_PROTOCOLS
    known = tuple(p for p in RELU_PROTOCOLS if p in listed)
    if not known:
        raise protocol.ProtocolError(f"the server offers no ReLU protocol this client runs ({', '.join(RELU_PROTOCOLS)})")
    return known


def run_batch(worker: Worker, x, plan: PublicPlan, settings: ClientSettings, query_size: int | None = None) -> dict:
    """One secure session: session request, client party, the server's final word. With `query_size`
    below len(x), the images run as several queries of one session (set-up paid once)."""
    start = time.monotonic()
    queries = list(x.split(query_size)) if query_size and query_size < len(x) else [x]
    relu = relu_protocol_for(settings, plan)
    with auth.open_channel(*settings.server, settings.security, settings.connect_timeout, settings.timeout,
                           "server") as ch:
        ch.send("session", batch_sizes=[len(q) for q in queries], plan_hash=plan.plan_hash, engine=settings.engine,
                **({"relu_protocol": relu} if relu else {}))
        reply = protocol.expect(ch.recv(settings.timeout), "session")
        sid, tfp = check_session_reply(reply, settings, relu)
        rdv, dealer = meeting_point(reply, sid, tfp, settings)
        worker.start_job(PartyJob("client", rdv, insecure_tfp=tfp, engine=settings.engine, public=plan,
                                  batches=queries, relu_protocol=relu or "gmw"))
        outcome = supervise(worker, {"server": ch}, start + settings.timeout, read_timeout=settings.timeout)
        if outcome.kind == "ok" and "server" not in outcome.done_peers:
            wait_done(ch, min(settings.timeout, 10.0))  # the server's party closes its links, then says done
        elif outcome.kind in ("failed", "died"):
            outcome = peer_reason(outcome, "server", ch)
    if outcome.kind != "ok":
        message = _describe(outcome, settings.timeout)
        if outcome.kind == "peer_closed" or outcome.retry_after is not None:
            raise Transient(message, outcome.retry_after)
        raise protocol.ControlError(message)
    return {"session_id": sid, "rendezvous": protocol.format_address(rdv.host, rdv.port) if isinstance(rdv, Rendezvous)
            else None, "dealer": dealer, "trust": None if isinstance(rdv, Rendezvous) else rdv.identity.trust_mode,
            "images": len(x), "wall_s": time.monotonic() - start, "insecure_tfp": tfp, "engine": settings.engine,
            "relu_protocol": relu, "relu_protocol_choice": settings.relu_protocol,
            "label_only": bool(reply.get("label_only")), "dealer_id": reply.get("dealer_id"), **outcome.result}


def check_session_reply(reply: dict, settings: ClientSettings, relu: str | None) -> tuple[str, bool]:
    """The server's session reply, checked before anything derived from the images leaves this process:
    -> (session id, insecure TFP mode)."""
    sid = protocol.field(reply, "session_id", str, lambda s: protocol.is_hex(s, 32), "32 lowercase hex digits")
    tfp = protocol.field(reply, "insecure_tfp", bool)
    check_tfp(tfp, settings)
    if reply.get("engine", DEFAULT_ENGINE) != settings.engine:
        raise protocol.ControlError(f"the server answered with the {str(reply.get('engine'))[:32]} engine, not the "
                                    f"{settings.engine} engine this client asked for: refusing to share the images")
    if relu and reply.get("relu_protocol", "gmw") != relu:  # a server from before the choice runs gmw
        raise protocol.ControlError(f"the server answered with the {str(reply.get('relu_protocol'))[:32]} ReLU "
                                    f"protocol, not {relu} this client asked for: refusing to share the images")
    return sid, tfp


def check_tfp(tfp: bool, settings: ClientSettings) -> None:
    """The client decides whether it runs without a dealer's protection, not the server."""
    if tfp and not settings.allow_insecure_tfp:
        raise protocol.ControlError("the server runs without a dealer (--insecure-tfp), so it could decrypt the "
                                    "images: refusing to share them (pass --allow-insecure-tfp for a benchmark)")


def meeting_point(reply: dict, sid: str, tfp: bool, settings: ClientSettings):
    """Where the client party meets its peers, and the dealer's address. Fast engine: TLS links to the
    server's port (the address this client used) and to the dealer's port; the dealer must prove its
    role with a certificate this client trusts (its --trust-dealer, or the shared secret's), so a
    dealer address from the server cannot lead the client to a dealer it does not trust."""
    timeout_s = float(protocol.field(reply, "timeout_s", (int, float), lambda t: 0 < t <= 3600, "seconds in (0, 3600]"))
    if settings.engine != "fast":
        return Rendezvous(protocol.field(reply, "host", str, lambda h: 0 < len(h) <= 255, "a host"),
                          protocol.field(reply, "port", int, lambda p: 0 < p < 65536, "a TCP port"), timeout_s), None
    dealer = None
    if not tfp:
        dealer = settings.dealer or protocol.parse_address(
            protocol.field(reply, "dealer", str, lambda a: 0 < len(a) <= 300, "the dealer's HOST:PORT"), "the dealer")
    return Meeting("client", bytes.fromhex(sid), settings.security.party,
                   dial={"server": settings.server, **({"dealer": dealer} if dealer else {})},
                   timeout_s=timeout_s), (protocol.format_address(*dealer) if dealer else None)


def _describe(outcome, timeout: float) -> str:
    if outcome.kind == "failed":
        return f"the secure computation failed: {outcome.message}"
    if outcome.kind == "died":
        return f"the client party process died: {outcome.message}"
    if outcome.kind == "timeout":
        return f"the secure computation did not finish within {timeout:g} s (--timeout)"
    if outcome.kind == "peer_closed":
        return "the server closed the session connection (did it stop?)"
    return outcome.message


def one_session(x, plan: PublicPlan, settings: ClientSettings, query_size: int | None = None) -> dict:
    """run_batch with a fresh party process per attempt (a party runs once), retried as configured."""
    def attempt():
        worker = Worker("pi-client")
        try:
            return run_batch(worker, x, plan, settings, query_size)
        finally:
            worker.stop()
    return with_retries(settings, attempt)


def records(plan: PublicPlan, names: list[str], runs: list[dict]) -> list[dict]:
    import torch

    from secure.control.limits import labels_from_head
    from secure.core.plaintext import prediction_records
    rows = [row for r in runs for row in r["logits"]]
    if any(r.get("label_only") for r in runs):
        return [{"image": name, "class_index": lab["class_index"], "class_name": plan.classes[lab["class_index"]],
                 "probability": None, "label_only": True, **({"ties": lab["ties"]} if lab["ties"] > 0 else {})}
                for name, lab in zip(names, labels_from_head(rows))]
    return prediction_records(torch.tensor(rows, dtype=torch.float64), plan.classes, names)

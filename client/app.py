"""pi-client: classify images with a pi-server's model; the server never sees them.

    DEEPREDUCE_TOKEN=... pi-client info  --server 127.0.0.1:7000 [--json]
    pi-client infer --server 127.0.0.1:7000 --token-file token IMAGE_OR_NPY... [--batch-size B] [--resize] [--json]
    pi-client infer ... --key client.key --cert client.crt --trust-server server.crt --trust-dealer dealer.crt
    pi-client infer ... --relu-protocol fss       # the fast engine's ReLU protocol (default auto: picked per plan)
    pi-client load  --server 127.0.0.1:7000 --clients 4 --sessions 20 --duration 300 IMAGE... [--json-out FILE]
    pi-client load  --server 127.0.0.1:7000 --warm --clients 2 --sessions 100 [--pool 4] [--interval 0.5] IMAGE...
    ls images/*.png | pi-client stream --server 127.0.0.1:7000 --token-file token [--pool 4] [--refill idle|eager]

`infer` asks the server for the public plan (input shape, classes, normalisation, op shapes),
checks and normalises the inputs locally, then runs one secure computation per batch of B images:
a session request, then the client party (rank 1) in a fresh worker process. Inputs are image
files (PNG, JPEG, ...) or .npy arrays of already-normalised float pixels (N x C x H x W or C x H x W).
It prints each image's class and probability (only the class when the server is --label-only) and
a latency table (or, with --json, one JSON document). `load` runs bounded concurrent sessions
against a server on this machine and reports sessions per minute and latency percentiles (with
--warm: warm sessions, --sessions queries in all, and per-query wall and online time percentiles).
`stream` keeps one warm session open (its next --pool queries prepared ahead, so each answer takes
about its online time) and reads input paths from standard input, one a line: for each image it
prints one JSON line (image, class_index, class_name, probability, wall_s from reading the line to
the answer, online_s, wait_s, query, session_id, reconnects), or {"image": ..., "error": ...} for a
line it cannot use; end of input ends the session.
Errors are one `error: ...` line and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import time
from typing import TYPE_CHECKING

from client.inputs import load_inputs
from client.load import (LoadSettings, load_summary, print_load, print_warm_load, run_load, run_warm_load,
                         warm_load_summary)
from client.session import (ClientSettings, check_relu_choice, check_tfp, fetch_info, one_session, public_plan,
                            records, relu_protocol_for)
from client.warm import WarmSession, WarmSettings
from deepreduce.errors import UserError
from secure.control import auth, protocol
from secure.control.service import run_main
from secure.control.workers import private_tempdir, start_fork_server
from secure.core.party import DEFAULT_ENGINE, DEFAULT_RELU_CHOICE, ENGINES, RELU_CHOICES

if TYPE_CHECKING:
    from secure.core.plan import PublicPlan

CRYPTEN_NOTE = ("--engine crypten: the CrypTen reference engine runs over gloo, whose traffic is neither encrypted "
                "nor authenticated: use it for comparisons on a trusted network only (SECURITY.md).")
INSECURE_NOTE = ("INSECURE: the server runs in --insecure-tfp benchmark mode (no dealer): "
                 "it could learn your images. Do not use it for private data.")


class Terminated(BaseException):
    """SIGTERM: unwinds like Ctrl-C so that the worker is stopped."""


def settings_from_args(args) -> ClientSettings:
    """The command line's connection flags as the library's settings (checked by main)."""
    return ClientSettings(server=protocol.parse_address(args.server, "--server"),
                          security=auth.security_from_args(args, role="client"),
                          connect_timeout=args.connect_timeout, timeout=args.timeout, retries=args.retries,
                          retry_backoff=args.retry_backoff, engine=getattr(args, "engine", DEFAULT_ENGINE),
                          dealer=protocol.parse_address(args.dealer, "--dealer") if getattr(args, "dealer", None) else None,
                          allow_insecure_tfp=getattr(args, "allow_insecure_tfp", False),
                          relu_protocol=getattr(args, "relu_protocol", DEFAULT_RELU_CHOICE),
                          link_rtt_s=(getattr(args, "rtt_ms", None) or 0.0) / 1e3,
                          link_rate_bps=None if getattr(args, "rate_mbit", None) is None else args.rate_mbit * 1e6)


def cmd_info(args) -> None:
    info = fetch_info(settings_from_args(args))
    plan = info["plan"]
    if args.json:
        print(json.dumps({"server": args.server, "insecure_tfp": bool(info.get("insecure_tfp")),
                          "max_batch": info.get("max_batch"), "plan_hash": plan["plan_hash"],
                          "input_shape": plan["input_shape"], "classes": plan["classes"],
                          "relu_count": plan.get("relu_count"), "label_only": bool(info.get("label_only")),
                          "dealer_id": info.get("dealer_id"), "queries_left": info.get("queries_left"),
                          "engine": info.get("engine", DEFAULT_ENGINE), "relu_protocols": info.get("relu_protocols"),
                          "plan": plan}))
        return
    if info.get("insecure_tfp"):
        print(f"WARNING: {INSECURE_NOTE}")
    classes = plan["classes"]
    shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
    print(f"server      {args.server}")
    print(f"mode        {'INSECURE TFP (no dealer)' if info.get('insecure_tfp') else 'secure (with dealer)'}"
          + (", label-only" if info.get("label_only") else ""))
    print(f"engine      {info.get('engine', DEFAULT_ENGINE)}"
          + (" (CrypTen reference engine: pass --engine crypten to infer; over gloo, unencrypted)"
             if info.get("engine") == "crypten" else ""))
    if isinstance(info.get("relu_protocols"), list):
        print(f"ReLU        protocols {', '.join(map(str, info['relu_protocols']))[:120]} (--relu-protocol auto picks "
              "among them)")
    if info.get("dealer_id"):
        print(f"dealer      {info['dealer_id']} (as the server names it; infer authenticates the dealer itself)")
    print(f"plan        {plan['plan_hash']}")
    print(f"input       {' x '.join(map(str, plan['input_shape']))}")
    print(f"classes     {len(classes)} ({shown})")
    print(f"ReLUs       {plan.get('relu_count', 0):,} per image")
    print(f"max batch   {info.get('max_batch')}")
    if info.get("queries_left") is not None:
        print(f"queries     {info['queries_left']} images left for this client")


def cmd_infer(args) -> None:
    if args.batch_size is not None and args.batch_size < 1:
        raise protocol.ControlError("--batch-size must be at least 1")
    if args.session_size is not None and args.session_size < 1:
        raise protocol.ControlError("--session-size must be at least 1")
    settings = settings_from_args(args)
    check_relu_choice(settings)  # before anything is sent
    info = fetch_info(settings)
    plan = public_plan(info)
    tfp = bool(info.get("insecure_tfp"))
    check_tfp(tfp, settings)
    check_engine(settings.engine, info, args.session_size)
    resolved = resolved_settings(settings, plan, info)  # auto resolves here, before any image is read
    size = _batch_size(args.batch_size, info.get("max_batch"), len(args.images))
    x, names = load_inputs(args.images, plan.input_shape, plan.mean, plan.std, args.resize,
                           args.convert)  # bad inputs fail before any process starts
    size = min(size, len(x))
    if tfp:
        print(f"WARNING: {INSECURE_NOTE}", file=sys.stderr, flush=True)
    if settings.engine == "crypten":
        print(f"WARNING: {CRYPTEN_NOTE}", file=sys.stderr, flush=True)
    private_tempdir("pi-client")
    start_fork_server()
    # With --session-size S, a session carries S images as queries of --batch-size images: its set-up
    # (processes, rendezvous, weight masks) is paid once. Without it, one query per session.
    limit = info.get("max_batch") if isinstance(info.get("max_batch"), int) else len(x)
    if args.session_size is not None and args.session_size > limit:
        raise protocol.ControlError(f"--session-size {args.session_size} exceeds the server's limit of {limit} "
                                    "images per session")
    per_session = max(size, args.session_size or size)
    runs = [one_session(x[start:start + per_session], plan, resolved, size)
            for start in range(0, len(x), per_session)]
    report(args, plan, names, runs, tfp or any(r["insecure_tfp"] for r in runs), settings)


def resolved_settings(settings: ClientSettings, plan: PublicPlan, info: dict) -> ClientSettings:
    """`settings` with the concrete ReLU protocol its sessions ask for (auto resolved among what the
    server offers); the original keeps the user's choice for the report."""
    relu = relu_protocol_for(settings, plan, info)
    return dataclasses.replace(settings, relu_protocol=relu) if relu else settings


def check_engine(engine: str, info: dict, session_size: int | None) -> None:
    """The server must run the engine this client asked for (the client chooses its protection)."""
    offered = str(info.get("engine", DEFAULT_ENGINE))[:32]
    if offered != engine:
        raise protocol.ControlError(f"the server runs the {offered} engine, this client asked for {engine}: "
                                    + ("pass --engine crypten to use the CrypTen reference engine"
                                       if offered == "crypten" else f"pass --engine {offered}"))
    if engine == "crypten" and session_size is not None:
        raise protocol.ControlError("the crypten engine runs one query per session: drop --session-size")


def _batch_size(wanted: int | None, limit, n: int) -> int:
    limit = limit if isinstance(limit, int) and limit >= 1 else n
    if wanted is not None and wanted > limit:
        raise protocol.ControlError(f"--batch-size {wanted} exceeds the server's limit of {limit} images per session")
    return max(1, wanted or limit)


# -- output ---------------------------------------------------------------------------------------

def latency(runs: list[dict]) -> dict:
    n = sum(r["images"] for r in runs)
    total = lambda key: sum(float((r.get("profile") or {}).get(key) or 0.0) for r in runs)  # noqa: E731
    relu, linear = total("relu_s"), total("linear_s")
    wall = sum(r["wall_s"] for r in runs)
    return {"total_s": round(wall, 4), "per_image_s": round(wall / n, 4), "setup_s": round(total("setup_s"), 4),
            "online_s": round(total("online_s") / n, 4),
            "other_s": round(max(0.0, wall - total("setup_s") - total("online_s")), 4),
            "relu_share": round(relu / (relu + linear), 4) if relu + linear > 0 else None,
            "mb_sent": round(total("bytes_sent") / 1e6, 3), "mb_received": round(total("bytes_received") / 1e6, 3),
            "rounds": int(total("rounds")), "sessions": len(runs)}


def relu_line(protocol_ran: str | None, settings: ClientSettings) -> str:
    """Which ReLU protocol ran, and why (the choice, and for auto the link it assumed)."""
    if protocol_ran is None:
        return "ReLU protocol: CrypTen's own (crypten engine)"
    if settings.relu_protocol != "auto":
        return f"ReLU protocol: {protocol_ran} (--relu-protocol {settings.relu_protocol})"
    rate = "no rate limit" if settings.link_rate_bps is None else f"{settings.link_rate_bps / 1e6:g} Mbit/s"
    link = ("a LAN" if settings.link_rtt_s == 0 and settings.link_rate_bps is None
            else f"rtt {settings.link_rtt_s * 1e3:g} ms, {rate}")
    return f"ReLU protocol: {protocol_ran} (auto, for {link})"


def report(args, plan: PublicPlan, names: list[str], runs: list[dict], tfp: bool,
           settings: ClientSettings | None = None) -> None:
    recs = records(plan, names, runs)
    relu = runs[0].get("relu_protocol") if runs else None
    lat = latency(runs)
    label_only = any(r.get("label_only") for r in runs)
    if args.json:
        doc = {"images": recs, "latency": lat, "insecure_tfp": tfp, "label_only": label_only,
               "trust": sorted({r["trust"] for r in runs if r.get("trust")}),
               "engine": runs[0]["engine"] if runs else DEFAULT_ENGINE, "relu_protocol": relu,
               "relu_protocol_choice": settings.relu_protocol if settings else None,
               "plan_hash": plan.plan_hash, "sessions": [_session_summary(r) for r in runs]}
        if tfp:
            doc["warning"] = INSECURE_NOTE
        print(json.dumps(doc))
        return
    if tfp:
        print(f"WARNING: {INSECURE_NOTE}")
    width = max(len(r["image"]) for r in recs)
    for r in recs:
        shown = "(label only)" if r["probability"] is None else f"{r['probability']:.4f}"
        print(f"{r['image']:<{width}}  {r['class_name']:<14} {shown}")
    print_latency(lat, len(recs))
    if settings is not None:
        print(relu_line(relu, settings))
    trust = sorted({r["trust"] for r in runs if r.get("trust")})
    if trust:
        print(f"party links: TLS 1.3, {', '.join(trust)}")


def _session_summary(run: dict) -> dict:
    prof = run.get("profile") or {}
    return {"session_id": run["session_id"], "rendezvous": run["rendezvous"], "dealer": run.get("dealer"),
            "trust": run.get("trust"), "images": run["images"],
            "total_s": round(run["wall_s"], 4), "setup_s": prof.get("setup_s"), "online_s": prof.get("online_s"),
            "queries": prof.get("queries", 1), "offline_s": prof.get("offline_s"),
            "dealer_id": run.get("dealer_id"), "relu_protocol": run.get("relu_protocol")}


def print_latency(lat: dict, n: int) -> None:
    share = lat["relu_share"]
    rows = [("total", f"{lat['total_s']:.2f} s", f"{n} image(s), {lat['sessions']} session(s), "
                                                 f"{lat['per_image_s']:.2f} s/image"),
            ("setup", f"{lat['setup_s']:.2f} s", "links, weight encryption"),
            ("inference", f"{lat['online_s']:.3f} s", "online, per image"),
            ("other", f"{lat['other_s']:.2f} s", "party processes starting, control messages"),
            ("ReLU share", "n/a" if share is None else f"{100 * share:.1f} %",
             "" if share is None else f"linear {100 * (1 - share):.1f} %"),
            ("sent", f"{lat['mb_sent']:.2f} MB", ""),
            ("received", f"{lat['mb_received']:.2f} MB", ""),
            ("rounds", f"{lat['rounds']}", "")]
    print("latency")
    for name, value, note in rows:
        print(f"  {name:<11} {value:>12}  {note}".rstrip())


def cmd_load(args) -> None:
    settings = settings_from_args(args)
    load = LoadSettings(clients=args.clients, sessions=args.sessions, duration_s=args.duration)
    load.check(settings.server[0])  # before anything is sent
    if args.warm:
        cmd_warm_load(args, settings, load)
        return
    if args.pool is not None or args.refill is not None or args.interval is not None:
        raise protocol.ControlError("--pool, --refill and --interval are for warm sessions: pass --warm")
    info, plan, relu, x, names = _load_inputs(args, settings)
    size = _batch_size(args.batch_size or 1, info.get("max_batch"), len(args.images))
    results, wall = run_load(dataclasses.replace(settings, relu_protocol=relu or settings.relu_protocol), plan,
                             [(x[i:i + size], names[i:i + size]) for i in range(0, len(x), size)], load)
    doc = {**load_summary(args.server, load, results, wall, size), "relu_protocol": relu,
           "relu_protocol_choice": settings.relu_protocol}
    print_load(doc)
    _load_footer(args, doc, relu, settings)


def _load_inputs(args, settings: ClientSettings):
    """What both load modes need before their clients start: the server's plan, the ReLU protocol, the
    checked inputs; -> (info, plan, relu protocol, images, names)."""
    check_relu_choice(settings)
    info = fetch_info(settings)
    check_tfp(bool(info.get("insecure_tfp")), settings)
    check_engine(settings.engine, info, None)
    plan = public_plan(info)
    relu = relu_protocol_for(settings, plan, info)
    x, names = load_inputs(args.images, plan.input_shape, plan.mean, plan.std, args.resize, args.convert)
    private_tempdir("pi-client")
    start_fork_server()
    return info, plan, relu, x, names


def _load_footer(args, doc: dict, relu: str | None, settings: ClientSettings) -> None:
    print(relu_line(relu, settings))
    if args.json_out:
        from deepreduce.fileio import atomic_write_json
        atomic_write_json(args.json_out, doc)
        print(f"wrote {args.json_out}")


def cmd_warm_load(args, settings: ClientSettings, load: LoadSettings) -> None:
    """pi-client load --warm: one warm session per client, --sessions queries in all, one image each."""
    warm = warm_settings(args)
    if args.batch_size not in (None, 1):
        raise protocol.ControlError("load --warm sends queries of one image: drop --batch-size")
    interval = 0.5 if args.interval is None else args.interval
    if not 0 <= interval <= 3600:
        raise protocol.ControlError("--interval must be 0..3600 seconds")
    _, _, relu, x, names = _load_inputs(args, settings)
    results, clients, wall = run_warm_load(settings, warm, [(x[i:i + 1], names[i]) for i in range(len(x))], load,
                                           interval)
    doc = {**warm_load_summary(args.server, load, warm, interval, results, clients, wall), "relu_protocol": relu,
           "relu_protocol_choice": settings.relu_protocol}
    print_warm_load(doc)
    _load_footer(args, doc, relu, settings)


def warm_settings(args) -> WarmSettings:
    """--pool and --refill as a warm session of one image per query (checked before anything is sent)."""
    from secure.core.stream import DEFAULT_POOL, MAX_POOL, REFILL_POLICIES
    pool = DEFAULT_POOL if args.pool is None else args.pool
    refill = args.refill or "idle"
    if not 1 <= pool <= MAX_POOL:
        raise protocol.ControlError(f"--pool must be 1..{MAX_POOL} queries (the server allows at most its --max-pool)")
    if refill not in REFILL_POLICIES:
        raise protocol.ControlError(f"--refill must be one of {', '.join(REFILL_POLICIES)}")
    return WarmSettings(batch_size=1, pool=pool, refill=refill)


def cmd_stream(args) -> None:
    """One warm session; input paths from standard input, one a line; one JSON line per image."""
    warm = warm_settings(args)
    settings = settings_from_args(args)
    check_relu_choice(settings)  # before anything is sent
    private_tempdir("pi-client")
    start_fork_server()
    rows: list[dict] = []
    with WarmSession(settings, warm) as session:
        plan = session.plan
        while True:
            line = sys.stdin.readline()
            t0 = time.perf_counter()
            if not line:
                break
            path = line.strip()
            if not path:
                continue
            try:
                x, names = load_inputs([path], plan.input_shape, plan.mean, plan.std, args.resize, args.convert)
            except (UserError, OSError, ValueError, RuntimeError) as exc:
                _emit({"image": path, "error": protocol.one_line(str(exc) or type(exc).__name__, 300)})
                continue
            for i, name in enumerate(names):
                rec = session.classify(x[i:i + 1], [name])[0]
                row = {"image": name, "class_index": rec["class_index"], "class_name": rec["class_name"],
                       "probability": rec["probability"], "wall_s": round(time.perf_counter() - t0, 6),
                       "online_s": round(rec["online_s"], 6), "wait_s": round(rec["wait_s"], 6),
                       "query_wall_s": round(rec["wall_s"], 6), "pool_level": rec["pool_level"],
                       "query": rec["query"], "session_id": rec["session_id"], "reconnects": rec["reconnects"]}
                _emit(row)
                rows.append(row)
    if args.json_out:
        from client.load import spread
        from deepreduce.fileio import atomic_write_json
        atomic_write_json(args.json_out, {
            "server": args.server, "pool": warm.pool, "refill": warm.refill, "relu_protocol": session.relu,
            "queries": session.queries, "sessions": session.sessions, "session_summaries": session.summaries,
            "wall_s": spread([r["wall_s"] for r in rows]), "online_s": spread([r["online_s"] for r in rows]),
            "images": rows})


def _emit(doc: dict) -> None:
    print(json.dumps(doc), flush=True)


# -- command line ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pi-client", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)
    for name, func, text in (("info", cmd_info, "what the server serves"),
                             ("infer", cmd_infer, "classify images with secure inference"),
                             ("load", cmd_load, "concurrent sessions against a local server: throughput, latency"),
                             ("stream", cmd_stream, "one warm session: classify the inputs named on standard input, "
                                                    "one JSON line each")):
        s = sub.add_parser(name, help=text, allow_abbrev=False)  # `--token` must not pass for --token-file
        s.add_argument("--server", required=True, help="the pi-server's control address HOST:PORT")
        s.add_argument("--connect-timeout", type=float, default=30.0,
                       help="seconds to keep retrying the connection to the server (default 30)")
        s.add_argument("--timeout", type=float, default=900.0,
                       help="seconds to wait for a reply or a secure computation (default 900)")
        s.add_argument("--retries", type=int, default=0,
                       help="times to retry when the server is busy, restarting or gone (default 0; "
                            "load: the info request only, its sessions count busy answers instead)")
        s.add_argument("--retry-backoff", type=float, default=2.0,
                       help="seconds before the first retry, doubling after each (default 2; "
                            "a longer retry-after from the server wins)")
        auth.add_arguments(s, listener=False, connector=True, default_id="client")
        s.set_defaults(func=func)
        if name == "info":
            s.add_argument("--json", action="store_true", help="print one JSON document")
            continue
        if name != "stream":  # stream reads its inputs from standard input, one path a line
            s.add_argument("images", nargs="+", metavar="INPUT",
                           help="image files (PNG, JPEG, ...) or .npy arrays of normalised float pixels")
            s.add_argument("--batch-size", type=int, help="images per query (default: as many as the server allows "
                                                          "per session; load: 1)")
        s.add_argument("--resize", action="store_true", help="resize images to the model's input size")
        s.add_argument("--convert", action="store_true",
                       help="convert grayscale images for a color model and color images for a grayscale one")
        if name != "stream":  # a warm session runs the fast engine with a dealer
            s.add_argument("--engine", choices=ENGINES, default=DEFAULT_ENGINE,
                           help="the engine to run: fast (default, this project's protocol) or crypten (the CrypTen "
                                "reference engine, over gloo, unencrypted: only on a trusted network); the server "
                                "must run the same one")
        s.add_argument("--dealer", metavar="HOST:PORT",
                       help="the pi-dealer's address (default: as the server names it; the dealer must prove its role "
                            "with a certificate this client trusts either way)")
        s.add_argument("--relu-protocol", metavar="{" + ",".join(RELU_CHOICES) + "}", default=DEFAULT_RELU_CHOICE,
                       help="the fast engine's ReLU protocol: gmw (7 rounds per ReLU layer, little dealer traffic), "
                            "fss (one round, much more dealer traffic) or auto (default: picked for the plan and "
                            "the link, a LAN unless --rtt-ms / --rate-mbit say otherwise); the server runs the "
                            "client's choice")
        s.add_argument("--rtt-ms", type=float, metavar="MS",
                       help="for --relu-protocol auto: the round-trip time to the server and dealer (default 0: LAN)")
        s.add_argument("--rate-mbit", type=float, metavar="MBIT",
                       help="for --relu-protocol auto: the link's rate in Mbit/s (default: no limit)")
        if name != "stream":
            s.add_argument("--allow-insecure-tfp", action="store_true",
                           help="INSECURE: run with a server that has no dealer (--insecure-tfp), which could decrypt "
                                "the images; benchmarks only. Without it such a server is refused before anything "
                                "is sent")
        if name in ("load", "stream"):
            s.add_argument("--pool", type=int,
                           help=("warm sessions: " if name == "load" else "")
                           + "queries prepared ahead (default 4; at most the server's --max-pool)")
            s.add_argument("--refill", choices=("idle", "eager"),
                           help=("warm sessions: " if name == "load" else "")
                           + "refill the pool only while no query runs (idle, default) or beside it (eager)")
            s.add_argument("--json-out", metavar="FILE",
                           help="also write the summary as JSON" + ("" if name == "load" else
                                                                    " (each image's line, wall and online "
                                                                    "percentiles) at the end of input"))
        if name == "infer":
            s.add_argument("--json", action="store_true", help="print one JSON document")
            s.add_argument("--session-size", type=int,
                           help="images per secure session, run as queries of --batch-size: the session's set-up "
                                "(processes, rendezvous, weight masks) is paid once (default: one query a session)")
        elif name == "load":
            s.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
            s.add_argument("--sessions", type=int, default=20,
                           help="sessions in all (default 20); with --warm: queries in all, shared among the clients")
            s.add_argument("--duration", type=float, default=300.0,
                           help="seconds after which no new session (with --warm: query) starts (default 300)")
            s.add_argument("--warm", action="store_true",
                           help="each client keeps one warm session (--pool queries prepared ahead), waits until its "
                                "pool is full, then sends its queries of one image one at a time, --interval apart; "
                                "reports wall and online time percentiles per query (the server needs --max-sessions "
                                "of at least --clients: a warm session holds its slot)")
            s.add_argument("--interval", type=float,
                           help="with --warm: seconds between a client's queries, for its pool to refill (default 0.5)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.connect_timeout <= 0 or args.timeout <= 0 or args.retries < 0 or args.retry_backoff < 0:
        raise protocol.ControlError("--connect-timeout and --timeout must be positive, --retries and "
                                    "--retry-backoff at least 0")
    signal.signal(signal.SIGTERM, _terminated)
    try:
        args.func(args)
    except Terminated:
        print("error: terminated", file=sys.stderr, flush=True)
        return 143
    return 0


def _terminated(*_):
    raise Terminated()


def cli() -> int:
    return run_main(main)

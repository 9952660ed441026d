"""pi-client: classify images with a pi-server's model; the server never sees them.

    pi-client info  --server 127.0.0.1:7000 [--json]
    pi-client infer --server 127.0.0.1:7000 IMAGE... [--batch-size B] [--resize] [--json]

`infer` asks the server for the public plan (input shape, classes, normalisation, op shapes),
decodes and normalises the images locally, then runs one secure computation per batch of B
images: a session request, then the client party (rank 1) in a fresh worker process. It prints
each image's class and probability and a latency table (or, with --json, one JSON document).
Errors are one `error: ...` line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time

from secure import protocol
from secure.session import Worker, run_main, supervise

INSECURE_NOTE = ("INSECURE: the server runs in --insecure-tfp benchmark mode (no dealer): "
                 "it could learn your images. Do not use it for private data.")


class Terminated(BaseException):
    """SIGTERM: unwinds like Ctrl-C so that the worker is stopped."""


# -- info -------------------------------------------------------------------------------------------

def fetch_info(server: tuple[str, int], args) -> dict:
    info = protocol.request(*server, {"type": "info"}, args.connect_timeout, args.timeout, "server", "info")
    plan = info.get("plan")
    if not isinstance(plan, dict) or not {"input_shape", "classes", "mean", "std", "plan_hash"} <= set(plan):
        raise protocol.ProtocolError("the server's info reply lacks the public plan")
    return info


def cmd_info(args) -> None:
    server = protocol.parse_address(args.server, "--server")
    info = fetch_info(server, args)
    plan = info["plan"]
    if args.json:
        print(json.dumps({"server": args.server, "insecure_tfp": bool(info.get("insecure_tfp")),
                          "max_batch": info.get("max_batch"), "plan_hash": plan["plan_hash"],
                          "input_shape": plan["input_shape"], "classes": plan["classes"],
                          "relu_count": plan.get("relu_count"), "plan": plan}))
        return
    if info.get("insecure_tfp"):
        print(f"WARNING: {INSECURE_NOTE}")
    classes = plan["classes"]
    shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
    print(f"server      {args.server}")
    print(f"mode        {'INSECURE TFP (no dealer)' if info.get('insecure_tfp') else 'secure (with dealer)'}")
    print(f"plan        {plan['plan_hash']}")
    print(f"input       {' x '.join(map(str, plan['input_shape']))}")
    print(f"classes     {len(classes)} ({shown})")
    print(f"ReLUs       {plan.get('relu_count', 0):,} per image")
    print(f"max batch   {info.get('max_batch')}")


# -- infer ------------------------------------------------------------------------------------------

def load_inputs(paths: list[str], plan: dict, resize: bool):
    from deepreduce.data import load_image_files, normalize  # imports torch
    c, h, w = plan["input_shape"]
    if h != w:
        raise protocol.ControlError(f"the server's plan expects {h}x{w} images; only square inputs are supported")
    return normalize(load_image_files(paths, c, h, resize=resize), plan["mean"], plan["std"])


def run_batch(worker: Worker, x, plan: dict, server: tuple[str, int], args) -> dict:
    """One secure computation: session request, client party, the server's final word."""
    start = time.monotonic()
    with protocol.connect(*server, args.connect_timeout, "server") as sock:
        protocol.send(sock, "session", batch_size=len(x), plan_hash=plan["plan_hash"])
        reply = protocol.expect(protocol.recv(sock, args.timeout), "session")
        rdv = {"host": protocol.field(reply, "host", str), "port": protocol.field(reply, "port", int),
               "timeout_s": float(protocol.field(reply, "timeout_s", (int, float)))}
        tfp = protocol.field(reply, "insecure_tfp", bool)
        worker.start_job("client", public=plan, images=x, insecure_tfp=tfp, rdv=rdv)
        outcome = supervise(worker, {"server": sock}, start + args.timeout, read_timeout=args.timeout)
    if outcome.kind != "ok":
        raise protocol.ControlError(_describe(outcome, args.timeout))
    return {"session_id": reply.get("session_id"), "rendezvous": protocol.format_address(rdv["host"], rdv["port"]),
            "images": len(x), "wall_s": time.monotonic() - start, "insecure_tfp": tfp, **outcome.result}


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


def cmd_infer(args) -> None:
    server = protocol.parse_address(args.server, "--server")
    if args.batch_size is not None and args.batch_size < 1:
        raise protocol.ControlError("--batch-size must be at least 1")
    info = fetch_info(server, args)
    plan = info["plan"]
    tfp = bool(info.get("insecure_tfp"))
    if tfp:
        print(f"WARNING: {INSECURE_NOTE}", file=sys.stderr, flush=True)
    size = _batch_size(args.batch_size, info.get("max_batch"), len(args.images))
    x = load_inputs(args.images, plan, args.resize)
    workers = [Worker("pi-client")]  # starts while the server starts its own party
    try:
        runs = []
        for start in range(0, len(x), size):
            if start + size < len(x):
                workers.append(Worker("pi-client"))  # the next batch's worker warms up meanwhile
            runs.append(run_batch(workers[len(runs)], x[start:start + size], plan, server, args))
            workers[len(runs) - 1].stop()
    finally:
        for w in workers:
            w.stop()
    report(args, plan, runs, tfp or any(r["insecure_tfp"] for r in runs))


def _batch_size(wanted: int | None, limit, n: int) -> int:
    limit = limit if isinstance(limit, int) and limit >= 1 else n
    if wanted is not None and wanted > limit:
        raise protocol.ControlError(f"--batch-size {wanted} exceeds the server's limit of {limit} images per session")
    return max(1, min(wanted or limit, n))


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


def report(args, plan: dict, runs: list[dict], tfp: bool) -> None:
    import torch
    from secure.plan import prediction_records
    logits = torch.tensor([row for r in runs for row in r["logits"]], dtype=torch.float64)
    records = prediction_records(logits, plan["classes"], list(args.images))
    lat = latency(runs)
    if args.json:
        doc = {"images": records, "latency": lat, "insecure_tfp": tfp, "plan_hash": plan["plan_hash"],
               "sessions": [_session_summary(r) for r in runs]}
        if tfp:
            doc["warning"] = INSECURE_NOTE
        print(json.dumps(doc))
        return
    if tfp:
        print(f"WARNING: {INSECURE_NOTE}")
    width = max(len(r["image"]) for r in records)
    for r in records:
        print(f"{r['image']:<{width}}  {r['class_name']:<14} {r['probability']:.4f}")
    print_latency(lat, len(records))


def _session_summary(run: dict) -> dict:
    prof = run.get("profile") or {}
    return {"session_id": run["session_id"], "rendezvous": run["rendezvous"], "images": run["images"],
            "total_s": round(run["wall_s"], 4), "setup_s": prof.get("setup_s"), "online_s": prof.get("online_s")}


def print_latency(lat: dict, n: int) -> None:
    share = lat["relu_share"]
    rows = [("total", f"{lat['total_s']:.2f} s", f"{n} image(s), {lat['sessions']} session(s), "
                                                 f"{lat['per_image_s']:.2f} s/image"),
            ("setup", f"{lat['setup_s']:.2f} s", "rendezvous, weight encryption"),
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


# -- command line ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pi-client", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, func, text in (("info", cmd_info, "what the server serves"),
                             ("infer", cmd_infer, "classify images with secure inference")):
        s = sub.add_parser(name, help=text)
        s.add_argument("--server", required=True, help="the pi-server's control address HOST:PORT")
        s.add_argument("--json", action="store_true", help="print one JSON document")
        s.add_argument("--connect-timeout", type=float, default=30.0,
                       help="seconds to keep retrying the connection to the server (default 30)")
        s.add_argument("--timeout", type=float, default=900.0,
                       help="seconds to wait for a reply or a secure computation (default 900)")
        s.set_defaults(func=func)
        if name == "infer":
            s.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
            s.add_argument("--batch-size", type=int, help="images per secure computation "
                                                          "(default: as many as the server allows)")
            s.add_argument("--resize", action="store_true", help="resize images to the model's input size")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.connect_timeout <= 0 or args.timeout <= 0:
        raise protocol.ControlError("--connect-timeout and --timeout must be positive")
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

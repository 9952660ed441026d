"""pi-client: classify images with a pi-server's model; the server never sees them.

    DEEPREDUCE_TOKEN=... pi-client info  --server 127.0.0.1:7000 [--json]
    pi-client infer --server 127.0.0.1:7000 --token-file token IMAGE_OR_NPY... [--batch-size B] [--resize] [--json]
    pi-client infer ... --dealer-id dealer-a --dealer-token-file dealer.token    # only with the dealer you trust
    pi-client load  --server 127.0.0.1:7000 --clients 4 --sessions 20 --duration 300 IMAGE... [--json-out FILE]

`infer` asks the server for the public plan (input shape, classes, normalisation, op shapes),
checks and normalises the inputs locally, then runs one secure computation per batch of B images:
a session request, then the client party (rank 1) in a fresh worker process. Inputs are image
files (PNG, JPEG, ...) or .npy arrays of already-normalised float pixels (N x C x H x W or C x H x W).
It prints each image's class and probability (only the class when the server is --label-only) and
a latency table (or, with --json, one JSON document). `load` runs bounded concurrent sessions
against a server on this machine and reports sessions per minute and latency percentiles.
Errors are one `error: ...` line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
import threading
import time
import warnings

from secure.control import auth, protocol
from secure.control.service import run_main
from secure.control.workers import PartyJob, Worker, private_tempdir, start_fork_server, supervise
from secure.core.party import Rendezvous

INSECURE_NOTE = ("INSECURE: the server runs in --insecure-tfp benchmark mode (no dealer): "
                 "it could learn your images. Do not use it for private data.")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
MAX_IMAGE_PIXELS = 40_000_000


class Terminated(BaseException):
    """SIGTERM: unwinds like Ctrl-C so that the worker is stopped."""


class Transient(protocol.ControlError):
    """A failure that trying again may fix (the server went away, is restarting or is busy)."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


# -- connections, with retries ----------------------------------------------------------------------

def with_retries(args, action):
    """action(); failures that may pass (busy, server gone or restarting) are retried --retries times,
    waiting --retry-backoff seconds (doubling each time) or the server's retry-after hint if longer."""
    delay = args.retry_backoff
    for attempt in range(args.retries + 1):
        try:
            return action()
        except (protocol.RemoteError, Transient, protocol.PeerClosed, protocol.Unreachable) as exc:
            hint = getattr(exc, "retry_after", None)
            retryable = not isinstance(exc, protocol.RemoteError) or hint is not None
            wait = max(delay, hint or 0.0)
            if not retryable or attempt == args.retries or wait > args.timeout:
                raise
            print(f"note: {protocol.one_line(str(exc), 200)}; retrying in {wait:g} s "
                  f"({attempt + 1}/{args.retries})", file=sys.stderr, flush=True)
            time.sleep(wait)
            delay *= 2
    raise AssertionError("unreachable")


def fetch_info(server: tuple[str, int], args, security) -> dict:
    def once():
        with auth.open_channel(*server, security, args.connect_timeout, args.timeout, "server") as ch:
            ch.send("info")
            return protocol.expect(ch.recv(args.timeout), "info")
    info = with_retries(args, once)
    plan = info.get("plan")
    if not isinstance(plan, dict) or not {"input_shape", "classes", "mean", "std", "plan_hash", "ops"} <= set(plan):
        raise protocol.ProtocolError("the server's info reply lacks the public plan")
    return info


def cmd_info(args) -> None:
    server = protocol.parse_address(args.server, "--server")
    info = fetch_info(server, args, auth.security_from_args(args))
    plan = info["plan"]
    if args.json:
        print(json.dumps({"server": args.server, "insecure_tfp": bool(info.get("insecure_tfp")),
                          "max_batch": info.get("max_batch"), "plan_hash": plan["plan_hash"],
                          "input_shape": plan["input_shape"], "classes": plan["classes"],
                          "relu_count": plan.get("relu_count"), "label_only": bool(info.get("label_only")),
                          "dealer_id": info.get("dealer_id"), "queries_left": info.get("queries_left"),
                          "plan": plan}))
        return
    if info.get("insecure_tfp"):
        print(f"WARNING: {INSECURE_NOTE}")
    classes = plan["classes"]
    shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
    print(f"server      {args.server}")
    print(f"mode        {'INSECURE TFP (no dealer)' if info.get('insecure_tfp') else 'secure (with dealer)'}"
          + (", label-only" if info.get("label_only") else ""))
    if info.get("dealer_id"):
        print(f"dealer      {info['dealer_id']} (as the server names it; infer --dealer-id verifies it)")
    print(f"plan        {plan['plan_hash']}")
    print(f"input       {' x '.join(map(str, plan['input_shape']))}")
    print(f"classes     {len(classes)} ({shown})")
    print(f"ReLUs       {plan.get('relu_count', 0):,} per image")
    print(f"max batch   {info.get('max_batch')}")
    if info.get("queries_left") is not None:
        print(f"queries     {info['queries_left']} images left for this client")


# -- inputs --------------------------------------------------------------------------------------------

def load_inputs(paths: list[str], plan: dict, resize: bool, convert: bool = False):
    """-> (normalised float32 N x C x H x W tensor, one name per image). Image files are decoded like
    `deepreduce predict`; .npy files hold already-normalised pixels. Every problem is one ControlError."""
    import torch

    from deepreduce.data import load_image_files, normalize  # imports torch
    c, h, w = (int(d) for d in plan["input_shape"])
    if h != w:
        raise protocol.ControlError(f"the server's plan expects {h}x{w} images; only square inputs are supported")
    limit = _normalised_bound(plan)
    parts, names = [], []
    images: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            raise protocol.ControlError(f"input {path} is a directory, not an image or .npy file")
        if not os.path.isfile(path):
            raise protocol.ControlError(f"input {path} does not exist")
        if path.lower().endswith(".npy"):
            if images:
                parts.append(images)
                images = []
            arr, single = load_npy(path, (c, h, w), limit)
            parts.append(arr)
            names += [path] if single else [f"{path}[{i}]" for i in range(len(arr))]
        else:
            check_image(path, c, convert)
            images.append(path)
            names.append(path)
    if images:
        parts.append(images)
    batches = []
    for part in parts:
        if isinstance(part, list):
            batches.append(normalize(load_image_files(part, c, h, resize=resize), plan["mean"], plan["std"]))
        else:
            batches.append(torch.from_numpy(part))
    return torch.cat(batches).float(), names


def check_image(path: str, channels: int, convert: bool) -> None:
    """Readable, not absurdly large, and with the channel count the model expects (unless --convert)."""
    from PIL import Image, UnidentifiedImageError
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                mode, (width, height) = img.mode, img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as exc:
        raise protocol.ControlError(f"{path} is not a readable image ({protocol.one_line(str(exc), 200)})") from None
    if width * height > MAX_IMAGE_PIXELS:
        raise protocol.ControlError(f"image {path} is {width}x{height}, larger than the {MAX_IMAGE_PIXELS:,}-pixel limit")
    has = 1 if mode in GRAY_MODES else 3
    if has != channels and not convert:
        kind = {1: "grayscale (1 channel)", 3: f"color ({mode}, 3 channels)"}
        raise protocol.ControlError(f"image {path} is {kind[has]} but the model expects "
                                    f"{'1 channel' if channels == 1 else '3 channels (RGB)'}: pass --convert to convert it")


def load_npy(path: str, shape: tuple[int, int, int], limit: float):
    """-> (float32 N x C x H x W array, whether the file held a single C x H x W image)."""
    import numpy as np
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise protocol.ControlError(f"{path} is not a readable .npy array ({protocol.one_line(str(exc), 200)})") from None
    if not isinstance(arr, np.ndarray):
        raise protocol.ControlError(f"{path} is an .npz archive, not one .npy array: save one array with numpy.save")
    want = " x ".join(map(str, shape))
    if arr.dtype.kind != "f" or arr.dtype.itemsize not in (2, 4, 8):
        raise protocol.ControlError(f"{path} holds {arr.dtype} values; a .npy input holds float32 (or float16/64) "
                                    f"normalised pixels, N x {want}")
    single = arr.ndim == 3
    if single:
        arr = arr[None]
    if arr.ndim != 4:
        raise protocol.ControlError(f"{path} holds an array of shape {tuple(arr.shape)}; the model expects "
                                    f"N x {want} (or {want})")
    if arr.shape[0] == 0:
        raise protocol.ControlError(f"{path} holds no images (shape {tuple(arr.shape)}): an empty batch")
    if tuple(arr.shape[1:]) != shape:
        what = (f"{arr.shape[1]} channels, the model expects {shape[0]}" if arr.shape[1] != shape[0]
                else f"{arr.shape[2]}x{arr.shape[3]} images, the model expects {shape[1]}x{shape[2]}")
        raise protocol.ControlError(f"{path} holds {what} (array shape {tuple(arr.shape)}, expected N x {want}); "
                                    ".npy inputs are not resized")
    data = np.array(arr, dtype=np.float32)
    bad = ~np.isfinite(data)
    if bad.any():
        first = int(np.argwhere(bad)[0][0])
        raise protocol.ControlError(f"{path} holds {int(bad.sum())} NaN or infinite value(s) (first in image {first}): "
                                    "inputs must be finite")
    peak = float(np.abs(data).max())
    if peak > limit:
        raise protocol.ControlError(f"{path} holds values up to {peak:g}, beyond the {limit:g} that normalised pixels "
                                    "of this model reach: apply the plan's mean/std to pixels in [0, 1] "
                                    "(`pi-client info --json` shows them)")
    return data, single


def _normalised_bound(plan: dict) -> float:
    """Twice the largest |(p - mean) / std| over pixels p in [0, 1]: far outside it is not a normalised image."""
    worst = max(max(m, 1 - m) / s for m, s in zip(plan["mean"], plan["std"]) if s > 0)
    return max(8.0, 2 * worst)


# -- one secure computation -----------------------------------------------------------------------------

def dealer_trust(args) -> tuple[str, bytes] | None:
    if not args.dealer_id:
        if args.dealer_token_file:
            raise protocol.ControlError("--dealer-token-file needs --dealer-id NAME (the dealer you trust)")
        return None
    key = auth.dealer_key(args.dealer_token_file)
    if key is None:
        raise protocol.ControlError(f"--dealer-id needs the dealer token to verify the dealer: pass --dealer-token-file "
                                    f"FILE or set ${auth.DEALER_TOKEN_ENV}")
    return args.dealer_id, key


def run_batch(worker: Worker, x, plan: dict, server: tuple[str, int], args, security, trust=None,
              query_size: int | None = None) -> dict:
    """One secure session: session request, client party, the server's final word. With `query_size`
    below len(x), the images run as several queries of one session (set-up paid once)."""
    start = time.monotonic()
    nonce = secrets.token_hex(32)
    queries = list(x.split(query_size)) if query_size and query_size < len(x) else [x]
    with auth.open_channel(*server, security, args.connect_timeout, args.timeout, "server") as ch:
        ch.send("session", batch_sizes=[len(q) for q in queries], plan_hash=plan["plan_hash"], dealer_nonce=nonce)
        reply = protocol.expect(ch.recv(args.timeout), "session")
        sid = protocol.field(reply, "session_id", str)
        rdv = Rendezvous(protocol.field(reply, "host", str, lambda h: 0 < len(h) <= 255, "a host"),
                         protocol.field(reply, "port", int, lambda p: 0 < p < 65536, "a TCP port"),
                         float(protocol.field(reply, "timeout_s", (int, float), lambda t: 0 < t <= 3600,
                                              "seconds in (0, 3600]")))
        tfp = protocol.field(reply, "insecure_tfp", bool)
        verified = _check_dealer(reply, sid, rdv.port, nonce, tfp, trust)
        worker.start_job(PartyJob("client", rdv, insecure_tfp=tfp, public=plan, batches=queries))
        outcome = supervise(worker, {"server": ch}, start + args.timeout, read_timeout=args.timeout)
    if outcome.kind != "ok":
        message = _describe(outcome, args.timeout)
        if outcome.kind == "peer_closed" or outcome.retry_after is not None:
            raise Transient(message, outcome.retry_after)
        raise protocol.ControlError(message)
    return {"session_id": sid, "rendezvous": protocol.format_address(rdv.host, rdv.port),
            "images": len(x), "wall_s": time.monotonic() - start, "insecure_tfp": tfp,
            "label_only": bool(reply.get("label_only")), "dealer_id": reply.get("dealer_id"),
            "dealer_verified": verified, **outcome.result}


def _check_dealer(reply: dict, sid: str, port: int, nonce: str, tfp: bool, trust) -> bool:
    """With --dealer-id: the session's dealer must be that one, attested with the dealer token."""
    if trust is None:
        return False
    name, key = trust
    if tfp:
        raise protocol.ControlError(f"the server runs without a dealer (--insecure-tfp), not with dealer {name!r} "
                                    "that --dealer-id asks for")
    dealer_id = reply.get("dealer_id")
    if dealer_id != name:
        raise protocol.ControlError(f"the server's dealer for session {sid} is {str(dealer_id)[:64]!r}, not {name!r} "
                                    "(--dealer-id): refusing to share the images")
    if not auth.verify_attestation(key, name, sid, port, nonce, reply.get("attestation")):
        raise protocol.ControlError(f"the server could not show that dealer {name!r} joined session {sid} (no valid "
                                    "attestation: another dealer, or the dealer tokens differ): refusing to share the images")
    return True


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


def one_session(x, plan, server, args, security, trust, query_size: int | None = None) -> dict:
    """run_batch with a fresh party process per attempt (a party runs once), retried as configured."""
    def attempt():
        worker = Worker("pi-client")
        try:
            return run_batch(worker, x, plan, server, args, security, trust, query_size)
        finally:
            worker.stop()
    return with_retries(args, attempt)


def cmd_infer(args) -> None:
    server = protocol.parse_address(args.server, "--server")
    if args.batch_size is not None and args.batch_size < 1:
        raise protocol.ControlError("--batch-size must be at least 1")
    if args.session_size is not None and args.session_size < 1:
        raise protocol.ControlError("--session-size must be at least 1")
    security, trust = auth.security_from_args(args), dealer_trust(args)
    info = fetch_info(server, args, security)
    plan = info["plan"]
    tfp = bool(info.get("insecure_tfp"))
    if tfp and trust:
        raise protocol.ControlError(f"the server runs without a dealer (--insecure-tfp), not with dealer "
                                    f"{trust[0]!r} that --dealer-id asks for")
    size = _batch_size(args.batch_size, info.get("max_batch"), len(args.images))
    x, names = load_inputs(args.images, plan, args.resize, args.convert)  # bad inputs fail before any process starts
    size = min(size, len(x))
    if tfp:
        print(f"WARNING: {INSECURE_NOTE}", file=sys.stderr, flush=True)
    private_tempdir("pi-client")
    start_fork_server()
    # With --session-size S, a session carries S images as queries of --batch-size images: its set-up
    # (processes, rendezvous, weight masks) is paid once. Without it, one query per session.
    limit = info.get("max_batch") if isinstance(info.get("max_batch"), int) else len(x)
    if args.session_size is not None and args.session_size > limit:
        raise protocol.ControlError(f"--session-size {args.session_size} exceeds the server's limit of {limit} "
                                    "images per session")
    per_session = max(size, args.session_size or size)
    runs = [one_session(x[start:start + per_session], plan, server, args, security, trust, size)
            for start in range(0, len(x), per_session)]
    report(args, plan, names, runs, tfp or any(r["insecure_tfp"] for r in runs))


def _batch_size(wanted: int | None, limit, n: int) -> int:
    limit = limit if isinstance(limit, int) and limit >= 1 else n
    if wanted is not None and wanted > limit:
        raise protocol.ControlError(f"--batch-size {wanted} exceeds the server's limit of {limit} images per session")
    return max(1, wanted or limit)


# -- output ---------------------------------------------------------------------------------------

def records(plan: dict, names: list[str], runs: list[dict]) -> list[dict]:
    import torch

    from secure.control.limits import labels_from_head
    from secure.core.plan import prediction_records
    rows = [row for r in runs for row in r["logits"]]
    if any(r.get("label_only") for r in runs):
        return [{"image": name, "class_index": lab["class_index"], "class_name": plan["classes"][lab["class_index"]],
                 "probability": None, "label_only": True, **({"ties": lab["ties"]} if lab["ties"] > 0 else {})}
                for name, lab in zip(names, labels_from_head(rows))]
    return prediction_records(torch.tensor(rows, dtype=torch.float64), plan["classes"], names)


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


def report(args, plan: dict, names: list[str], runs: list[dict], tfp: bool) -> None:
    recs = records(plan, names, runs)
    lat = latency(runs)
    label_only = any(r.get("label_only") for r in runs)
    if args.json:
        doc = {"images": recs, "latency": lat, "insecure_tfp": tfp, "label_only": label_only,
               "plan_hash": plan["plan_hash"], "sessions": [_session_summary(r) for r in runs]}
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


def _session_summary(run: dict) -> dict:
    prof = run.get("profile") or {}
    return {"session_id": run["session_id"], "rendezvous": run["rendezvous"], "images": run["images"],
            "total_s": round(run["wall_s"], 4), "setup_s": prof.get("setup_s"), "online_s": prof.get("online_s"),
            "queries": prof.get("queries", 1), "offline_s": prof.get("offline_s"),
            "dealer_id": run.get("dealer_id"), "dealer_verified": run.get("dealer_verified", False)}


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


# -- load ------------------------------------------------------------------------------------------------

LOAD_MAX_CLIENTS, LOAD_MAX_SESSIONS, LOAD_MAX_DURATION = 64, 10_000, 3600.0


def cmd_load(args) -> None:
    host, port = protocol.parse_address(args.server, "--server")
    if host not in ("127.0.0.1", "::1", "localhost"):
        raise protocol.ControlError(f"pi-client load only targets a server on this machine (127.0.0.1), not {host}")
    if not 1 <= args.clients <= LOAD_MAX_CLIENTS or not 1 <= args.sessions <= LOAD_MAX_SESSIONS \
            or not 0 < args.duration <= LOAD_MAX_DURATION:
        raise protocol.ControlError(f"--clients 1..{LOAD_MAX_CLIENTS}, --sessions 1..{LOAD_MAX_SESSIONS} and "
                                    f"--duration (0, {LOAD_MAX_DURATION:g}] bound a load run")
    security, trust = auth.security_from_args(args), dealer_trust(args)
    info = fetch_info((host, port), args, security)
    plan = info["plan"]
    size = _batch_size(args.batch_size or 1, info.get("max_batch"), len(args.images))
    x, names = load_inputs(args.images, plan, args.resize, args.convert)
    batches = [(x[i:i + size], names[i:i + size]) for i in range(0, len(x), size)]
    private_tempdir("pi-client")
    start_fork_server()
    started = time.monotonic()
    deadline = started + args.duration
    lock, results, counter = threading.Lock(), [], [0]

    def client_loop(index: int) -> None:
        while True:
            with lock:
                if counter[0] >= args.sessions or time.monotonic() >= deadline:
                    return
                counter[0] += 1
                number = counter[0]
            t0 = time.monotonic()
            batch = (number - 1) % len(batches)
            xb, nb = batches[batch]
            row = {"session": number, "client": index, "batch": batch, "images": nb, "start_s": round(t0 - started, 3)}
            worker = Worker("pi-client-load")
            try:
                run = run_batch(worker, xb, plan, (host, port), args, security, trust)
                row.update(status="ok", session_id=run["session_id"], rendezvous=run["rendezvous"],
                           labels=[r["class_index"] for r in records(plan, nb, [run])])
            except protocol.BusyError as exc:
                row.update(status="busy", retry_after_s=exc.retry_after, message=str(exc))
            except (protocol.ControlError, OSError) as exc:
                row.update(status="failed", message=protocol.one_line(str(exc), 300))
            finally:
                worker.stop()
            row["latency_s"] = round(time.monotonic() - t0, 3)
            with lock:
                results.append(row)
            if row["status"] == "busy":
                time.sleep(min(float(row.get("retry_after_s") or 1.0), max(0.0, deadline - time.monotonic()), 5.0))

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + args.timeout + 30)
    doc = load_summary(args, results, time.monotonic() - started, size)
    print_load(doc)
    if args.json_out:
        from deepreduce.fileio import atomic_write_json
        atomic_write_json(args.json_out, doc)
        print(f"wrote {args.json_out}")


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def load_summary(args, results: list[dict], wall: float, batch_size: int) -> dict:
    """`consistent`: every session on the same batch of inputs got the same labels."""
    results = sorted(results, key=lambda r: r["session"])
    ok = [r for r in results if r["status"] == "ok"]
    lat = [r["latency_s"] for r in ok]
    labels: dict[int, set] = {}
    for r in ok:
        labels.setdefault(r["batch"], set()).add(tuple(r["labels"]))
    return {"server": args.server, "clients": args.clients, "sessions_limit": args.sessions,
            "duration_limit_s": args.duration, "images_per_session": batch_size, "wall_s": round(wall, 3),
            "sessions": len(results), "ok": len(ok), "busy": sum(r["status"] == "busy" for r in results),
            "failed": sum(r["status"] == "failed" for r in results),
            "sessions_per_minute": round(60 * len(ok) / wall, 3) if wall > 0 else None,
            "latency_s": {"p50": percentile(lat, 50), "p90": percentile(lat, 90), "p99": percentile(lat, 99),
                          "max": max(lat) if lat else None,
                          "mean": round(sum(lat) / len(lat), 3) if lat else None},
            "consistent": all(len(v) == 1 for v in labels.values()), "results": results}


def print_load(doc: dict) -> None:
    fmt = lambda v: "-" if v is None else f"{v:.2f} s"  # noqa: E731
    lat = doc["latency_s"]
    print(f"load: {doc['sessions']} session(s) by {doc['clients']} client(s) in {doc['wall_s']:.1f} s "
          f"(limits: {doc['sessions_limit']} sessions, {doc['duration_limit_s']:g} s; "
          f"{doc['images_per_session']} image(s) per session)")
    rows = [("ok", str(doc["ok"])), ("busy", str(doc["busy"])), ("failed", str(doc["failed"])),
            ("sessions/min", "-" if doc["sessions_per_minute"] is None else f"{doc['sessions_per_minute']:.2f}"),
            ("latency p50", fmt(lat["p50"])), ("latency p90", fmt(lat["p90"])), ("latency p99", fmt(lat["p99"])),
            ("latency max", fmt(lat["max"])), ("consistent", "yes" if doc["consistent"] else "NO")]
    for name, value in rows:
        print(f"  {name:<13} {value:>10}")
    for r in doc["results"]:
        if r["status"] == "failed":
            print(f"  session {r['session']} failed: {r['message']}")


# -- command line ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pi-client", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)
    for name, func, text in (("info", cmd_info, "what the server serves"),
                             ("infer", cmd_infer, "classify images with secure inference"),
                             ("load", cmd_load, "concurrent sessions against a local server: throughput, latency")):
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
        s.add_argument("images", nargs="+", metavar="INPUT",
                       help="image files (PNG, JPEG, ...) or .npy arrays of normalised float pixels")
        s.add_argument("--batch-size", type=int, help="images per query (default: as many as the server allows "
                                                      "per session; load: 1)")
        s.add_argument("--resize", action="store_true", help="resize images to the model's input size")
        s.add_argument("--convert", action="store_true",
                       help="convert grayscale images for a color model and color images for a grayscale one")
        s.add_argument("--dealer-id", metavar="NAME",
                       help="run only with this dealer, verified by its attestation (needs the dealer token)")
        s.add_argument("--dealer-token-file", metavar="FILE",
                       help=f"the dealer token (default ${auth.DEALER_TOKEN_ENV}); the server does not hold it")
        if name == "infer":
            s.add_argument("--json", action="store_true", help="print one JSON document")
            s.add_argument("--session-size", type=int,
                           help="images per secure session, run as queries of --batch-size: the session's set-up "
                                "(processes, rendezvous, weight masks) is paid once (default: one query a session)")
        else:
            s.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
            s.add_argument("--sessions", type=int, default=20, help="sessions in all (default 20)")
            s.add_argument("--duration", type=float, default=300.0,
                           help="seconds after which no new session starts (default 300)")
            s.add_argument("--json-out", metavar="FILE", help="also write the summary as JSON")
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

"""`pi-client load`: bounded concurrent sessions against a server on this machine; sessions per minute
and latency percentiles, as a table and as JSON. With --warm, each client keeps one warm session
(client.warm.WarmSession) and sends its share of the queries one at a time, a pause apart so that its
pool refills: wall and online time percentiles per query, and queries per second."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from client.session import ClientSettings, records, run_batch
from client.warm import WarmSession, WarmSettings
from secure.control import protocol
from secure.control.workers import Worker

if TYPE_CHECKING:
    from secure.core.plan import PublicPlan

LOAD_MAX_CLIENTS, LOAD_MAX_SESSIONS, LOAD_MAX_DURATION = 64, 10_000, 3600.0


@dataclass
class LoadSettings:
    clients: int = 4  # concurrent clients
    sessions: int = 20  # sessions in all (warm: queries in all)
    duration_s: float = 300.0  # no new session (warm: query) starts after this

    def check(self, host: str) -> None:
        """A load run is bounded and stays on this machine."""
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise protocol.ControlError(f"pi-client load only targets a server on this machine (127.0.0.1), not {host}")
        if not 1 <= self.clients <= LOAD_MAX_CLIENTS or not 1 <= self.sessions <= LOAD_MAX_SESSIONS \
                or not 0 < self.duration_s <= LOAD_MAX_DURATION:
            raise protocol.ControlError(f"--clients 1..{LOAD_MAX_CLIENTS}, --sessions 1..{LOAD_MAX_SESSIONS} and "
                                        f"--duration (0, {LOAD_MAX_DURATION:g}] bound a load run")


def run_load(settings: ClientSettings, plan: PublicPlan, batches: list, load: LoadSettings) -> tuple[list[dict], float]:
    """Sessions from `load.clients` threads, cycling over `batches` ((tensor, names) pairs), until
    `load.sessions` ran or `load.duration_s` passed; -> (one row per session, wall seconds)."""
    load.check(settings.server[0])
    started = time.monotonic()
    deadline = started + load.duration_s
    lock, results, counter = threading.Lock(), [], [0]

    def client_loop(index: int) -> None:
        while True:
            with lock:
                if counter[0] >= load.sessions or time.monotonic() >= deadline:
                    return
                counter[0] += 1
                number = counter[0]
            t0 = time.monotonic()
            batch = (number - 1) % len(batches)
            xb, nb = batches[batch]
            row = {"session": number, "client": index, "batch": batch, "images": nb, "start_s": round(t0 - started, 3)}
            worker = Worker("pi-client-load")
            try:
                run = run_batch(worker, xb, plan, settings)
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

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(load.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + settings.timeout + 30)
    return results, time.monotonic() - started


def run_warm_load(settings: ClientSettings, warm: WarmSettings, images: list, load: LoadSettings,
                  interval_s: float) -> tuple[list[dict], list[dict], float]:
    """`load.clients` threads, each with one warm session (`warm`, batch size 1): it waits until its pool
    is full, then sends its share of `load.sessions` queries one at a time, `interval_s` apart, cycling
    over `images` ((1 x C x H x W tensor, name) pairs; query n takes image n mod len(images)), until its
    share ran or `load.duration_s` passed; -> (one row per query, one row per client, wall seconds)."""
    load.check(settings.server[0])
    started = time.monotonic()
    deadline = started + load.duration_s
    lock, results, clients = threading.Lock(), [], []

    def client_loop(index: int) -> None:
        share = list(range(index, load.sessions, load.clients))
        info = {"client": index, "queries": len(share), "sessions": 0, "errors": 0, "warmup_s": None}
        session = WarmSession(settings, warm)
        rows: list[dict] = []
        try:
            t0 = time.monotonic()
            try:
                session.open()
                session.wait_warm()
                info["warmup_s"] = round(time.monotonic() - t0, 3)
            except (protocol.ControlError, OSError) as exc:
                message = protocol.one_line(str(exc), 300)
                rows = [{"query": n, "client": index, "image": images[n % len(images)][1], "batch": n % len(images),
                         "status": "failed", "message": f"opening the warm session: {message}"} for n in share]
                return
            for k, n in enumerate(share):
                if k and interval_s > 0:
                    time.sleep(max(0.0, min(interval_s, deadline - time.monotonic())))
                if time.monotonic() >= deadline:
                    break
                x, name = images[n % len(images)]
                row = {"query": n, "client": index, "image": name, "batch": n % len(images),
                       "start_s": round(time.monotonic() - started, 3)}
                try:
                    rec = session.classify(x, [name])[0]
                    row.update(status="ok", label=rec["class_index"], wall_s=round(rec["wall_s"], 6),
                               online_s=round(rec["online_s"], 6), wait_s=round(rec["wait_s"], 6),
                               pool_level=rec["pool_level"], session_id=rec["session_id"],
                               reconnects=rec["reconnects"])
                except (protocol.ControlError, OSError) as exc:
                    row.update(status="failed", message=protocol.one_line(str(exc), 300))
                row["end_s"] = round(time.monotonic() - started, 3)
                rows.append(row)
        finally:
            session.close()
            info.update(sessions=session.sessions, errors=sum(r["status"] != "ok" for r in rows),
                        pool_peaks=[s.get("pool_peak_bytes") for s in session.summaries],
                        dealer_refill_queries_per_s=[s.get("dealer_refill_queries_per_s") for s in session.summaries])
            with lock:
                results.extend(rows)
                clients.append(info)

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True)
               for i in range(min(load.clients, load.sessions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + settings.timeout + 150)
    return results, sorted(clients, key=lambda c: c["client"]), time.monotonic() - started


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def load_summary(server: str, load: LoadSettings, results: list[dict], wall: float, batch_size: int) -> dict:
    """`consistent`: every session on the same batch of inputs got the same labels."""
    results = sorted(results, key=lambda r: r["session"])
    ok = [r for r in results if r["status"] == "ok"]
    lat = [r["latency_s"] for r in ok]
    labels: dict[int, set] = {}
    for r in ok:
        labels.setdefault(r["batch"], set()).add(tuple(r["labels"]))
    return {"server": server, "clients": load.clients, "sessions_limit": load.sessions,
            "duration_limit_s": load.duration_s, "images_per_session": batch_size, "wall_s": round(wall, 3),
            "sessions": len(results), "ok": len(ok), "busy": sum(r["status"] == "busy" for r in results),
            "failed": sum(r["status"] == "failed" for r in results),
            "sessions_per_minute": round(60 * len(ok) / wall, 3) if wall > 0 else None,
            "latency_s": spread(lat, digits=3),
            "consistent": all(len(v) == 1 for v in labels.values()), "results": results}


def spread(values: list[float], digits: int = 6) -> dict:
    """p50, p90, p99, max and mean (rounded to `digits`) of `values`; None each for no values."""
    return {"p50": percentile(values, 50), "p90": percentile(values, 90), "p99": percentile(values, 99),
            "max": max(values) if values else None,
            "mean": round(sum(values) / len(values), digits) if values else None}


def warm_load_summary(server: str, load: LoadSettings, warm: WarmSettings, interval_s: float, results: list[dict],
                      clients: list[dict], wall: float) -> dict:
    """`ratio`: median wall time over median online time per query (1 would be no overhead at all).
    `queries_per_s`: answered queries over the time from the first query's start to the last one's end.
    `consistent`: every query on the same image got the same label."""
    results = sorted(results, key=lambda r: r["query"])
    ok = [r for r in results if r["status"] == "ok"]
    walls, online = [r["wall_s"] for r in ok], [r["online_s"] for r in ok]
    span = (max(r["end_s"] for r in ok) - min(r["start_s"] for r in ok)) if ok else 0.0
    labels: dict[int, set] = {}
    for r in ok:
        labels.setdefault(r["batch"], set()).add(r["label"])
    mid_wall, mid_online = percentile(walls, 50), percentile(online, 50)
    return {"mode": "warm", "server": server, "clients": load.clients, "queries_limit": load.sessions,
            "duration_limit_s": load.duration_s, "pool": warm.pool, "refill": warm.refill, "interval_s": interval_s,
            "wall_s": round(wall, 3), "queries": len(results), "ok": len(ok), "errors": len(results) - len(ok),
            "query_wall_s": spread(walls), "online_s": spread(online),
            "wait_s": spread([r["wait_s"] for r in ok]),
            "wall_over_online": round(mid_wall / mid_online, 3) if mid_wall and mid_online else None,
            "queries_per_s": round(len(ok) / span, 3) if span > 0 else None,
            "sessions": sum(c["sessions"] for c in clients), "per_client": clients,
            # the dealer's compute rate for each warm session that ended cleanly: how many queries a second it
            # can keep preprocessed (one dealer for all the clients: their sessions shared it)
            "dealer_refill_queries_per_s": spread([r for c in clients for r in c.get("dealer_refill_queries_per_s", [])
                                                   if isinstance(r, (int, float))]),
            "consistent": all(len(v) == 1 for v in labels.values()), "results": results}


def print_warm_load(doc: dict) -> None:
    ms = lambda v: "-" if v is None else f"{1e3 * v:.1f} ms"  # noqa: E731
    print(f"warm load: {doc['queries']} quer(ies) by {doc['clients']} client(s) in {doc['wall_s']:.1f} s "
          f"(limits: {doc['queries_limit']} queries, {doc['duration_limit_s']:g} s; pool {doc['pool']}, "
          f"refill {doc['refill']}, {doc['interval_s']:g} s between a client's queries)")
    w, o = doc["query_wall_s"], doc["online_s"]
    rows = [("ok", str(doc["ok"])), ("errors", str(doc["errors"])),
            ("queries/s", "-" if doc["queries_per_s"] is None else f"{doc['queries_per_s']:.2f}"),
            ("wall p50", ms(w["p50"])), ("wall p90", ms(w["p90"])), ("wall p99", ms(w["p99"])),
            ("online p50", ms(o["p50"])), ("online p90", ms(o["p90"])), ("online p99", ms(o["p99"])),
            ("wait p50", ms(doc["wait_s"]["p50"])),
            ("wall/online", "-" if doc["wall_over_online"] is None else f"{doc['wall_over_online']:.2f}"),
            ("dealer q/s", "-" if doc["dealer_refill_queries_per_s"]["p50"] is None
             else f"{doc['dealer_refill_queries_per_s']['p50']:.1f}"),
            ("consistent", "yes" if doc["consistent"] else "NO")]
    for name, value in rows:
        print(f"  {name:<13} {value:>10}")
    for c in doc["per_client"]:
        warmup = "-" if c["warmup_s"] is None else f"{c['warmup_s']:.1f} s"
        print(f"  client {c['client']}: {c['queries']} quer(ies), {c['sessions']} session(s), {c['errors']} error(s), "
              f"warm-up {warmup}")
    for r in doc["results"]:
        if r["status"] != "ok":
            print(f"  query {r['query']} failed: {r['message']}")


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



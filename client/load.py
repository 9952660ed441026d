"""`pi-client load`: bounded concurrent sessions against a server on this machine; sessions per minute
and latency percentiles, as a table and as JSON."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from client.session import ClientSettings, records, run_batch
from secure.control import protocol
from secure.control.workers import Worker

if TYPE_CHECKING:
    from secure.core.plan import PublicPlan

LOAD_MAX_CLIENTS, LOAD_MAX_SESSIONS, LOAD_MAX_DURATION = 64, 10_000, 3600.0


@dataclass
class LoadSettings:
    clients: int = 4  # concurrent clients
    sessions: int = 20  # sessions in all
    duration_s: float = 300.0  # no new session starts after this

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



"""Warm sessions against cold ones: what a client waits for per query, next to the online time.

    python scripts/warm_latency.py --plans shipped resnet18 --json-out docs/measurements/warm-sessions.json

Per plan (the shipped demo/model.plan; a random-weight full ResNet18, alpha 1): starts pi-dealer and
pi-server on 127.0.0.1 (single-operator trust, a fresh token), then from this process, batch 1:
  cold   one secure session per query (`client.session.one_session`: session request, party process,
         links, weights, correlations, the query), as each `pi-client infer` call runs it, without the
         command's own start-up (imports, the info request);
  warm   one `client.warm.WarmSession` (pool --pool), filled before the first query, then --queries
         queries spaced by the plan's interval so that the pool refills between them;
  4x     --clients warm sessions at once, each sending --queries / --clients queries so spaced.
Each query's wall time runs from handing the image to the session to holding its label; online is the
client party's online phase of that query. Labels are checked against the plan's plaintext PyTorch
prediction. The dealer's refill rate (queries of correlations per second of its compute) comes from its
log. Target (issue "warm sessions"): warm wall <= 1.5 x online + 5 ms, ratios in one run.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from client.inputs import load_inputs  # noqa: E402
from client.load import percentile  # noqa: E402
from client.session import ClientSettings, one_session, records  # noqa: E402
from client.warm import WarmSession, WarmSettings  # noqa: E402
from deepreduce.checkpoint import random_checkpoint  # noqa: E402
from deepreduce.spec import ModelSpec  # noqa: E402
from demo import DEMO_TOKEN, start_role  # noqa: E402
from secure.control import auth  # noqa: E402
from secure.control.workers import start_fork_server  # noqa: E402
from secure.core.export import plan_from_checkpoint  # noqa: E402
from secure.core.plaintext import run_plaintext  # noqa: E402
from secure.core.plan import SecurePlan  # noqa: E402
from secure.transport.credentials import PartyIdentity  # noqa: E402

# Seconds between one client's queries: longer than a query's preparation on this 2-core machine
# (all three parties and the dealer share it), so that the pool is full again when the next one comes.
INTERVAL_S = {"shipped": 0.5, "resnet18": 4.0}
TARGET = (1.5, 0.005)  # wall <= 1.5 x online + 5 ms


def plans(names: list[str]) -> dict[str, SecurePlan]:
    make = {"shipped": lambda: SecurePlan.load(str(ROOT / "demo/model.plan")),
            "resnet18": lambda: plan_from_checkpoint(random_checkpoint(ModelSpec(alpha=1.0), seed=0))}
    return {n: make[n]() for n in names}


def stats(rows: list[dict]) -> dict:
    wall, online = [r["wall_s"] for r in rows], [r["online_s"] for r in rows]
    met = sum(r["wall_s"] <= TARGET[0] * r["online_s"] + TARGET[1] for r in rows)
    out = {"queries": len(rows)}
    for name, values in (("wall_s", wall), ("online_s", online)):
        out[name] = {f"p{q}": percentile(values, q) for q in (50, 90, 99)}
    out["wall_over_online_p50"] = statistics.median(w / o for w, o in zip(wall, online)) if rows else None
    out["target_met_p50"] = bool(rows) and out["wall_s"]["p50"] <= TARGET[0] * out["online_s"]["p50"] + TARGET[1]
    out["queries_within_target"] = met
    out["wait_s_max"] = max((r.get("wait_s", 0.0) for r in rows), default=None)
    return out


def warm_queries(settings: ClientSettings, x, names, truth, n: int, interval: float, pool: int, out: list,
                 errors: list, label: str) -> None:
    try:
        with WarmSession(settings, WarmSettings(pool=pool)) as session:
            session.wait_warm()
            time.sleep(interval)  # the server's pool fills beside the client's
            for k in range(n):
                i = k % len(x)
                row = session.classify(x[i:i + 1], [names[i]])[0]
                row.update(client=label, correct=row["class_index"] == truth[i])
                out.append(row)
                time.sleep(interval)
            sessions = session.sessions
        out.append({"client": label, "sessions": sessions})
    except Exception as exc:  # noqa: BLE001 - reported in the table
        errors.append(f"{label}: {type(exc).__name__}: {exc}")


def measure(name: str, plan: SecurePlan, args, tmp: str) -> dict:
    path = f"{tmp}/{name}.plan"
    plan.save(path)
    dealer, dealer_at = start_role("dealer", "secure.control.dealer", ["--port", "0", "--max-sessions", "8"], tmp, 120)
    server = None
    try:
        server, server_at = start_role("server", "server", [
            "--plan", path, "--port", "0", "--dealer", dealer_at, "--max-sessions", str(args.clients + 1),
            "--idle-timeout", "600", "--max-pool", str(args.pool)], tmp, 300)
        if server.wait_for("serving plan", 300) is None:
            raise RuntimeError(f"pi-server did not start: {server.tail()}")
        host, port = server_at.rsplit(":", 1)
        settings = ClientSettings(server=(host, int(port)), timeout=600,
                                  security=auth.Security(PartyIdentity.from_secret(bytes.fromhex(DEMO_TOKEN), "client"),
                                                         "client"))
        images = sorted(str(p) for p in (ROOT / "demo/images").glob("*.png"))
        x, names = load_inputs(images, plan.input_shape, plan.mean, plan.std, False)
        truth = run_plaintext(plan, x).argmax(1).tolist()
        public = plan.public_info()
        interval = INTERVAL_S[name]
        cold = []
        for i in range(args.cold):
            t0 = time.perf_counter()
            run = one_session(x[i:i + 1], public, settings)
            wall = time.perf_counter() - t0
            row = records(public, [names[i]], [run])[0]
            cold.append({"wall_s": wall, "online_s": run["profile"]["online_s"], "correct": row["class_index"] == truth[i]})
        single, errors = [], []
        warm_queries(settings, x, names, truth, args.queries, interval, args.pool, single, errors, "warm")
        many: list = []
        threads = [threading.Thread(target=warm_queries, args=(settings, x, names, truth, args.queries // args.clients,
                                                               interval, args.pool, many, errors, f"c{c}"))
                   for c in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        time.sleep(1.0)
        with open(dealer.log_path) as f:
            rates = [float(m.group(1).replace(",", "")) for m in re.finditer(r"refill rate ([\d,.]+) queries/s", f.read())]
        answered = [r for r in single if "wall_s" in r]
        answered_many = [r for r in many if "wall_s" in r]
        return {"plan": name, "plan_hash": plan.plan_hash[:12], "relu_count": plan.relu_count, "pool": args.pool,
                "interval_s": interval, "cold": stats(cold), "warm": stats(answered),
                f"warm_{args.clients}_clients": stats(answered_many),
                "correct": sum(r["correct"] for r in cold + answered + answered_many),
                "checked": len(cold) + len(answered) + len(answered_many),
                "sessions_per_client": [r["sessions"] for r in single + many if "sessions" in r],
                "dealer_refill_queries_per_s": rates, "errors": errors}
    finally:
        if server is not None:
            server.stop()
        dealer.stop()


def print_table(results: list[dict], clients: int) -> None:
    print(f"{'plan':<9} {'mode':<10} {'n':>3} {'wall p50':>9} {'p90':>8} {'p99':>8} {'online p50':>10} "
          f"{'wall/online':>11} {'<=1.5x+5ms':>10}")
    for r in results:
        for mode in ("cold", "warm", f"warm_{clients}_clients"):
            s = r[mode]
            if not s["queries"]:
                continue
            w, o = s["wall_s"], s["online_s"]
            print(f"{r['plan']:<9} {mode.replace('_clients', 'x'):<10} {s['queries']:>3} {w['p50']:>9.4f} {w['p90']:>8.4f} "
                  f"{w['p99']:>8.4f} {o['p50']:>10.4f} {s['wall_over_online_p50']:>11.2f} "
                  f"{s['queries_within_target']:>5}/{s['queries']:<4}")
        rates = r["dealer_refill_queries_per_s"]
        print(f"{r['plan']:<9} secure == plaintext {r['correct']}/{r['checked']}; dealer refill rate "
              + (f"{min(rates):.1f}-{max(rates):.1f} queries/s" if rates else "n/a")
              + (f"; errors: {r['errors']}" if r["errors"] else ""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plans", nargs="+", default=["shipped", "resnet18"], choices=["shipped", "resnet18"])
    ap.add_argument("--queries", type=int, default=20, help="warm queries of the single client and of all --clients")
    ap.add_argument("--cold", type=int, default=5, help="cold sessions (one query each)")
    ap.add_argument("--pool", type=int, default=4)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--json-out")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    start_fork_server()
    results = []
    with tempfile.TemporaryDirectory(prefix="warm-latency-") as tmp:
        for name, plan in plans(args.plans).items():
            results.append(measure(name, plan, args, tmp))
            print_table(results[-1:], args.clients)
    print()
    print_table(results, args.clients)
    if args.json_out:
        from deepreduce.fileio import atomic_write_json
        atomic_write_json(args.json_out, {"target": {"factor": TARGET[0], "plus_s": TARGET[1]}, "results": results,
                                          "command": "python scripts/warm_latency.py " + " ".join(argv or sys.argv[1:])})
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

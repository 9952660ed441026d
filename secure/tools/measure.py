"""Cost of one secure inference: latency, traffic, rounds and the ReLU share, per model.

    python -m secure.tools.measure --plan MODEL.plan [--batch-size B] [--repeats R] [--json-out FILE]
    python -m secure.tools.measure --alpha 1 [spec flags as in `deepreduce count`]    # random weights

Runs dealer, server and client as fresh processes on 127.0.0.1 (`run_local_parties`) on real-shaped
random inputs (cost does not depend on pixel values) and prints the server party's figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from deepreduce.cli import add_spec_args, spec_from_args
from deepreduce.errors import exit_status
from deepreduce.fileio import atomic_write_json

from secure.core.export import plan_from_checkpoint
from secure.core.plan import SecurePlan
from deepreduce.checkpoint import random_checkpoint
from secure.core.runtime import DEFAULT_ENGINE, ENGINES
from secure.tools.local import run_local_parties


def measure_cost(plan: SecurePlan, batch_size: int = 1, repeats: int = 1, insecure_tfp: bool = False,
                 engine: str = DEFAULT_ENGINE) -> dict:
    runs = []
    for seed in range(repeats):
        x = torch.randn(batch_size, *plan.input_shape, generator=torch.Generator().manual_seed(seed))
        runs.append(run_local_parties(plan, x, insecure_tfp=insecure_tfp, engine=engine).server.profile)
    p = runs[0]
    online = statistics.median(r.online_s for r in runs)
    return {"relu_count": plan.relu_count, "batch_size": batch_size, "repeats": repeats, "insecure_tfp": insecure_tfp,
            "engine": engine, "offline_s": statistics.median(r.offline_s for r in runs),
            "offline_mb": p.offline_bytes / 1e6,
            "online_s_per_image": online / batch_size, "setup_s": statistics.median(r.setup_s for r in runs),
            "relu_share": statistics.median(r.relu_s / max(r.online_s, 1e-9) for r in runs),
            "mb_sent_per_image": p.bytes_sent / 1e6 / batch_size,
            "mb_received_per_image": p.bytes_received / 1e6 / batch_size,
            "rounds": p.rounds, "relu_mb": p.relu_bytes / 1e6, "linear_mb": p.linear_bytes / 1e6,
            **_session_traffic(p)}


def _session_traffic(p) -> dict:
    """The server party's whole session (all phases): payload MB, and over TLS links the MB on the wire
    (records, frame headers, handshakes) with the overhead they add."""
    if p.session_bytes_sent is None:
        return {}
    out = {"session_mb_sent": p.session_bytes_sent / 1e6, "session_mb_received": p.session_bytes_received / 1e6}
    if p.wire_bytes_sent is not None:
        payload = p.session_bytes_sent + p.session_bytes_received
        wire = p.wire_bytes_sent + p.wire_bytes_received
        out.update(wire_mb_sent=p.wire_bytes_sent / 1e6, wire_mb_received=p.wire_bytes_received / 1e6,
                   wire_overhead=wire / payload - 1 if payload else None)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m secure.tools.measure", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", help="a plan from `deepreduce export`; without it, a random-weight spec")
    add_spec_args(parser)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--insecure-tfp", action="store_true", help="no dealer (benchmark only)")
    parser.add_argument("--engine", choices=ENGINES, default=DEFAULT_ENGINE)
    parser.add_argument("--json-out")
    return exit_status(_run, parser.parse_args(argv))


def _run(args) -> None:
    plan = SecurePlan.load(args.plan) if args.plan else plan_from_checkpoint(random_checkpoint(spec_from_args(args)))
    result = measure_cost(plan, args.batch_size, args.repeats, args.insecure_tfp, args.engine)
    print(f"{'ReLUs':>9} {'online s/img':>12} {'setup s':>8} {'ReLU share':>10} {'MB sent':>8} {'MB recv':>8} {'rounds':>7}")
    print(f"{result['relu_count']:>9,} {result['online_s_per_image']:>12.2f} {result['setup_s']:>8.2f} "
          f"{100 * result['relu_share']:>9.0f}% {result['mb_sent_per_image']:>8.1f} "
          f"{result['mb_received_per_image']:>8.1f} {result['rounds']:>7}"
          + ("   (INSECURE TFP)" if args.insecure_tfp else ""))
    if args.json_out:
        atomic_write_json(args.json_out, result)


if __name__ == "__main__":
    sys.exit(main())

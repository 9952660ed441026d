"""Cost of one secure inference: latency, traffic, rounds and the ReLU share, per model.

    python -m secure.tools.measure --plan MODEL.plan [--batch-size B] [--repeats R] [--json-out FILE]
    python -m secure.tools.measure --alpha 1 [spec flags as in `deepreduce count`]    # random weights
    python -m secure.tools.measure --plan MODEL.plan --link rtt=20ms,rate=100mbit --repeats 5   # emulated link
    python -m secure.tools.measure --plan MODEL.plan --relu-protocol both     # gmw and fss, side by side

Runs dealer, server and client as fresh processes on 127.0.0.1 (`run_local_parties`) on real-shaped
random inputs (cost does not depend on pixel values) and prints the server party's figures.

`--link rtt=20ms,rate=100mbit` measures over an EMULATED link (`secure.tools.linkemu`: a relay between the
parties that delays and paces every link) and, alternating with it, on plain loopback: the report shows
both, `secure.tools.netmodel`'s projection of the loopback profile onto that link, and the emulated
latency's error against it. `--link lan` (the default) is no emulation.

`--relu-protocol` picks the fast engine's ReLU protocol: auto (default: picked for the plan and the --link,
a LAN without one; the pick is printed), gmw, fss, or both (each in turn, one row each). The JSON is one
result with "relu_protocol"; with both, {"relu_protocol": "both", "results": [one per protocol]}.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from deepreduce.cli import add_spec_args, spec_from_args
from deepreduce.errors import UserError, exit_status
from deepreduce.fileio import atomic_write_json

from secure.core.export import plan_from_checkpoint
from secure.core.plan import SecurePlan
from deepreduce.checkpoint import random_checkpoint
from secure.core.runtime import DEFAULT_ENGINE, ENGINES
from secure.tools.linkemu import LAN, Link, parse_link
from secure.tools.local import (DEFAULT_TOOL_RELU_CHOICE, RELU_TOOL_CHOICES, check_relu_choice, relu_choice_note,
                                relu_protocols, run_local_parties)
from secure.tools.netmodel import predict_latency


def _inputs(plan: SecurePlan, batch_size: int, seed: int) -> torch.Tensor:
    return torch.randn(batch_size, *plan.input_shape, generator=torch.Generator().manual_seed(seed))


def _timeout(link: Link) -> float:
    """Seconds a party may wait for a peer: the harness's 60 s, more on a slow emulated link (the dealer's
    correlations of a large plan are one message of up to a few hundred MB)."""
    return 60.0 if link.rate_bps is None else max(60.0, 60.0 * 1e8 / link.rate_bps)


def measure_cost(plan: SecurePlan, batch_size: int = 1, repeats: int = 1, insecure_tfp: bool = False,
                 engine: str = DEFAULT_ENGINE, link: Link = LAN, relu_protocol: str = "gmw") -> dict:
    """The server party's figures, times the median of `repeats` sessions. `link`: an emulated link
    between the parties (`secure.tools.linkemu`; default LAN: plain loopback); the result's "link" says
    which, and whether it was emulated. `relu_protocol`: the fast engine's (gmw, fss or auto; the
    result's "relu_protocol" says which ran, None for the crypten engine)."""
    runs = [run_local_parties(plan, _inputs(plan, batch_size, seed), insecure_tfp=insecure_tfp, engine=engine,
                              link=link, timeout_s=_timeout(link), relu_protocol=relu_protocol).server.profile
            for seed in range(repeats)]
    return summarise(plan, runs, batch_size, insecure_tfp, engine, link)


def summarise(plan: SecurePlan, runs: list, batch_size: int, insecure_tfp: bool, engine: str,
              link: Link = LAN) -> dict:
    """measure_cost's figures from the server party's profiles of several sessions."""
    p = runs[0]
    repeats = len(runs)
    online = statistics.median(r.online_s for r in runs)
    return {"link": link.to_dict(), "relu_protocol": p.relu_protocol or None,
            "relu_count": plan.relu_count, "batch_size": batch_size, "repeats": repeats, "insecure_tfp": insecure_tfp,
            "engine": engine, "offline_s": statistics.median(r.offline_s for r in runs),
            "offline_mb": p.offline_bytes / 1e6,
            "online_s_per_image": online / batch_size, "setup_s": statistics.median(r.setup_s for r in runs),
            "relu_share": statistics.median(r.relu_s / max(r.online_s, 1e-9) for r in runs),
            "mb_sent_per_image": p.bytes_sent / 1e6 / batch_size,
            "mb_received_per_image": p.bytes_received / 1e6 / batch_size,
            "rounds": p.rounds, "relu_mb": p.relu_bytes / 1e6, "linear_mb": p.linear_bytes / 1e6,
            "online_s_runs": [r.online_s / batch_size for r in runs],
            **_session_traffic(p)}


def measure_link(plan: SecurePlan, link: Link, batch_size: int = 1, repeats: int = 5, insecure_tfp: bool = False,
                 engine: str = DEFAULT_ENGINE, relu_protocol: str = "gmw") -> dict:
    """The cost over the emulated `link` next to its projection: `repeats` sessions on loopback and
    `repeats` over the link, alternating (the same inputs for both), then secure.tools.netmodel's
    projection of the loopback profile onto the link and the emulated latency's error against it.
    Returns the emulated run's measure_cost figures plus "loopback", "projection" and
    "same_bytes_and_rounds" (online bytes and rounds are exact counts: they must not change). Both sides
    run the same `relu_protocol` (auto: resolved once, for `link`)."""
    if not link.emulated:
        raise ValueError("measure_link needs an emulated link (rtt and/or rate), not LAN")
    if relu_protocol == "auto" and engine == "fast":  # one pick for both sides: the emulated link's
        from secure.tools.local import resolve_relu
        relu_protocol = resolve_relu(relu_protocol, plan.public_info(), link)
    loop, emu = [], []
    for seed in range(repeats):
        x = _inputs(plan, batch_size, seed)
        for runs, lk in ((loop, LAN), (emu, link)) if seed % 2 == 0 else ((emu, link), (loop, LAN)):
            runs.append(run_local_parties(plan, x, insecure_tfp=insecure_tfp, engine=engine, link=lk,
                                          timeout_s=_timeout(lk), relu_protocol=relu_protocol).server.profile)
    loopback = summarise(plan, loop, batch_size, insecure_tfp, engine, LAN)
    result = summarise(plan, emu, batch_size, insecure_tfp, engine, link)
    projected = predict_latency(loopback, link.rate_bps or float("inf"), link.rtt_s) / batch_size
    measured = result["online_s_per_image"]
    same = all((r.bytes_sent, r.bytes_received, r.rounds) == (loop[0].bytes_sent, loop[0].bytes_received,
                                                              loop[0].rounds) for r in loop + emu)
    result.update(
        loopback=loopback,
        projection={"model": "secure.tools.netmodel.predict_latency(loopback profile, rate, rtt) / batch: "
                             "compute + rounds x rtt + wire bytes x 8 / rate",
                    "online_s_per_image": projected,
                    "rounds_x_rtt_s": loopback["rounds"] * link.rtt_s,
                    "transfer_s": projected - loopback["online_s_per_image"] - loopback["rounds"] * link.rtt_s
                    / batch_size},
        emulated_minus_loopback_s=measured - loopback["online_s_per_image"],
        error=(measured - projected) / projected if projected > 0 else None,
        same_bytes_and_rounds=same)
    return result


def format_result(result: dict, label: str = "") -> str:
    return (f"{label:<10} {result.get('relu_protocol') or '-':<8} {result['relu_count']:>9,} "
            f"{result['online_s_per_image']:>12.3f} {result['setup_s']:>8.2f} "
            f"{100 * result['relu_share']:>9.0f}% {result['mb_sent_per_image']:>8.2f} "
            f"{result['mb_received_per_image']:>8.2f} {result['rounds']:>7}"
            + ("   (INSECURE TFP)" if result["insecure_tfp"] else ""))


HEADER = (f"{'link':<10} {'protocol':<8} {'ReLUs':>9} {'online s/img':>12} {'setup s':>8} {'ReLU share':>10} "
          f"{'MB sent':>8} {'MB recv':>8} {'rounds':>7}")


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
    parser.add_argument("--relu-protocol", default=DEFAULT_TOOL_RELU_CHOICE,
                        metavar="{" + ",".join(RELU_TOOL_CHOICES) + "}",
                        help="the fast engine's ReLU protocol: auto (default: picked for the plan and --link), gmw, "
                             "fss, or both (each in turn)")
    parser.add_argument("--link", metavar="rtt=20ms,rate=100mbit",
                        help="measure over an EMULATED link (secure.tools.linkemu), alternating with loopback "
                             "runs, next to the latency model's projection; `lan` (default): no emulation")
    parser.add_argument("--json-out")
    return exit_status(_run, parser.parse_args(argv))


def _run(args) -> None:
    link = parse_link(args.link)  # a bad --link is one `error:` line, before any work
    if link.emulated and args.engine != "fast":
        raise UserError(f"--link emulates the fast engine's links only; --engine {args.engine} meets over gloo")
    if args.batch_size < 1 or args.repeats < 1:
        raise UserError("--batch-size and --repeats must be at least 1")
    check_relu_choice(args.relu_protocol, args.engine)  # before the plan is built
    plan = SecurePlan.load(args.plan) if args.plan else plan_from_checkpoint(random_checkpoint(spec_from_args(args)))
    protocols = relu_protocols(args.relu_protocol, plan.public_info(), args.engine, link)
    note = relu_choice_note(args.relu_protocol, protocols, link)
    if note:
        print(note)
    if not link.emulated:
        results = [measure_cost(plan, args.batch_size, args.repeats, args.insecure_tfp, args.engine,
                                **_relu_kwargs(p)) for p in protocols]
        print(f"link: {link.describe()}")
        print(HEADER)
        for result in results:
            print(format_result(result, "loopback"))
    else:
        results = [measure_link(plan, link, args.batch_size, args.repeats, args.insecure_tfp, args.engine,
                                **_relu_kwargs(p)) for p in protocols]
        print(f"link: {link.describe()}; {args.repeats} session(s) each, alternating with loopback, medians")
        print(HEADER)
        for result in results:
            print(format_result(result["loopback"], "loopback"))
            print(format_result(result, "EMULATED"))
        for result in results:
            p = result["projection"]
            error = "-" if result["error"] is None else f"{100 * result['error']:+.1f}%"
            print((f"[{result['relu_protocol']}] " if len(results) > 1 else "")
                  + f"projected (secure.tools.netmodel, loopback profile onto {link.spec}): "
                  f"{p['online_s_per_image']:.3f} s/img (rounds x rtt {p['rounds_x_rtt_s']:.3f} s, transfer "
                  f"{p['transfer_s']:.3f} s); emulated {result['online_s_per_image']:.3f} s/img, error {error}; "
                  "bytes and rounds "
                  + ("identical with and without emulation" if result["same_bytes_and_rounds"] else "DIFFER (a bug)"))
    if args.json_out:
        atomic_write_json(args.json_out, results[0] if len(results) == 1 else
                          {"relu_protocol": args.relu_protocol, "results": results})


def _relu_kwargs(protocol: str | None) -> dict:
    """measure_cost's / measure_link's relu_protocol for one protocol of relu_protocols (None: crypten's own)."""
    return {} if protocol is None else {"relu_protocol": protocol}


if __name__ == "__main__":
    sys.exit(main())

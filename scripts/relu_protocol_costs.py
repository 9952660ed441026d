"""The fast engine's two ReLU protocols side by side: online time on localhost and on an emulated WAN,
rounds, bytes, the dealer's offline cost, and the cost model's prediction and pick.

    python scripts/relu_protocol_costs.py --repeats 5 --json-out docs/measurements/relu-protocols.json

Plans: the shipped demo/model.plan and a random-weight full ResNet18 (alpha 1, 557,056 ReLUs). Each
(plan, protocol, link) runs `--repeats` times, alternating the protocols so that drift in the machine's
load hits both; all three parties on 127.0.0.1, batch 1, the server party's profile. The WAN is the
local harness's emulated link (`secure.tools.linkemu`, 20 ms round trip, 100 Mbit/s): EMULATED.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deepreduce.checkpoint import random_checkpoint  # noqa: E402
from deepreduce.spec import ModelSpec  # noqa: E402
from secure.core.costmodel import query_cost, resolve_relu_protocol, wrap_bound  # noqa: E402
from secure.core.export import plan_from_checkpoint  # noqa: E402
from secure.core.plan import SecurePlan  # noqa: E402
from secure.tools.linkemu import LAN, parse_link  # noqa: E402
from secure.tools.local import run_local_parties  # noqa: E402

WAN = "rtt=20ms,rate=100mbit"
VARIANTS = ("gmw", "fss", "fss-exact")


def plans(names: list[str]) -> dict[str, SecurePlan]:
    make = {"shipped": lambda: SecurePlan.load(str(ROOT / "demo/model.plan")),
            "resnet18": lambda: plan_from_checkpoint(random_checkpoint(ModelSpec(alpha=1.0), seed=0))}
    return {n: make[n]() for n in names}


def one_run(plan, protocol: str, link) -> dict:
    x = torch.randn(1, *plan.input_shape, generator=torch.Generator().manual_seed(0))
    run = run_local_parties(plan, x, timeout_s=600, relu_protocol=protocol, link=link)
    p = run.server.profile
    return {"online_s": p.online_s, "rounds": p.rounds, "mb_sent": p.bytes_sent / 1e6, "mb_received": p.bytes_received / 1e6,
            "relu_s": sum(lp.seconds for lp in p.layers if lp.op in ("relu", "maxpool")),
            "offline_s": p.offline_s, "dealer_mb_sent": run.dealer["bytes_sent"] / 1e6,
            "dealer_correlations_s": run.dealer["correlations_s"], "dealer_peak_rss_mb": run.dealer["peak_rss_mb"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plans", nargs="+", default=["shipped", "resnet18"], choices=["shipped", "resnet18"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--links", nargs="+", default=["lan", WAN])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--json-out")
    args = ap.parse_args(argv)
    doc = {"repeats": args.repeats, "batch_size": 1, "emulated_links": [lk for lk in args.links if lk != "lan"],
           "plans": {}}
    for name, plan in plans(args.plans).items():
        public = plan.public_info()
        entry = doc["plans"][name] = {"relu_count": plan.relu_count, "variants": {}}
        for spec in args.links:
            link = LAN if spec == "lan" else parse_link(spec)
            rtt, rate = (0.0, None) if spec == "lan" else (link.rtt_s, link.rate_bps)
            entry.setdefault("auto", {})[spec] = resolve_relu_protocol("auto", public, rtt, rate)
            runs = {v: [] for v in args.variants}
            for _ in range(args.repeats):
                for v in args.variants:
                    runs[v].append(one_run(plan, v, link))
                    print(name, spec, v, {k: round(val, 4) for k, val in runs[v][-1].items()}, flush=True)
            for key, rs in runs.items():
                cost = query_cost(public, key)
                med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
                entry["variants"].setdefault(key, {})[spec] = {
                    **med, "runs": rs, "predicted_online_s": cost.online_s(rtt, rate),
                    "predicted_rounds": cost.rounds}
                entry["variants"][key]["wrap_bound"] = dict(zip(("elements", "probability"),
                                                                wrap_bound(public, key)))
    for name, entry in doc["plans"].items():
        print(f"\n{name} ({entry['relu_count']:,} ReLUs), batch 1, medians of {args.repeats}; auto picks {entry['auto']}")
        print(f"{'protocol':<11}{'link':<24}{'online s':>9}{'model s':>9}{'rounds':>7}{'MB sent':>9}{'MB recv':>9}"
              f"{'dealer MB':>10}{'dealer s':>9}{'dealer RSS MB':>14}{'wrap bound':>11}")
        for key, by_link in entry["variants"].items():
            for spec in args.links:
                r = by_link[spec]
                label = spec if spec == "lan" else f"{spec} EMULATED"
                print(f"{key:<11}{label:<24}{r['online_s']:>9.3f}{r['predicted_online_s']:>9.3f}{r['rounds']:>7.0f}"
                      f"{r['mb_sent']:>9.2f}{r['mb_received']:>9.2f}{r['dealer_mb_sent']:>10.1f}"
                      f"{r['dealer_correlations_s']:>9.2f}{r['dealer_peak_rss_mb']:>14.0f}"
                      f"{by_link['wrap_bound']['probability']:>11.2g}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

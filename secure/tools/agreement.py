"""Secure vs plaintext agreement on real test images.

    python -m secure.tools.agreement --plan MODEL.plan --data folder:PATH --n 500 [--batch-size B] [--session-size S]
    python -m secure.tools.agreement --checkpoint final.pt --data ... [--engine crypten] [--insecure-tfp] [--json-out FILE]
    python -m secure.tools.agreement --plan MODEL.plan --data ... --relu-protocol both    # gmw and fss in turn

Runs the two-party runtime locally (server, client and dealer processes on 127.0.0.1, one fresh
set per session of S images, run as queries of B images) on n test images and compares with
`run_plaintext`: the largest logit difference and how often the argmax agrees. The images are a fixed random subset (seed 0) of the test split,
because folder datasets list the test split class by class.

`--relu-protocol` picks the fast engine's ReLU protocol: auto (default: picked for the plan, on a LAN; the
pick is printed), gmw, fss, or both (each in turn on the same images). The JSON is one result with
"relu_protocol"; with both, {"relu_protocol": "both", "results": [one per protocol]}.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from tqdm import tqdm

from deepreduce.data import load_dataset, normalize
from deepreduce.errors import UserError, exit_status
from deepreduce.fileio import atomic_write_json

from secure.core.export import export_plan
from secure.core.plaintext import run_plaintext
from secure.core.plan import SecurePlan
from secure.core.runtime import DEFAULT_ENGINE, ENGINES
from secure.tools.local import (DEFAULT_TOOL_RELU_CHOICE, RELU_TOOL_CHOICES, check_relu_choice, relu_choice_note,
                                relu_protocols, run_local_parties)


def measure_agreement(plan: SecurePlan, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                      insecure_tfp: bool = False, progress: bool = True, engine: str = DEFAULT_ENGINE,
                      session_size: int | None = None, relu_protocol: str = "gmw") -> dict:
    """`images`: uint8 N x C x H x W. The crypten engine runs one batch per session. `relu_protocol`: the
    fast engine's (gmw, fss or auto; the result's "relu_protocol" says which ran, None for crypten)."""
    session_size = batch_size if engine == "crypten" else max(session_size or batch_size, batch_size)
    max_diff, agree, secure_correct, plain_correct, online, walls = 0.0, 0, 0, 0, [], []
    ran = None
    with tqdm(total=len(images), unit="img", desc="secure inference", disable=not progress) as bar:
        for start in range(0, len(images), session_size):
            x = normalize(images[start:start + session_size], plan.mean, plan.std)
            y = labels[start:start + session_size]
            began = time.perf_counter()
            run = run_local_parties(plan, x, insecure_tfp=insecure_tfp, engine=engine, batch_size=batch_size,
                                    relu_protocol=relu_protocol)
            ran = run.relu_protocol
            walls.append(time.perf_counter() - began)
            secure, plain = run.client.logits, run_plaintext(plan, x)
            max_diff = max(max_diff, (secure - plain).abs().max().item())
            agree += int((secure.argmax(1) == plain.argmax(1)).sum())
            secure_correct += int((secure.argmax(1) == y).sum())
            plain_correct += int((plain.argmax(1) == y).sum())
            online.append(run.client.profile.online_s / run.client.profile.queries)
            bar.update(len(x))
            bar.set_postfix(agree=f"{agree}/{min(start + session_size, len(images))}", max_diff=f"{max_diff:.2e}")
    n = len(images)
    return {"images": n, "batch_size": batch_size, "session_size": session_size, "engine": engine,
            "relu_protocol": ran,
            "insecure_tfp": insecure_tfp, "plan_hash": plan.plan_hash,
            "relu_count": plan.relu_count, "max_abs_logit_diff": max_diff, "argmax_agree": agree,
            "agreement": agree / n, "secure_accuracy": secure_correct / n, "plaintext_accuracy": plain_correct / n,
            "online_s_per_batch": sum(online) / len(online), "wall_s_per_session": sum(walls) / len(walls)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m secure.tools.agreement", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--plan", help="a plan written by `deepreduce export`")
    source.add_argument("--checkpoint", help="a checkpoint (exported on the fly)")
    parser.add_argument("--data", required=True, help="the test images, e.g. cifar10:data/ (`deepreduce data download cifar10 data/`)")
    parser.add_argument("--n", type=int, default=500, help="number of test images")
    parser.add_argument("--batch-size", type=int, default=10, help="images per query")
    parser.add_argument("--session-size", type=int, default=100,
                        help="images per secure session (fresh processes), run as queries of --batch-size")
    parser.add_argument("--engine", choices=ENGINES, default=DEFAULT_ENGINE,
                        help="fast (default) or the CrypTen reference engine")
    parser.add_argument("--relu-protocol", default=DEFAULT_TOOL_RELU_CHOICE,
                        metavar="{" + ",".join(RELU_TOOL_CHOICES) + "}",
                        help="the fast engine's ReLU protocol: auto (default: picked for the plan), gmw, fss, or "
                             "both (each in turn)")
    parser.add_argument("--resize", action="store_true")
    parser.add_argument("--insecure-tfp", action="store_true",
                        help="no dealer: the server makes the correlations (benchmark only)")
    parser.add_argument("--json-out", help="also write the figures to this JSON file")
    parser.add_argument("--no-progress", action="store_true")
    return exit_status(_run, parser.parse_args(argv))


def _run(args) -> None:
    if args.n < 1 or args.batch_size < 1 or args.session_size < 1:
        raise UserError("--n, --batch-size and --session-size must be positive")
    check_relu_choice(args.relu_protocol, args.engine)  # before the plan and the data load
    plan = SecurePlan.load(args.plan) if args.plan else export_plan(args.checkpoint)
    protocols = relu_protocols(args.relu_protocol, plan.public_info(), args.engine)
    note = relu_choice_note(args.relu_protocol, protocols)
    if note:
        print(note)
    data = load_dataset(args.data, input_size=plan.input_shape[1], resize=args.resize,
                        progress=not args.no_progress)
    if tuple(data.test.images.shape[1:]) != plan.input_shape:
        raise UserError(f"{args.data} images are {tuple(data.test.images.shape[1:])}, the plan expects "
                        f"{plan.input_shape}")
    test = data.test.subset(args.n, seed=0)
    results = []
    for protocol in protocols:
        result = measure_agreement(plan, test.images, test.labels, args.batch_size, args.insecure_tfp,
                                   progress=not args.no_progress, engine=args.engine, session_size=args.session_size,
                                   **({} if protocol is None else {"relu_protocol": protocol}))
        results.append(result)
        n = result["images"]
        relu = f", ReLU protocol {protocol}" if protocol else ""
        print(f"agreement {result['argmax_agree']}/{n} ({100 * result['agreement']:.1f}%), "
              f"max |secure - plaintext| logit difference {result['max_abs_logit_diff']:.3g}"
              + (f" [{protocol}]" if len(protocols) > 1 else ""))
        print(f"accuracy: secure {100 * result['secure_accuracy']:.1f}%, "
              f"plaintext {100 * result['plaintext_accuracy']:.1f}%; "
              f"online {result['online_s_per_batch']:.2f} s per batch of {args.batch_size} ({args.engine} engine{relu})"
              + (" (INSECURE TFP)" if args.insecure_tfp else ""))
    if args.json_out:
        atomic_write_json(args.json_out, results[0] if len(results) == 1 else
                          {"relu_protocol": args.relu_protocol, "results": results})


if __name__ == "__main__":
    sys.exit(main())

"""The secure layer's `deepreduce` subcommands (export, predict, bench) and its latency hook, found by
`deepreduce` through the entry points in pyproject.toml (`deepreduce.plugins`)."""

from __future__ import annotations

import json

from deepreduce.cli import int_list


def register(sub) -> None:
    """Add export, predict and bench to the `deepreduce` parser's subcommands."""
    p = sub.add_parser("export", help="export a checkpoint to a secure plan (batch-norm folded, one file)")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, help="the plan file to write, e.g. model.plan")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="plaintext prediction on image files with a checkpoint or plan")
    p.add_argument("model", metavar="CKPT_OR_PLAN")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG/JPEG files")
    p.add_argument("--resize", action="store_true", help="resize images to the model's input size")
    p.add_argument("--json", action="store_true", help='print {"images": [records]}')
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("bench", help="private-inference latency: stock CrypTen vs this runtime, same models, one run")
    models = p.add_mutually_exclusive_group()
    models.add_argument("--frontier", metavar="DIR", help="benchmark the frontier models of `deepreduce optimize "
                        "--out DIR` (default: the golden DeepReDuce specs with random weights)")
    models.add_argument("--spec", dest="spec_files", action="append", metavar="FILE.json",
                        help="benchmark this ModelSpec with random weights (repeatable)")
    p.add_argument("--no-full", action="store_true", help="leave out the full ResNet18 (alpha 1)")
    p.add_argument("--batch-sizes", type=int_list, help="default 1,8 (--quick: 1)")
    p.add_argument("--repeats", type=int, help="runs per model and batch size, median reported (default 3, --quick 2)")
    p.add_argument("--warmup", type=int, help="runs before those, not counted (default 1): first-query start-up costs")
    p.add_argument("--quick", action="store_true",
                   help="batch 1, fewer repeats, the full ResNet18 and one model under 100K ReLUs")
    p.add_argument("--engine", help="this runtime's engine (default: the runtime's default)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds any party may wait for a peer (rendezvous, each message)")
    p.add_argument("--json-out", metavar="FILE", help="write the report as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="write latency vs ReLU count as a PNG")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_bench)


def cmd_export(args) -> None:
    from secure.core.export import export_plan
    plan = export_plan(args.checkpoint)
    plan.save(args.out)
    print(json.dumps({"plan": args.out, "plan_hash": plan.plan_hash, "relu_count": plan.relu_count,
                      "ops": len(plan.ops)}))


def cmd_predict(args) -> None:
    from secure.core.export import load_plan_or_checkpoint
    from secure.core.plaintext import predict_files
    records = predict_files(load_plan_or_checkpoint(args.model), args.images, resize=args.resize)
    if args.json:
        print(json.dumps({"images": records}))
        return
    width = max(len("image"), *(len(r["image"]) for r in records))
    print(f"{'image':<{width}}  {'class':<12} {'probability':>11}")
    for r in records:
        print(f"{r['image']:<{width}}  {r['class_name']:<12} {r['probability']:>11.4f}")


def cmd_bench(args) -> None:
    from secure.tools.bench import BenchSettings, bench_command
    settings = BenchSettings(frontier=args.frontier, spec_files=args.spec_files or [], full=not args.no_full,
                             batch_sizes=args.batch_sizes, repeats=args.repeats, warmup=args.warmup,
                             quick=args.quick, engine=args.engine, timeout_s=args.timeout,
                             json_out=args.json_out, plot=args.plot, progress=not args.no_progress)
    bench_command(settings, argv=getattr(args, "argv", None))


def measure_checkpoint(checkpoint: str, pixels) -> dict:
    """The `deepreduce.latency` hook: export `checkpoint` and run it on `pixels` (uint8 test images) with
    all three parties on this machine; online seconds, MB (sent + received) and rounds per image."""
    from deepreduce.data import normalize
    from deepreduce.errors import UserError
    from secure.core.export import export_plan
    from secure.tools.local import run_local
    plan = export_plan(checkpoint)
    if tuple(pixels.shape[1:]) != tuple(plan.input_shape):
        raise UserError(f"{checkpoint} expects {'x'.join(map(str, plan.input_shape))} images, "
                        f"the data has {tuple(pixels.shape[1:])}")
    try:
        profile = run_local(plan, normalize(pixels, plan.mean, plan.std)).profile
    except (RuntimeError, OSError) as exc:  # SecureSessionError: a party failed or timed out
        raise UserError(f"the secure run of {checkpoint} failed ({type(exc).__name__}: {exc})") from None
    n = len(pixels)
    return {"latency_s": round(profile.online_s / n, 6),
            "mb": round((profile.bytes_sent + profile.bytes_received) / 1e6 / n, 6),
            "rounds": int(profile.rounds), "latency_images": n}

"""The secure layer's `deepreduce` subcommands (export, predict, bench) and its latency hook, found by
`deepreduce` through the entry points in pyproject.toml (`deepreduce.plugins`)."""

from __future__ import annotations

import json

from deepreduce.cli import int_list


def register(sub) -> None:
    """Add export, predict and bench to the `deepreduce` parser's subcommands."""
    p = sub.add_parser("export", help="export a checkpoint, or any PyTorch CNN (--module), to a secure plan "
                       "(batch-norm folded, one file)")
    p.add_argument("checkpoint", nargs="?", help="a checkpoint written by `deepreduce train` (or use --module)")
    p.add_argument("--out", required=True, help="the plan file to write, e.g. model.plan")
    g = p.add_argument_group("any PyTorch module instead of a checkpoint")
    g.add_argument("--module", metavar="FILE.py:FACTORY", help="export the module FACTORY() returns (traced "
                   "with torch.fx in eval mode: conv, linear, batch-norm, ReLU and masked ReLU, pooling, "
                   "flatten, add, concat)")
    g.add_argument("--weights", metavar="W.pt", help="a state dict to load (torch.load weights_only=True)")
    g.add_argument("--input-shape", metavar="C,H,W", help="the per-image input shape, e.g. 3,32,32")
    g.add_argument("--classes", metavar="a,b,...", help="class names (default class0, class1, ...)")
    g.add_argument("--mean", metavar="m1,m2,m3", help="per-channel mean of [0, 1] pixels (default 0)")
    g.add_argument("--std", metavar="s1,s2,s3", help="per-channel std of [0, 1] pixels (default 1)")
    g.add_argument("--calibration", metavar="DATA", help="check that activations stay inside the secure "
                   "engines' exact range on test images of this dataset (cifar10:DIR, folder:PATH, ...) and "
                   "record the range in the plan")
    g.add_argument("--calibration-images", type=int, default=256, metavar="N",
                   help="test images used by --calibration (default 256)")
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
    models.add_argument("--plan", dest="plan_files", action="append", metavar="M.plan",
                        help="benchmark this secure plan as it is, e.g. an exported PyTorch module (repeatable); the "
                             "baseline is then CrypTen's MPC tensors on the plan (the reference engine)")
    p.add_argument("--no-full", action="store_true", help="leave out the full ResNet18 (alpha 1)")
    p.add_argument("--batch-sizes", type=int_list, help="default 1,8 (--quick: 1)")
    p.add_argument("--repeats", type=int, help="runs per model and batch size, median reported (default 3, --quick 2)")
    p.add_argument("--warmup", type=int, help="runs before those, not counted (default 1): first-query start-up costs")
    p.add_argument("--quick", action="store_true",
                   help="batch 1, fewer repeats, the full ResNet18 and one model under 100K ReLUs")
    p.add_argument("--engine", help="this runtime's engine (default: the runtime's default)")
    p.add_argument("--relu-protocol", default="auto", metavar="{auto,gmw,fss,fss-exact,both}",
                   help="this runtime's ReLU protocol (fast engine): auto (default: picked per model for its plan "
                        "and --link, LAN without one), gmw, fss, or both (each in turn, one entry each; stock CrypTen "
                        "runs once)")
    p.add_argument("--link", metavar="rtt=20ms,rate=100mbit",
                   help="run this runtime over an EMULATED link (secure.tools.linkemu: delay and rate between the "
                        "parties); stock CrypTen is then skipped. `lan` (default): no emulation")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds any party may wait for a peer (rendezvous, each message)")
    p.add_argument("--json-out", metavar="FILE", help="write the report as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="write latency vs ReLU count as a PNG")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_bench)


def cmd_export(args) -> None:
    from deepreduce.errors import UserError
    module_flags = [f"--{k.replace('_', '-')}" for k in ("weights", "input_shape", "classes", "mean", "std",
                                                            "calibration") if getattr(args, k) is not None]
    if args.module and args.checkpoint:
        raise UserError(f"export either a checkpoint or --module, not both ({args.checkpoint})")
    if args.module:
        return cmd_export_module(args)
    if not args.checkpoint:
        raise UserError("export needs a checkpoint (final.pt of `deepreduce train`) or --module FILE.py:FACTORY")
    if module_flags:
        raise UserError(f"{', '.join(module_flags)} go with --module FILE.py:FACTORY, not a checkpoint")
    from secure.core.export import export_plan
    plan = export_plan(args.checkpoint)
    plan.save(args.out)
    print(json.dumps({"plan": args.out, "plan_hash": plan.plan_hash, "relu_count": plan.relu_count,
                      "ops": len(plan.ops)}))


def _floats(flag: str, text: str | None) -> list[float] | None:
    from deepreduce.errors import UserError
    if text is None:
        return None
    try:
        return [float(t) for t in text.split(",")]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated numbers") from None


def cmd_export_module(args) -> None:
    import torch

    from deepreduce.errors import UserError
    from deepreduce.trace import load_module, parse_input_shape
    from secure.core.export import export_module
    if not args.input_shape:
        raise UserError("--module needs --input-shape C,H,W (e.g. 3,32,32)")
    shape = parse_input_shape(args.input_shape)
    mean, std = _floats("--mean", args.mean), _floats("--std", args.std)
    classes = [c.strip() for c in args.classes.split(",")] if args.classes is not None else None
    model = load_module(args.module, args.weights)
    calibration = None
    if args.calibration:
        from deepreduce.data import load_dataset, normalize
        if args.calibration_images < 1:
            raise UserError("--calibration-images must be at least 1")
        data = load_dataset(args.calibration, input_size=shape[1] if shape[1] == shape[2] else None, progress=False)
        pixels = data.test.images[:args.calibration_images]
        if tuple(pixels.shape[1:]) != shape:
            raise UserError(f"--calibration images have shape {tuple(pixels.shape[1:])}, the module takes {shape}")
        calibration = normalize(pixels, mean or [0.0] * shape[0], std or [1.0] * shape[0])
    example = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0)) if calibration is None \
        else calibration[:2]
    factory = args.module.rpartition(":")[2]
    plan = export_module(model, example, args.out, class_names=classes, mean=mean, std=std,
                         calibration=calibration, name=factory)
    out = {"plan": args.out, "plan_hash": plan.plan_hash, "relu_count": plan.relu_count,
           "comparison_count": plan.comparison_count, "ops": len(plan.ops)}
    if "value_range" in plan.spec:
        out["value_range"] = plan.spec["value_range"]
    print(json.dumps(out))


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
    from secure.tools.linkemu import parse_link
    settings = BenchSettings(frontier=args.frontier, spec_files=args.spec_files or [], plan_files=args.plan_files or [],
                             full=not args.no_full,
                             batch_sizes=args.batch_sizes, repeats=args.repeats, warmup=args.warmup,
                             quick=args.quick, engine=args.engine, relu_protocol=args.relu_protocol,
                             link=parse_link(args.link), timeout_s=args.timeout,
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

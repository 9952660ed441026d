"""The `deepreduce` command: a thin layer over the library (docs/TRAINING.md has the Python API)."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import UserError, exit_status
from .plugins import command_plugins
from .spec import THIN_MODES, ModelSpec


def int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_spec_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model spec (or --spec FILE.json)")
    g.add_argument("--spec", help="a ModelSpec JSON file; the flags below override its fields")
    g.add_argument("--arch", help="a registered architecture (deepreduce.models): resnet18 (default) or wrn22_8")
    g.add_argument("--input-size", type=int)
    g.add_argument("--classes", type=int, dest="num_classes")
    g.add_argument("--in-channels", type=int, choices=[1, 3])
    g.add_argument("--alpha", type=float, help="channel width multiplier")
    g.add_argument("--rho", type=float, help="input downsampling (stem stride round(1/rho))")
    g.add_argument("--blocks", type=int_list, help="blocks per stage, e.g. 2,1,1,1")
    g.add_argument("--cull", type=int_list, help="stages whose ReLUs are all removed, e.g. 1,4")
    g.add_argument("--thin", choices=THIN_MODES)
    g.add_argument("--stem-relu", dest="stem_relu", action="store_true", default=None)
    g.add_argument("--no-stem-relu", dest="stem_relu", action="store_false")
    g.add_argument("--remove", type=lambda t: [s for s in t.split(",") if s], help="extra ReLU sites to remove")


SPEC_FIELDS = ("arch", "input_size", "num_classes", "in_channels", "alpha", "rho", "blocks", "cull", "thin",
               "stem_relu", "remove")


def spec_from_args(args, **defaults) -> ModelSpec:
    base = ModelSpec.load(args.spec).to_dict() if args.spec else {}
    base.pop("format_version", None)
    changes = {k: getattr(args, k) for k in SPEC_FIELDS if getattr(args, k, None) is not None}
    if changes.get("arch") and changes["arch"] != base.get("arch") and "blocks" not in changes:
        base.pop("blocks", None)  # a new arch brings its own default depth
    merged = {**defaults, **base, **changes}
    return ModelSpec.from_dict(merged)


# -- count ------------------------------------------------------------------------------------

def cmd_count(args) -> None:
    if args.module:
        return cmd_count_module(args)
    if args.input_shape or args.weights:
        raise UserError("--input-shape and --weights go with --module FILE.py:FACTORY")
    from .relus import measured_relu_count, relu_count, relu_count_by_stage, relu_sites
    spec = spec_from_args(args)
    total, stages = relu_count(spec), relu_count_by_stage(spec)
    if args.json:
        out = {"relu_count": total, "stages": stages, "sites": relu_sites(spec), "spec": spec.to_dict()}
        if args.measure:
            out["measured_relu_count"] = measured_relu_count(spec)
        print(json.dumps(out))
        return
    print(f"{'stage':<6} {'ReLUs':>12} {'share':>7}")
    for name, n in stages.items():
        print(f"{name:<6} {n:>12,} {100.0 * n / max(1, total):>6.1f}%")
    print(f"{'total':<6} {total:>12,}")
    if args.measure:
        print(f"measured with forward hooks: {measured_relu_count(spec):,}")


def cmd_count_module(args) -> None:
    """`deepreduce count --module FILE.py:FACTORY --input-shape C,H,W`: ReLUs (kept positions) and
    max-pooling comparisons of any traceable module, per site."""
    from .trace import count_module, load_module, parse_input_shape
    flags = {"num_classes": "classes", "stem_relu": "(no-)stem-relu"}
    given = [f"--{flags.get(k, k.replace('_', '-'))}" for k in SPEC_FIELDS + ("spec",)
             if getattr(args, k, None) is not None]
    if given or args.measure:
        raise UserError(f"--module counts a module, not a spec: leave out {', '.join(given or ['--measure'])}")
    if not args.input_shape:
        raise UserError("--module needs --input-shape C,H,W (e.g. 3,32,32)")
    shape = parse_input_shape(args.input_shape)
    counts = count_module(load_module(args.module, args.weights), shape)
    if args.json:
        print(json.dumps({"module": args.module, **counts}))
        return
    rows = [(site, n, "ReLUs") for site, n in counts["sites"].items()] + \
           [(name, n, "comparisons") for name, n in counts["comparisons"].items()]
    width = max([len("site")] + [len(r[0]) for r in rows])
    print(f"{'site':<{width}} {'count':>12}")
    for site, n, what in rows:
        print(f"{site:<{width}} {n:>12,} {what}")
    print(f"{'total ReLUs':<{width}} {counts['relu_count']:>12,}")
    if counts["comparison_count"]:
        print(f"{'max-pooling comparisons':<{width}} {counts['comparison_count']:>12,}")


# -- train / evaluate ----------------------------------------------------------------------------

def cmd_train(args) -> None:
    from .data import load_dataset
    from .train import TrainConfig, train
    probe = spec_from_args(args)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         subset=args.subset, kd_temperature=args.kd_temperature, kd_alpha=args.kd_alpha,
                         weight_decay=args.weight_decay, compile=args.compile,
                         label_smoothing=args.label_smoothing, ema_decay=args.ema_decay)
    config.validate()  # a bad flag value fails before the data is decoded
    data = load_dataset(args.data, input_size=probe.input_size if (args.input_size or args.spec) else None,
                        resize=args.resize, progress=not args.no_progress)
    # Channels, input size and classes come from the data unless the user fixed them.
    spec = spec_from_args(args, in_channels=data.in_channels, input_size=data.input_size,
                          num_classes=len(data.classes))
    result = train(spec, data, args.out, config, teacher=args.teacher, resume=args.resume,
                   progress=not args.no_progress, init=args.init)
    print(json.dumps({"final": result.checkpoint, "test_acc": result.metrics["test_acc"],
                      "relu_count": result.metrics["relu_count"],
                      "train_seconds": result.metrics["train_seconds"]}))


def cmd_evaluate(args) -> None:
    from .checkpoint import load_checkpoint
    from .data import load_dataset
    from .train import _check_fits, evaluate_model
    ckpt = load_checkpoint(args.checkpoint)
    data = load_dataset(args.data, input_size=ckpt.spec.input_size, resize=args.resize)
    _check_fits(ckpt.spec, data)  # channels and classes too, not only the image size
    from .relus import relu_count
    model = ckpt.build()
    acc = evaluate_model(model, data.test, ckpt.mean, ckpt.std)
    # --flip adds the flip-averaged figure and never replaces the plain one: the secure runtime would
    # run two inferences per image for it (twice the online cost)
    flip_acc = evaluate_model(model, data.test, ckpt.mean, ckpt.std, flip=True) if args.flip else None
    relus = relu_count(ckpt.spec)
    if args.json:
        # accuracy: top-1 in percent (test_acc, the same figure, is kept for older readers); relu_count: per image
        doc = {"checkpoint": args.checkpoint, "test_acc": acc, "accuracy": acc, "relu_count": relus,
               "images": len(data.test)}
        if args.flip:
            doc["accuracy_flip"] = flip_acc
        print(json.dumps(doc))
        return
    print(f"top-1 accuracy: {acc:.2f}% on {len(data.test)} test images ({relus:,} ReLUs per image)")
    if args.flip:
        print(f"top-1 accuracy with flip averaging: {flip_acc:.2f}% (two inferences per image: "
              "twice the secure online cost)")


def cmd_train_bench(args) -> None:
    from .trainbench import run
    run(tuple(float(a) for a in args.alphas.split(",")), args.batch_size, args.steps, args.json_out)


# -- optimize / frontier (the DeepReDuce pipeline, deepreduce/optimize/) ---------------------------

def cmd_optimize(args) -> None:
    from .optimize import ExecutorSettings, load_config, optimize
    executor = ExecutorSettings(args.executor, workers=args.workers, address=args.ray_address,
                                cpus_per_job=args.cpus_per_job)
    executor.check()  # before the data is loaded
    config = load_config(args.config, quick=args.quick)
    optimize(args.data, args.out, config, resume=args.resume, teacher=args.teacher, quick=args.quick,
             progress=not args.no_progress, executor=executor)


def cmd_frontier(args) -> None:
    from .optimize.report import format_frontier_table, load_frontier
    if args.measure_latency:
        from .optimize.latency import measure_frontier_latency
        doc = measure_frontier_latency(args.dir, args.data, args.images, every_candidate=args.all)
    else:
        doc = load_frontier(args.dir)
    print(json.dumps(doc, indent=2) if args.json else format_frontier_table(doc, show_all=args.all))
    if not args.json and not doc.get("meta", {}).get("complete", True):
        from .optimize.pipeline import jobs_in_progress
        from .optimize.report import format_jobs_in_progress
        if rows := jobs_in_progress(args.dir):
            print("\n" + format_jobs_in_progress(rows))


# -- data ---------------------------------------------------------------------------------------

def cmd_data_download(args) -> None:
    from .download import download, get_archive
    archive = get_archive(args.dataset)
    result = download(archive, args.dir, url=args.url, progress=not args.no_progress,
                      echo=lambda msg: print(msg, file=sys.stderr))
    verb = "downloaded to" if result.downloaded else "is already in"
    print(f"{archive.name} {verb} {result.path}: train with --data {archive.name}:{args.dir}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepreduce", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("count", help="ReLU count of a spec, per stage (or of any PyTorch module: --module)")
    add_spec_args(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--measure", action="store_true", help="also measure with forward hooks")
    g = p.add_argument_group("any PyTorch module instead of a spec")
    g.add_argument("--module", metavar="FILE.py:FACTORY",
                   help="count the module FACTORY() returns (traced with torch.fx; MaskedReLU and "
                        "relu(x) * m + x * (1 - m) count kept positions only)")
    g.add_argument("--input-shape", metavar="C,H,W", help="the per-image input shape, e.g. 3,32,32")
    g.add_argument("--weights", metavar="W.pt", help="a state dict to load (torch.load weights_only=True)")
    p.set_defaults(func=cmd_count)

    p = sub.add_parser("train", help="train a spec on a dataset (resumable)")
    add_spec_args(p)
    p.add_argument("--data", required=True, help="cifar10:DIR, cifar100:DIR, folder:PATH or tinyimagenet:DIR")
    p.add_argument("--out", required=True, help="run directory (last.pt, final.pt)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--subset", type=int, help="train on a fixed random subset of N images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resize", action="store_true", help="resize images to the spec's input size")
    p.add_argument("--teacher", help="checkpoint to distil from (Hinton KD)")
    p.add_argument("--init", metavar="CKPT", help="warm start: copy the weights of CKPT whose names and shapes "
                   "match (e.g. the all-ReLU teacher into a culled or thinned student)")
    p.add_argument("--kd-temperature", type=float, default=4.0)
    p.add_argument("--kd-alpha", type=float, default=0.9)
    p.add_argument("--label-smoothing", type=float, default=0.0, metavar="EPS",
                   help="label smoothing of the hard-label loss, in [0, 1) (with --teacher too; default 0)")
    p.add_argument("--ema", type=float, default=0.0, metavar="DECAY", dest="ema_decay",
                   help="keep an exponential moving average of the weights with this decay, in [0, 1) "
                        "(e.g. 0.999; 0 = off): it is evaluated each epoch and saved in final.pt")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (faster long runs)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="top-1 accuracy of a checkpoint on a dataset's test split")
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True)
    p.add_argument("--resize", action="store_true")
    p.add_argument("--flip", action="store_true",
                   help="also report the accuracy with test-time horizontal-flip averaging (softmax of the "
                        "image and its mirror; two inferences per image)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("train-bench", help="training speed (images/s) on this machine per width multiplier")
    p.add_argument("--alphas", default="1,0.5,0.25")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--json-out", help="also write the figures as JSON")
    p.set_defaults(func=cmd_train_bench)

    p = sub.add_parser("optimize", help="DeepReDuce: train candidates and write their Pareto frontier (resumable)")
    p.add_argument("--data", required=True, help="cifar10:DIR, cifar100:DIR, folder:PATH or tinyimagenet:DIR")
    p.add_argument("--config", help="YAML config (only the keys it changes; default: the built-in "
                   "resnet18-cifar.yaml; built-in names such as wrn22_8-cifar.yaml work too)")
    p.add_argument("--out", required=True, help="run directory (jobs/, criticality.json, frontier.json/csv/png)")
    p.add_argument("--resume", action="store_true", help="continue a killed run: finished jobs are skipped")
    p.add_argument("--quick", action="store_true", help="apply the config's `quick` overrides (a smoke run in minutes)")
    p.add_argument("--teacher", help="use this checkpoint as the KD teacher instead of training one")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("where the jobs run (docs/RAY.md)")
    g.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: one job after another in this process (default); ray: independent jobs side by "
                        "side as Ray tasks, one GPU each where the cluster has GPUs (pip install -e '.[ray]')")
    g.add_argument("--workers", type=int, help="ray: job slots of the local Ray instance started for the run "
                   "(default: its GPUs, else CPUs / --cpus-per-job); with --ray-address, the most jobs in flight")
    g.add_argument("--ray-address", help="ray: connect to this cluster (auto, HOST:6379) instead of starting a "
                   "local instance; --out must be on a filesystem every node mounts at the same path")
    g.add_argument("--cpus-per-job", type=int, default=1,
                   help="ray: CPUs each job asks for and uses as torch threads (default 1)")
    p.set_defaults(func=cmd_optimize)

    p = sub.add_parser("frontier", help="print the frontier of an optimize run (optionally measure secure latency)")
    p.add_argument("dir", help="the optimize --out directory")
    p.add_argument("--all", action="store_true",
                   help="list (and with --measure-latency measure) every candidate, not only the frontier")
    p.add_argument("--json", action="store_true", help="print frontier.json")
    p.add_argument("--measure-latency", action="store_true",
                   help="run each frontier model in the two-party secure runtime and record latency/MB/rounds, "
                        "the latency frontier and where the ReLU count misleads as a cost proxy")
    p.add_argument("--images", type=int, default=4, help="test images per latency measurement")
    p.add_argument("--data", help="dataset for the latency images (default: the run's)")
    p.set_defaults(func=cmd_frontier)

    p = sub.add_parser("data", help="datasets: download CIFAR-10/100 for --data cifar10:DIR")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("download", help="download, verify (MD5) and extract a dataset into DIR (resumable)")
    p.add_argument("dataset", metavar="{cifar10,cifar100}", help="the dataset to download")
    p.add_argument("dir", help="where to put it; then train with --data DATASET:DIR")
    p.add_argument("--url", help="download from here instead (a mirror, file:///path or a local path); "
                   "the checksum still applies")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_data_download)

    for register in command_plugins():  # e.g. export, predict, bench from the secure layer
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded by `bench`
    try:
        return exit_status(args.func, args)
    except KeyboardInterrupt:
        return 130
    finally:
        if "torch.distributed" in sys.modules:  # a torchrun rank leaves its group before exiting
            from .train import end_distributed
            end_distributed()


if __name__ == "__main__":
    sys.exit(main())

"""Bring your own model: the test architectures of tests/test_trace.py, exported with `secure.export_module`
and run in both engines. Per model: ReLUs, max-pool comparisons, online latency, MB sent / received and
rounds per image at batch 1 (`secure.tools.measure.measure_cost`, the server party's figures) in the fast
and the CrypTen engine, and secure / plaintext agreement on real CIFAR-10 test images in both
(`secure.tools.agreement.measure_agreement`).

    python scripts/any_model_table.py --json-out docs/measurements/any-model-table.json
    python scripts/any_model_table.py --models vgg,mobilenet --images 20      # a quick look

Random weights (fixed seeds, tests/support/models.py); the batch-norm statistics are then measured on a few
real training images, so that the activations have the ranges of real inputs. The widths are the tests'
small ones, so that the whole table stays well within 15 minutes on a 2-core CPU (226 s, docs/RESULTS.md).
Needs the CrypTen engine's dependencies (CrypTen 0.4.1) for --engines crypten.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the architectures live with the tests (support.models)

from deepreduce.checkpoint import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402
from deepreduce.data import load_dataset, normalize  # noqa: E402
from deepreduce.fileio import atomic_write_json  # noqa: E402
from secure import export_module  # noqa: E402
from secure.core.plaintext import run_plaintext  # noqa: E402
from secure.tools.agreement import measure_agreement  # noqa: E402
from secure.tools.bench import machine_info  # noqa: E402
from secure.tools.measure import measure_cost  # noqa: E402
from support import models as M  # noqa: E402

DEFAULT_DATA = f"folder:{ROOT.parent / 'shared' / 'data' / 'cifar10-jpeg.tar.gz'}"
ENGINES = ("fast", "crypten")
# name: (what it is, factory); the widths of tests/test_trace.py
MODELS = {
    "resnet18": ("torchvision-style ResNet-18, width 16", lambda: M.resnet18(width=16)),
    "resnet50": ("torchvision-style ResNet-50 (bottleneck), width 8", lambda: M.resnet50(width=8)),
    "vgg": ("VGG with 2x2 max pooling, width 16", lambda: M.vgg(width=16)),
    "mobilenet": ("MobileNet, depthwise (one dilated) convolutions, width 8", lambda: M.mobilenet(width=8)),
    "concat": ("DenseNet/Inception-style concatenation net", M.concatnet),
    "resnet18-snl": ("ResNet-18 width 16, SNL masks per channel and per pixel", lambda: M.resnet18(act=M.snl_act)),
}


def calibrate_bn(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """Batch-norm running statistics measured on `images` (a cumulative average in train mode), the model
    then in eval mode; the random affine parameters stay."""
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        model(images)
    return model.eval()


def measure_model(name: str, data, calibration: torch.Tensor, test, engines, bar) -> dict:
    """One row: export (the plan checked against the module, its value range on the calibration images),
    then cost and agreement in each engine (each step advances `bar`)."""
    what, factory = MODELS[name]
    plan = export_module(calibrate_bn(factory(), calibration), calibration[:4], None, class_names=data.classes,
                         mean=CIFAR10_MEAN, std=CIFAR10_STD, calibration=calibration, name=name)
    plain = run_plaintext(plan, normalize(test.images, plan.mean, plan.std))
    top2 = plain.topk(2, dim=1).values
    margins = top2[:, 0] - top2[:, 1]  # per image, the top class's logit minus the runner-up's
    row = {"model": name, "description": what, "plan_hash": plan.plan_hash, "value_range": plan.spec["value_range"],
           "relu_count": plan.relu_count, "comparison_count": plan.comparison_count, "ops": len(plan.ops),
           "plaintext_logit_max_abs": plain.abs().max().item(), "plaintext_top2_margin_median": margins.median().item(),
           "cost": {}, "agreement": {}}
    for engine in engines:
        bar.set_postfix(model=name, step=f"{engine} cost")
        started = time.perf_counter()
        row["cost"][engine] = {**measure_cost(plan, batch_size=1, engine=engine),
                               "wall_s": time.perf_counter() - started}
        bar.update()
        bar.set_postfix(model=name, step=f"{engine} agreement")
        started = time.perf_counter()
        # one session of all the images: the crypten engine runs one batch per session
        agreement = measure_agreement(plan, test.images, test.labels, batch_size=len(test.images), progress=False,
                                      engine=engine)
        row["agreement"][engine] = {**agreement, "near_ties": near_ties(margins, agreement["max_abs_logit_diff"]),
                                    "wall_s": time.perf_counter() - started}
        bar.update()
    return row


def near_ties(margins: torch.Tensor, max_diff: float) -> int:
    """Images whose top two plaintext logits are closer than twice the largest secure logit error: the only
    ones whose argmax the engine's rounding can flip (random weights leave many such near ties)."""
    return int((margins < 2 * max_diff).sum())


def table(rows: list[dict], engines) -> str:
    head = ["model", "ReLUs", "max-pool comparisons"]
    for engine in engines:
        head += [f"{engine} online s/img", f"{engine} MB sent / recv per img", f"{engine} rounds",
                 f"{engine} agreement (max logit diff; near ties)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["model"], f"{row['relu_count']:,}", f"{row['comparison_count']:,}"]
        for engine in engines:
            cost, agree = row["cost"][engine], row["agreement"][engine]
            cells += [f"{cost['online_s_per_image']:.3f}",
                      f"{cost['mb_sent_per_image']:.2f} / {cost['mb_received_per_image']:.2f}", str(cost["rounds"]),
                      f"{agree['argmax_agree']}/{agree['images']} ({agree['max_abs_logit_diff']:.2g}; "
                      f"{agree['near_ties']})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DEFAULT_DATA, help=f"CIFAR-10 as a --data argument (default {DEFAULT_DATA})")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, of: " + ", ".join(MODELS))
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--images", type=int, default=100, help="test images for the agreement")
    parser.add_argument("--calibration-images", type=int, default=64, help="training images for batch-norm")
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)
    names, engines = args.models.split(","), args.engines.split(",")
    unknown = [n for n in names if n not in MODELS] + [e for e in engines if e not in ENGINES]
    if unknown:
        parser.error(f"unknown model or engine: {', '.join(unknown)}")
    torch.set_num_threads(1)  # the parties are processes of their own; this one only exports and checks
    started, load_before = time.perf_counter(), os.getloadavg()  # other work on the machine shows here
    data = load_dataset(args.data, progress=True)
    calibration = normalize(data.train.subset(args.calibration_images, seed=1).images, CIFAR10_MEAN, CIFAR10_STD)
    test = data.test.subset(args.images, seed=0)  # as `python -m secure.agreement`
    rows = []
    with tqdm(total=len(names) * len(engines) * 2, unit="step", desc="models") as bar:
        for name in names:
            rows.append(measure_model(name, data, calibration, test, engines, bar))
    print(table(rows, engines))
    wall = time.perf_counter() - started
    print(f"{wall:.0f} s in all")
    if args.json_out:
        atomic_write_json(args.json_out, {
            "command": "python scripts/any_model_table.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "data": args.data, "images": args.images, "calibration_images": args.calibration_images,
            "batch_size_cost": 1, "wall_s": wall, "load_average_before": load_before,
            "load_average_after": os.getloadavg(), "machine": machine_info(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Private-inference cost of frontier models: `deepreduce frontier DIR --measure-latency`.

Each frontier checkpoint is exported to a secure plan (`secure.plan.export_plan`) and run on a few
real test images by the two-party runtime on this machine (`secure.runtime.run_local`). Per point
it records ``latency_s`` (online seconds per image), ``mb`` (bytes sent + received per image, in
MB) and ``rounds`` (communication rounds of the batch), then redraws the frontier files, including
frontier-latency.png (accuracy vs latency). This module is the only optimizer code that touches
`secure`, and only when asked to.
"""

from __future__ import annotations

import os

from ..data import load_dataset, normalize
from ..errors import UserError
from .report import add_latency_summary, load_frontier, write_reports


def secure_runtime():
    """(export_plan, run_local), or a UserError when the secure runtime is not available."""
    try:
        from secure.plan import export_plan
        from secure.runtime import run_local
    except ImportError as exc:
        raise UserError(f"--measure-latency needs the secure runtime (secure.runtime.run_local), which cannot "
                        f"be imported here ({exc}): install the project with its secure extras (crypten)") from None
    return export_plan, run_local


def measure_frontier_latency(out_dir: str, data_arg: str | None = None, images: int = 4, log=print,
                             every_candidate: bool = False) -> dict:
    """Measure every frontier point (or every candidate), store the figures in frontier.json, with the
    latency frontier and the pairs where the ReLU count misleads (report.add_latency_summary)."""
    if images < 1:
        raise UserError(f"--images must be at least 1, got {images}")
    export_plan, run_local = secure_runtime()
    doc = load_frontier(out_dir)
    data_arg = data_arg or doc.get("meta", {}).get("data")
    if not data_arg:
        raise UserError(f"{out_dir}/frontier.json does not name its dataset: pass --data")
    data = load_dataset(data_arg, progress=False)
    for point in doc["candidates"] if every_candidate else doc["frontier"]:
        figures = measure_point(os.path.join(out_dir, point["checkpoint"]), data, images, export_plan, run_local)
        same = [c for c in doc["candidates"] + doc["frontier"] + list(doc["budget_picks"].values())
                if c and c["name"] == point["name"]]
        for entry in [point] + same:
            entry.update(figures)
        log(f"{point['name']}: {figures['latency_s']:.3f} s/image, {figures['mb']:.2f} MB/image, "
            f"{figures['rounds']} rounds")
    add_latency_summary(doc)
    write_reports(out_dir, doc)
    return doc


def measure_point(checkpoint: str, data, images: int, export_plan, run_local) -> dict:
    plan = export_plan(checkpoint)
    c, h, w = plan.input_shape
    pixels = data.test.images[:images]
    if tuple(pixels.shape[1:]) != (c, h, w):
        raise UserError(f"{checkpoint} expects {c}x{h}x{w} images, the data has {tuple(pixels.shape[1:])}")
    try:
        profile = run_local(plan, normalize(pixels, plan.mean, plan.std)).profile
    except (RuntimeError, OSError) as exc:  # e.g. secure.runtime.SecureSessionError: a party failed or timed out
        raise UserError(f"the secure run of {checkpoint} failed ({type(exc).__name__}: {exc})") from None
    n = len(pixels)
    return {"latency_s": round(profile.online_s / n, 6),
            "mb": round((profile.bytes_sent + profile.bytes_received) / 1e6 / n, 6),
            "rounds": int(profile.rounds), "latency_images": n}

"""Private-inference cost of frontier models: `deepreduce frontier DIR --measure-latency`.

Each frontier checkpoint is run on a few real test images by the measurer an upper layer installs
(`deepreduce.plugins.latency_measurer`: the secure layer exports it to a plan and runs the two-party
runtime on this machine). Per point it records ``latency_s`` (online seconds per image), ``mb`` (bytes sent + received per image, in
MB) and ``rounds`` (communication rounds of the batch), then redraws the frontier files, including
frontier-latency.png (accuracy vs latency).
"""

from __future__ import annotations

import os

from ..data import load_dataset
from ..errors import UserError
from ..plugins import latency_measurer
from .report import add_latency_summary, load_frontier, write_reports


def measure_frontier_latency(out_dir: str, data_arg: str | None = None, images: int = 4, log=print,
                             every_candidate: bool = False) -> dict:
    """Measure every frontier point (or every candidate), store the figures in frontier.json, with the
    latency frontier and the pairs where the ReLU count misleads (report.add_latency_summary)."""
    if images < 1:
        raise UserError(f"--images must be at least 1, got {images}")
    measure = latency_measurer()
    doc = load_frontier(out_dir)
    data_arg = data_arg or doc.get("meta", {}).get("data")
    if not data_arg:
        raise UserError(f"{out_dir}/frontier.json does not name its dataset: pass --data")
    data = load_dataset(data_arg, progress=False)
    for point in doc["candidates"] if every_candidate else doc["frontier"]:
        figures = measure(os.path.join(out_dir, point["checkpoint"]), data.test.images[:images])
        same = [c for c in doc["candidates"] + doc["frontier"] + list(doc["budget_picks"].values())
                if c and c["name"] == point["name"]]
        for entry in [point] + same:
            entry.update(figures)
        log(f"{point['name']}: {figures['latency_s']:.3f} s/image, {figures['mb']:.2f} MB/image, "
            f"{figures['rounds']} rounds")
    add_latency_summary(doc)
    write_reports(out_dir, doc)
    return doc

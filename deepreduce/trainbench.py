"""Training-speed benchmark: images/s of a full SGD step on this machine, per width multiplier."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .models import build_model
from .train import memory_format
from .relus import relu_count
from .spec import ModelSpec


def measure_train_speed(spec: ModelSpec, batch_size: int = 256, steps: int = 5, warmup: int = 2) -> dict:
    """Forward + backward + SGD step on random data (the data pipeline is not the bottleneck)."""
    model = build_model(spec)
    fmt = memory_format(model)
    model = model.to(memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(batch_size, spec.in_channels, spec.input_size, spec.input_size).to(
        memory_format=fmt)
    y = torch.randint(0, spec.num_classes, (batch_size,))
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seconds = (time.perf_counter() - start) / steps
    ips = batch_size / seconds
    return {"arch": spec.arch, "alpha": spec.alpha, "relu_count": relu_count(spec), "batch_size": batch_size,
            "images_per_s": round(ips, 1), "cifar10_epoch_min": round(50000 / ips / 60, 2),
            "threads": torch.get_num_threads()}


def run(alphas=(1.0, 0.5, 0.25), batch_size: int = 256, steps: int = 5, json_out: str | None = None) -> list[dict]:
    rows = [measure_train_speed(ModelSpec(alpha=a), batch_size, steps) for a in alphas]
    print(f"{'alpha':>6} {'ReLUs':>9} {'img/s':>8} {'min/epoch (50k)':>16}")
    for r in rows:
        print(f"{r['alpha']:>6} {r['relu_count']:>9,} {r['images_per_s']:>8.1f} {r['cifar10_epoch_min']:>16.2f}")
    if json_out:
        from .fileio import atomic_write_json
        atomic_write_json(json_out, {"threads": torch.get_num_threads(), "rows": rows})
    return rows

"""Training with SGD (Nesterov), one-cycle schedule, optional KD, atomic per-epoch checkpoints.

Hyperparameters live in `TrainConfig` (one visible place). `train()` is resumable: `DIR/last.pt`
holds model, optimizer, scheduler and RNG state after every epoch; `DIR/final.pt` is the
self-contained checkpoint (see checkpoint.py). Under torchrun (WORLD_SIZE > 1) it trains
data-parallel with DistributedDataParallel (gloo on CPU, nccl on CUDA).
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .checkpoint import Checkpoint, atomic_torch_save, load_checkpoint
from .fileio import remove_stale_temps
from .data import Dataset, Split, augment_batch, normalize
from .errors import UserError
from .kd import kd_loss
from .models import build_model
from .relus import relu_count
from .spec import ModelSpec

LAST = "last.pt"
FINAL = "final.pt"


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 256
    lr: float = 0.2            # peak of the one-cycle schedule (for batch 256)
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    warmup_frac: float = 0.15  # fraction of steps spent rising to the peak lr
    seed: int = 0
    subset: int | None = None  # train on a fixed random subset of this many images
    kd_temperature: float = 4.0
    kd_alpha: float = 0.9
    eval_batch_size: int = 1000
    compile: bool = False      # torch.compile the training step (~15% faster on CPU after ~1 min)

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise UserError("--epochs and --batch-size must be positive")
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.kd_alpha <= 1 or self.kd_temperature <= 0:
            raise UserError("--kd-alpha must be in [0, 1] and --kd-temperature positive")


@dataclass
class TrainResult:
    checkpoint: str
    metrics: dict
    history: list = field(default_factory=list)


def one_cycle(total_steps: int, warmup_frac: float):
    """LR multiplier: linear rise from 0.1 to 1 over the warm-up, then linear decay to 0."""
    peak = max(1, round(total_steps * warmup_frac))

    def factor(step: int) -> float:
        if step < peak:
            return 0.1 + 0.9 * step / peak
        return max(0.0, (total_steps - step) / max(1, total_steps - peak))
    return factor


def memory_format(model: nn.Module) -> torch.memory_format:
    """channels_last makes convolutions faster on CPU and GPU, but oneDNN crashes on very narrow
    ones ("double free" with 4-channel convs): keep those contiguous."""
    narrowest = min(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))
    return torch.channels_last if narrowest >= 8 else torch.contiguous_format


def device() -> torch.device:
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
        else torch.device("cpu")


def evaluate_model(model: nn.Module, split: Split, mean, std, batch_size: int = 1000) -> float:
    """Top-1 accuracy in percent."""
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(split), batch_size):
            x = normalize(split.images[i:i + batch_size], mean, std).to(dev)
            correct += (model(x).argmax(1).cpu() == split.labels[i:i + batch_size]).sum().item()
    model.train(was_training)
    return 100.0 * correct / max(1, len(split))


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def end_distributed() -> None:
    """Tear down the process group `_distributed` opened, if any.

    DDP's reducer can sit in a reference cycle after `train` returns; collecting it while the group
    is alive, then destroying the group, keeps gloo's threads from being torn down at interpreter
    exit (which aborts the process with "terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def _sync_buffers(model: nn.Module, world: int) -> None:
    """Average BN running statistics across ranks so every rank ends with the same model."""
    if world > 1:
        for buf in model.buffers():
            if buf.dtype.is_floating_point:
                dist.all_reduce(buf)
                buf.div_(world)


def train(spec: ModelSpec, data: Dataset, out_dir: str, config: TrainConfig | None = None,
          teacher: str | None = None, resume: bool = False, progress: bool = True,
          log=print, init: str | None = None) -> TrainResult:
    """Train `spec` on `data`, writing DIR/last.pt every epoch and DIR/final.pt at the end.

    `init`: a checkpoint to warm-start from (see `warm_start`); a resumed run ignores it."""
    config = config or TrainConfig()
    config.validate()
    _check_fits(spec, data)
    rank, world = _distributed()
    dev = device()
    torch.manual_seed(config.seed)
    model = build_model(spec)
    last_path = os.path.join(out_dir, LAST)
    resuming = resume and os.path.isfile(last_path)
    if init and not resuming:  # a resume loads last.pt's weights instead
        warm = warm_start(model, init)
        if rank == 0:
            log(json.dumps({"warm_start": init, **warm}))
    fmt = memory_format(model)
    model = model.to(dev, memory_format=fmt)
    train_split = data.train.subset(config.subset, config.seed) if config.subset else data.train
    steps_per_epoch = max(1, len(train_split) // config.batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                nesterov=config.nesterov, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, one_cycle(config.epochs * steps_per_epoch, config.warmup_frac))
    teacher_model = _load_teacher(teacher, spec, data, dev, config.compile)
    history, start_epoch = [], 0
    if resume and rank == 0:
        remove_stale_temps(out_dir)  # a kill during a checkpoint write leaves one
    if resuming:
        state = torch.load(last_path, map_location=dev, weights_only=True)
        _check_resumable(state, spec, config, last_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        history, start_epoch = state["history"], state["epoch"]
        if rank == 0:
            log(json.dumps({"resumed_from_epoch": start_epoch}))
    ddp = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if config.compile:
        ddp = torch.compile(ddp)

    for epoch in range(start_epoch, config.epochs):
        t0 = time.time()
        stats = _train_epoch(ddp, teacher_model, train_split, data, config, optimizer, scheduler,
                             epoch, steps_per_epoch, rank, world, dev, progress)
        _sync_buffers(model, world)
        seconds = time.time() - t0
        test_acc = evaluate_model(model, data.test, data.mean, data.std, config.eval_batch_size) if rank == 0 else None
        row = {"epoch": epoch + 1, **stats, "test_acc": test_acc, "lr": scheduler.get_last_lr()[0],
               "seconds": round(seconds, 2), "images_per_s": round(stats["images"] / seconds, 1)}
        history.append(row)
        if rank == 0:
            log(json.dumps(row))
            atomic_torch_save({"epoch": epoch + 1, "model": model.state_dict(),
                               "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                               "rng": torch.get_rng_state(), "history": history,
                               "spec": spec.to_dict(), "config": asdict(config)}, last_path)
        if world > 1:
            dist.barrier()

    final_path = os.path.join(out_dir, FINAL)
    metrics = {"test_acc": history[-1]["test_acc"] if history else None, "epochs": config.epochs,
               "relu_count": relu_count(spec), "train_seconds": round(sum(h["seconds"] for h in history), 1),
               "teacher": teacher, "init": init, "config": asdict(config), "data": data.name}
    if rank == 0:
        Checkpoint(spec, model.state_dict(), data.mean, data.std, data.classes, metrics).save(final_path)
    return TrainResult(final_path, metrics, history)


def training_progress(out_dir: str) -> dict | None:
    """How far an unfinished training in `out_dir` got, from its last.pt (None before the first
    epoch ends): epochs done and planned, the last epoch's test accuracy, the mean epoch time."""
    path = os.path.join(out_dir, LAST)
    if not os.path.isfile(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        history = state["history"]
        return {"epochs_done": state["epoch"], "epochs": state["config"]["epochs"],
                "test_acc": history[-1]["test_acc"] if history else None,
                "seconds_per_epoch": sum(h["seconds"] for h in history) / len(history) if history else None}
    except Exception:  # noqa: BLE001 -- a status display reports a damaged file, it does not fail on it
        return {"unreadable": path}


def _train_epoch(model, teacher, split, data, config, optimizer, scheduler, epoch, steps,
                 rank, world, dev, progress) -> dict:
    model.train()
    # One permutation per epoch from (seed, epoch): identical on every rank and after a resume.
    gen = torch.Generator().manual_seed(config.seed * 100003 + epoch)
    order = torch.randperm(len(split), generator=gen)
    per_rank = config.batch_size // world
    fmt = memory_format(model)
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch", leave=False,
               disable=not progress or rank != 0, file=sys.stderr, mininterval=1.0)
    for step in bar:
        idx = order[step * config.batch_size:(step + 1) * config.batch_size]
        idx = idx[rank * per_rank:(rank + 1) * per_rank]
        pixels = augment_batch(split.images[idx], gen)
        x = normalize(pixels, data.mean, data.std).to(dev, memory_format=fmt)
        y = split.labels[idx].to(dev)
        logits = model(x)
        if teacher is not None:
            with torch.no_grad():
                t_logits = teacher(x)
            loss = kd_loss(logits, t_logits, y, config.kd_temperature, config.kd_alpha)
        else:
            loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if not math.isfinite(loss.item()):
            raise UserError(f"training diverged (loss {loss.item()}) at epoch {epoch + 1}: lower --lr")
        total_loss += loss.item() * len(idx)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(idx)
    return {"train_loss": round(total_loss / max(1, seen), 4), "train_acc": round(100.0 * correct / max(1, seen), 2),
            "images": seen * world}


def warm_start(model: nn.Module, path: str) -> dict:
    """Copy every tensor of checkpoint `path` whose name and shape match into `model`.

    Removing ReLUs (culling, thinning) or downsampling the input (rho) keeps every weight's shape,
    so such a student starts from the teacher's weights and only has to adapt; a narrower student
    (alpha) matches nothing but the classifier's bias and in effect starts from scratch. Returns how
    many tensors were copied."""
    source = load_checkpoint(path).state_dict
    # Scalars (BatchNorm's num_batches_tracked) always match in shape but carry no weights.
    target = {k: v for k, v in model.state_dict().items() if v.dim() > 0}
    matched = {k: v for k, v in source.items() if k in target and target[k].shape == v.shape}
    model.load_state_dict(matched, strict=False)
    return {"tensors_copied": len(matched), "tensors_total": len(target)}


def _load_teacher(path, spec, data, dev, compile_model=False):
    """The KD teacher, in eval mode, in the student's memory format (its input's). Its forward pass
    costs more than the student's training step for rho 0.5 students (about 60% of a final's epoch
    here), so with `compile` it is compiled too: 0.80 -> 0.58-0.67 s per 256-image batch on this 2-core
    CPU (channels_last alone measured no faster)."""
    if path is None:
        return None
    ckpt = load_checkpoint(path)
    if ckpt.spec.num_classes != spec.num_classes or ckpt.spec.in_channels != spec.in_channels:
        raise UserError(f"teacher {path} has {ckpt.spec.num_classes} classes / {ckpt.spec.in_channels} channels, "
                        f"the student {spec.num_classes} / {spec.in_channels}: use a teacher trained on this data")
    model = ckpt.build()
    model = model.to(dev, memory_format=memory_format(model))
    return torch.compile(model) if compile_model else model


def _check_fits(spec: ModelSpec, data: Dataset) -> None:
    if spec.in_channels != data.in_channels or spec.input_size != data.input_size:
        raise UserError(f"the spec expects {spec.in_channels}x{spec.input_size}x{spec.input_size} inputs but "
                        f"{data.name} has {data.in_channels}x{data.input_size}x{data.input_size}: "
                        "pass --input-size/--resize or fix the spec")
    if spec.num_classes != len(data.classes):
        raise UserError(f"the spec has {spec.num_classes} classes but {data.name} has {len(data.classes)}")


def _check_resumable(state: dict, spec: ModelSpec, config: TrainConfig, path: str) -> None:
    if state.get("spec") != spec.to_dict() or state.get("config") != asdict(config):
        raise UserError(f"{path} was written with another spec or configuration: "
                        "use a fresh --out directory or the same arguments as the interrupted run")

"""Training with SGD (Nesterov), one-cycle schedule, optional KD, atomic per-epoch checkpoints.

Hyperparameters live in `TrainConfig` (one visible place). `train()` is resumable: `DIR/last.pt`
holds model, optimizer, scheduler and RNG state after every epoch; `DIR/final.pt` is the
self-contained checkpoint (see checkpoint.py). Under torchrun (WORLD_SIZE > 1) it trains
data-parallel with DistributedDataParallel (gloo on CPU, nccl on CUDA).

Recipe options, all off by default: label smoothing (with or without KD), an exponential moving
average of the weights (`ema_decay`; the EMA weights are the ones evaluated and saved), and test-time
horizontal-flip averaging (`evaluate_model(flip=True)`).
"""

from __future__ import annotations

import copy
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
    # Exponential moving average of the weights (0 = off; e.g. 0.999): after every optimizer step
    # ema = decay * ema + (1 - decay) * weights; the EMA is what is evaluated and saved (see WeightEMA).
    # A field added here must default to the behaviour of the code before it: a last.pt written
    # without it resumes as if it were at its default (_check_resumable).
    ema_decay: float = 0.0

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise UserError("--epochs and --batch-size must be positive")
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.kd_alpha <= 1 or self.kd_temperature <= 0:
            raise UserError("--kd-alpha must be in [0, 1] and --kd-temperature positive")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"--ema (the EMA decay) must be in [0, 1) (0 = off, e.g. 0.999), got {self.ema_decay}")


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


def evaluate_model(model: nn.Module, split: Split, mean, std, batch_size: int = 1000, flip: bool = False) -> float:
    """Top-1 accuracy in percent.

    `flip`: test-time augmentation; the prediction is the argmax of the mean of the softmax
    probabilities of the image and of its horizontal mirror (the flip the training augmentation
    uses). Probabilities rather than logits: the usual rule for averaging predictions, and each view
    weighs at most 1, so one over-confident view cannot outvote the other by its logit scale; a
    secure client computes it in plaintext on the two outputs it receives. It takes two forward
    passes per image, which doubles the secure online cost: report the plain figure beside it."""
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(split), batch_size):
            x = normalize(split.images[i:i + batch_size], mean, std).to(dev)
            scores = model(x)
            if flip:
                scores = (F.softmax(scores.float(), dim=1) + F.softmax(model(x.flip(3)).float(), dim=1)) / 2
            correct += (scores.argmax(1).cpu() == split.labels[i:i + batch_size]).sum().item()
    model.train(was_training)
    return 100.0 * correct / max(1, len(split))


class WeightEMA:
    """An exponential moving average of a module's parameters and buffers, in a copy of the module.

    `update(live)` after every optimizer step: ema = decay * ema + (1 - decay) * live for every
    floating-point tensor of the state dict. BatchNorm running statistics are averaged, not copied:
    copied, they would be the statistics of the live weights' activations, paired with other
    (averaged) weights; averaged with the same decay, they follow the weight average's trajectory
    (a running mean is itself a linear average of recent batch statistics, so this is the EMA of
    those statistics over the same horizon). Integer buffers (num_batches_tracked) are copied.
    `live` is the plain module (not its DDP or torch.compile wrapper: both share its tensors), so
    the keys are the plain state dict's and the copy can be saved and evaluated as it is."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, live: nn.Module) -> None:
        ema, new = self.module.state_dict(), live.state_dict()
        floats = [k for k, v in ema.items() if v.dtype.is_floating_point]
        # lerp: ema + (1 - decay) * (live - ema), i.e. decay * ema + (1 - decay) * live
        torch._foreach_lerp_([ema[k] for k in floats], [new[k] for k in floats], 1.0 - self.decay)
        for k, v in ema.items():
            if not v.dtype.is_floating_point:
                v.copy_(new[k])

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)


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
    ema = WeightEMA(model, config.ema_decay) if config.ema_decay > 0 else None  # from the initial weights
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
        if ema is not None:
            if "ema" not in state:  # cannot happen with a matching config; a hand-edited file, say
                raise UserError(f"{last_path} holds no EMA of the weights: use a fresh --out directory")
            ema.load_state_dict(state["ema"])
        history, start_epoch = state["history"], state["epoch"]
        if rank == 0:
            log(json.dumps({"resumed_from_epoch": start_epoch}))
    ddp = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if config.compile:
        ddp = torch.compile(ddp)

    for epoch in range(start_epoch, config.epochs):
        t0 = time.time()
        stats = _train_epoch(ddp, teacher_model, train_split, data, config, optimizer, scheduler,
                             epoch, steps_per_epoch, rank, world, dev, progress,
                             ema_update=(lambda: ema.update(model)) if ema is not None else None)
        _sync_buffers(model, world)
        if ema is not None:  # averaging the ranks' EMAs of BN statistics = the EMA of the averaged statistics
            _sync_buffers(ema.module, world)
        seconds = time.time() - t0
        # test_acc: the weights that are saved (the EMA when on); test_acc_raw: the live ones (EMA only)
        evaluated = {"test_acc": ema.module if ema is not None else model}
        if ema is not None:
            evaluated["test_acc_raw"] = model
        accs = {key: evaluate_model(m, data.test, data.mean, data.std, config.eval_batch_size) if rank == 0 else None
                for key, m in evaluated.items()}
        row = {"epoch": epoch + 1, **stats, **accs, "lr": scheduler.get_last_lr()[0],
               "seconds": round(seconds, 2), "images_per_s": round(stats["images"] / seconds, 1)}
        history.append(row)
        if rank == 0:
            log(json.dumps(row))
            atomic_torch_save({"epoch": epoch + 1, "model": model.state_dict(),
                               "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                               "rng": torch.get_rng_state(), "history": history,
                               "spec": spec.to_dict(), "config": asdict(config),
                               **({"ema": ema.state_dict()} if ema is not None else {})}, last_path)
        if world > 1:
            dist.barrier()

    final_path = os.path.join(out_dir, FINAL)
    metrics = {"test_acc": history[-1]["test_acc"] if history else None, "epochs": config.epochs,
               "relu_count": relu_count(spec), "train_seconds": round(sum(h["seconds"] for h in history), 1),
               "teacher": teacher, "init": init, "config": asdict(config), "data": data.name}
    if ema is not None:
        metrics["test_acc_raw"] = history[-1].get("test_acc_raw") if history else None
    if rank == 0:
        weights = ema.state_dict() if ema is not None else model.state_dict()
        Checkpoint(spec, weights, data.mean, data.std, data.classes, metrics).save(final_path)
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
                 rank, world, dev, progress, ema_update=None) -> dict:
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
            loss = kd_loss(logits, t_logits, y, config.kd_temperature, config.kd_alpha,
                           label_smoothing=config.label_smoothing)
        else:
            loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema_update is not None:
            ema_update()
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
    """The run in `path` is this spec and configuration. A configuration saved before a field of
    TrainConfig existed (e.g. ema_decay) lacks it: it counts as that field's default, which is, by
    the rule on TrainConfig, how that older code trained."""
    saved = state.get("config")
    if isinstance(saved, dict):
        saved = {**asdict(TrainConfig()), **saved}
    if state.get("spec") != spec.to_dict() or saved != asdict(config):
        raise UserError(f"{path} was written with another spec or configuration: "
                        "use a fresh --out directory or the same arguments as the interrupted run")

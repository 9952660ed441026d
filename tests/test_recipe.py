"""The training recipe options (all off by default): label smoothing with KD, an exponential moving
average of the weights (math, exact resume, compile and DDP), test-time flip averaging, their CLI
flags and optimizer config keys, and that runs recorded before these options existed still resume."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from deepreduce.checkpoint import load_checkpoint
from deepreduce.cli import main
from deepreduce.data import Split
from deepreduce.errors import UserError
from deepreduce.kd import kd_loss
from deepreduce.models import build_model
from deepreduce.optimize import pipeline
from deepreduce.optimize.config import load_config
from deepreduce.train import FINAL, LAST, TrainConfig, WeightEMA, evaluate_model, train
from support.env import ROOT, free_port, subprocess_env
from support.optimize import run_fake, tiny_config, tiny_data
from support.training import TINY, synthetic

pytestmark = pytest.mark.usefixtures("deepreduce_env")

T = importlib.import_module("deepreduce.train")  # the module (deepreduce.train is also the function)


def quiet(*_args) -> None:
    pass


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_clean_error(rc: int, out: str, err: str, message: str) -> None:
    assert rc == 2 and out == ""
    lines = [line for line in err.split("\n") if line.strip() and not line.lstrip("\r").startswith("decode ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err


# -- label smoothing with KD ---------------------------------------------------------------------------

def test_kd_loss_label_smoothing_is_the_hand_computed_mixture():
    s = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.5, -0.5]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0, -1.0], [-2.0, 3.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 2])
    T_, alpha, eps = 2.0, 0.7, 0.1
    kl = ce_smooth = 0.0
    for i in range(2):
        p = [math.exp(v / T_) for v in t[i].tolist()]
        p = [v / sum(p) for v in p]
        q = [math.exp(v / T_) for v in s[i].tolist()]
        q = [v / sum(q) for v in q]
        kl += sum(p[j] * math.log(p[j] / q[j]) for j in range(3))
        e = [math.exp(v) for v in s[i].tolist()]
        nll = [-math.log(v / sum(e)) for v in e]
        # targets (1 - eps) * onehot(y) + eps / K
        ce_smooth += sum(((1 - eps) * (j == int(y[i])) + eps / 3) * nll[j] for j in range(3))
    hand = alpha * T_ * T_ * kl / 2 + (1 - alpha) * ce_smooth / 2
    assert kd_loss(s, t, y, T_, alpha, label_smoothing=eps).item() == pytest.approx(hand, rel=1e-12)
    # 0 is the old loss, and smoothing changes it
    assert kd_loss(s, t, y, T_, alpha, label_smoothing=0.0).item() == kd_loss(s, t, y, T_, alpha).item()
    assert kd_loss(s, t, y, T_, alpha).item() != pytest.approx(hand)


def test_label_smoothing_reaches_the_kd_loss_in_training(tmp_path):
    data = synthetic(n_train=32, n_test=16)
    teacher = train(TINY, data, str(tmp_path / "t"), TrainConfig(epochs=1, batch_size=16, lr=0.05),
                    progress=False, log=quiet)
    runs = [train(TINY, data, str(tmp_path / f"s{eps}"), TrainConfig(epochs=1, batch_size=16, lr=0.05,
                                                                      label_smoothing=eps, kd_alpha=0.5),
                  teacher=teacher.checkpoint, progress=False, log=quiet) for eps in (0.0, 0.2)]
    assert runs[0].history[0]["train_loss"] != runs[1].history[0]["train_loss"]


# -- EMA of the weights ------------------------------------------------------------------------------------

def sgd_step(model: nn.Module, g: torch.Generator, opt) -> None:
    x = torch.randn(8, 4, generator=g)
    loss = model(x).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def check_ema_step(ema: WeightEMA, live: nn.Module, step) -> None:
    old = {k: v.clone() for k, v in ema.state_dict().items()}
    step()
    ema.update(live)
    new = live.state_dict()
    got = ema.state_dict()
    assert got.keys() == new.keys()
    for k, v in got.items():
        if v.dtype.is_floating_point:
            expected = ema.decay * old[k] + (1 - ema.decay) * new[k]
            assert torch.allclose(v, expected, atol=1e-6, rtol=0), k
            assert not torch.equal(v, new[k]), k  # averaged, not copied
        else:
            assert torch.equal(v, new[k]), k  # num_batches_tracked: copied
        assert v.data_ptr() != new[k].data_ptr()


def test_ema_update_is_decay_old_plus_one_minus_decay_new():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    ema = WeightEMA(model, 0.9)
    assert not ema.module.training and all(not p.requires_grad for p in ema.module.parameters())
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        check_ema_step(ema, model, lambda: sgd_step(model, g, opt))


def test_ema_tracks_the_module_inside_ddp_world_1(tmp_path):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).train()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
        ema = WeightEMA(model, 0.8)
        g = torch.Generator().manual_seed(1)
        check_ema_step(ema, model, lambda: sgd_step(ddp, g, opt))
        assert not any(k.startswith("module.") for k in ema.state_dict())
    finally:
        dist.destroy_process_group()


class Interrupted(Exception):
    pass


def interrupt_after_first_save(monkeypatch):
    real = T.atomic_torch_save

    def save_then_die(obj, path):
        real(obj, path)
        monkeypatch.setattr(T, "atomic_torch_save", real)
        raise Interrupted
    monkeypatch.setattr(T, "atomic_torch_save", save_then_die)


def test_ema_training_resumes_exactly(tmp_path, monkeypatch):
    data = synthetic(n_train=64, n_test=32)
    config = TrainConfig(epochs=2, batch_size=16, lr=0.05, ema_decay=0.9)
    straight = train(TINY, data, str(tmp_path / "straight"), config, progress=False, log=quiet)
    interrupt_after_first_save(monkeypatch)
    with pytest.raises(Interrupted):
        train(TINY, data, str(tmp_path / "killed"), config, progress=False, log=quiet)
    assert not (tmp_path / "killed" / FINAL).exists()
    lines = []
    resumed = train(TINY, data, str(tmp_path / "killed"), config, resume=True, progress=False, log=lines.append)
    assert lines[0] == json.dumps({"resumed_from_epoch": 1})
    a = torch.load(tmp_path / "straight" / FINAL, weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "killed" / FINAL, weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = torch.load(tmp_path / "straight" / LAST, weights_only=True)
    lb = torch.load(tmp_path / "killed" / LAST, weights_only=True)
    assert all(torch.equal(la["ema"][k], lb["ema"][k]) and torch.equal(la["model"][k], lb["model"][k]) for k in a)
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in h]  # noqa: E731
    assert strip(straight.history) == strip(resumed.history)
    # each row has both figures; final.pt holds the EMA (test_acc), not the live weights (test_acc_raw)
    assert all({"test_acc", "test_acc_raw"} <= set(r) for r in straight.history)
    assert all(torch.equal(a[k], la["ema"][k]) for k in a)
    assert not all(torch.equal(a[k], la["model"][k]) for k in a)
    model = load_checkpoint(straight.checkpoint).build()
    assert evaluate_model(model, data.test, data.mean, data.std) == straight.metrics["test_acc"]
    assert straight.metrics["test_acc_raw"] == straight.history[-1]["test_acc_raw"]
    assert straight.metrics["config"]["ema_decay"] == 0.9
    # the EMA does not perturb training: the live weights are those of a run without it
    plain = train(TINY, data, str(tmp_path / "plain"), dataclasses.replace(config, ema_decay=0.0),
                  progress=False, log=quiet)
    p = torch.load(plain.checkpoint, weights_only=True)["state_dict"]
    assert all(torch.equal(p[k], la["model"][k]) for k in p)
    assert "test_acc_raw" not in plain.history[0] and "test_acc_raw" not in plain.metrics
    assert "ema" not in torch.load(tmp_path / "plain" / LAST, weights_only=True)


def test_a_last_pt_written_before_the_new_keys_resumes(tmp_path, monkeypatch):
    """last.pt of a run started with the code before ema_decay existed: its config lacks the key."""
    data = synthetic(n_train=32, n_test=16)
    config = TrainConfig(epochs=2, batch_size=16, lr=0.05)
    interrupt_after_first_save(monkeypatch)
    with pytest.raises(Interrupted):
        train(TINY, data, str(tmp_path), config, progress=False, log=quiet)
    state = torch.load(tmp_path / LAST, weights_only=True)
    del state["config"]["ema_decay"]
    torch.save(state, tmp_path / LAST)
    lines = []
    train(TINY, data, str(tmp_path), config, resume=True, progress=False, log=lines.append)
    assert lines[0] == json.dumps({"resumed_from_epoch": 1}) and json.loads(lines[1])["epoch"] == 2
    # switching the EMA on is another configuration: refused, not mixed
    state["epoch"] = 1
    torch.save(state, tmp_path / LAST)
    with pytest.raises(UserError, match="another spec or configuration"):
        train(TINY, data, str(tmp_path), dataclasses.replace(config, ema_decay=0.5), resume=True, progress=False,
              log=quiet)


@pytest.mark.slow
def test_ema_with_compile(tmp_path):
    """torch.compile wraps the module; the EMA follows the plain module's state dict (no _orig_mod.)."""
    data = synthetic(n_train=32, n_test=16)
    config = TrainConfig(epochs=1, batch_size=16, lr=0.05, ema_decay=0.5)
    compiled = train(TINY, data, str(tmp_path / "c"), dataclasses.replace(config, compile=True), progress=False,
                     log=quiet)
    eager = train(TINY, data, str(tmp_path / "e"), config, progress=False, log=quiet)
    a = torch.load(compiled.checkpoint, weights_only=True)["state_dict"]
    b = torch.load(eager.checkpoint, weights_only=True)["state_dict"]
    assert a.keys() == b.keys() == build_model(TINY).state_dict().keys()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-4) for k in a)
    model = load_checkpoint(compiled.checkpoint).build()
    assert evaluate_model(model, data.test, data.mean, data.std) == compiled.metrics["test_acc"]


DDP_EMA_WORKER = textwrap.dedent("""
    import importlib, json, sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    T = importlib.import_module("deepreduce.train")
    from support.training import synthetic, TINY
    made = []
    class Capture(T.WeightEMA):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)
    T.WeightEMA = Capture
    result = T.train(TINY, synthetic(n_train=128, n_test=32), {out!r},
                     T.TrainConfig(epochs=1, batch_size=32, lr=0.05, subset=96, ema_decay=0.7),
                     progress=False, log=lambda s: None)
    rank = T.dist.get_rank()
    torch.save({{k: v.clone().contiguous() for k, v in made[0].state_dict().items()}}, {out!r} + f"/ema{{rank}}.pt")
    print(json.dumps({{"rank": rank, "row": sorted(result.history[-1])}}))
    T.end_distributed()
""")


@pytest.mark.slow
def test_ema_under_ddp_two_cpu_processes(tmp_path):
    script = DDP_EMA_WORKER.format(tests=str(ROOT / "tests"), out=str(tmp_path))
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=subprocess_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=rank,
                                                 LOCAL_RANK=rank, WORLD_SIZE=2, GLOO_SOCKET_IFNAME="lo",
                                                 DEEPREDUCE_CACHE=tmp_path / "cache"))
             for rank in range(2)]
    try:
        outputs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err
    e0 = torch.load(tmp_path / "ema0.pt", weights_only=True)
    e1 = torch.load(tmp_path / "ema1.pt", weights_only=True)
    assert all(torch.equal(e0[k], e1[k]) for k in e0)  # every rank ends with the same EMA
    final = torch.load(tmp_path / FINAL, weights_only=True)["state_dict"]
    assert all(torch.equal(final[k], e0[k]) for k in e0)


# -- test-time flip averaging -------------------------------------------------------------------------------

class HalfLinear(nn.Module):
    """logits = L * wl + R * wr + bias, L and R the mean of the left and right half of the image."""

    def __init__(self, wl, wr, bias):
        super().__init__()
        self.wl, self.wr, self.bias = (nn.Parameter(torch.tensor(v, dtype=torch.float32)) for v in (wl, wr, bias))

    def forward(self, x):
        half = x.shape[3] // 2
        left, right = x[..., :half].mean(dim=(1, 2, 3)), x[..., half:].mean(dim=(1, 2, 3))
        return left[:, None] * self.wl + right[:, None] * self.wr + self.bias


def halves(pairs, labels, size=8) -> Split:
    """Images whose left and right halves have the given pixel values."""
    images = torch.zeros(len(pairs), 3, size, size, dtype=torch.uint8)
    for i, (left, right) in enumerate(pairs):
        images[i, ..., :size // 2], images[i, ..., size // 2:] = left, right
    return Split(images, torch.tensor(labels))


ZERO, ONE = [0.0] * 3, [1.0] * 3  # normalisation that leaves pixels / 255


def test_flip_on_a_mirror_symmetric_model_changes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    data = synthetic(n_train=8, n_test=64)
    plain = evaluate_model(model, data.test, data.mean, data.std)
    assert evaluate_model(model, data.test, data.mean, data.std, flip=True) == plain


def test_flip_on_a_hand_built_model_differs_as_computed():
    # class 0 = bright left half; a small bias towards class 0. Plain: all 4 right. With the mirror,
    # p0 = (sigmoid(z + 0.5) + sigmoid(-z + 0.5)) / 2 > 1/2 for every image: all class 0, half right.
    model = HalfLinear([10.0, 0.0], [0.0, 10.0], [0.5, 0.0])
    split = halves([(200, 50), (220, 30), (50, 200), (30, 220)], [0, 0, 1, 1])
    assert evaluate_model(model, split, ZERO, ONE) == 100.0
    assert evaluate_model(model, split, ZERO, ONE, flip=True) == 50.0
    model.train()
    evaluate_model(model, split, ZERO, ONE, flip=True)
    assert model.training  # the mode is restored


def test_flip_averages_softmax_not_logits():
    # image: left 255, right 0 -> logits [0, 10, 0]; its mirror -> [3, -10, 0]. Mean of the softmaxes
    # ~ [0.476, 0.5, 0.024]: class 1. The mean of the logits, [1.5, 0, 0], would say class 0.
    model = HalfLinear([0.0, 10.0, 0.0], [3.0, -10.0, 0.0], [0.0, 0.0, 0.0])
    split = halves([(255, 0)], [1])
    assert evaluate_model(model, split, ZERO, ONE, flip=True) == 100.0
    x = split.images.float() / 255
    with torch.no_grad():
        assert (model(x) + model(x.flip(3))).argmax(1).item() == 0  # what logit averaging would give


def test_flip_matches_a_hand_computation_on_a_random_model():
    torch.manual_seed(3)
    spec = TINY.replace(num_classes=3)
    model = build_model(spec)
    data = synthetic(n_train=8, n_test=48, classes=3)
    x = (data.test.images.float() / 255 - torch.tensor(data.mean).view(1, -1, 1, 1)) / torch.tensor(data.std).view(1, -1, 1, 1)
    model.eval()
    with torch.no_grad():
        p = model(x).softmax(1) + model(x.flip(3)).softmax(1)
    hand = 100.0 * (p.argmax(1) == data.test.labels).sum().item() / 48
    assert evaluate_model(model, data.test, data.mean, data.std, batch_size=20, flip=True) == hand


# -- the CLI ---------------------------------------------------------------------------------------------

def test_train_flags_and_evaluate_flip(capsys, tmp_path, tiny_folder):
    data_arg, _ = tiny_folder
    out_dir = tmp_path / "run"
    rc, out, err = run_cli(capsys, "train", "--data", data_arg, "--out", str(out_dir), "--alpha", "0.125",
                           "--epochs", "2", "--batch-size", "4", "--lr", "0.05", "--ema", "0.9",
                           "--label-smoothing", "0.1", "--no-progress")
    assert rc == 0, err
    lines = out.strip().splitlines()
    rows = [json.loads(line) for line in lines[:-1]]
    assert [r["epoch"] for r in rows] == [1, 2] and all("test_acc_raw" in r for r in rows)
    summary = json.loads(lines[-1])
    ckpt = load_checkpoint(summary["final"])
    assert ckpt.metrics["config"]["ema_decay"] == 0.9 and ckpt.metrics["config"]["label_smoothing"] == 0.1
    assert summary["test_acc"] == rows[-1]["test_acc"] == ckpt.metrics["test_acc"]

    rc, out, _ = run_cli(capsys, "evaluate", summary["final"], "--data", data_arg, "--json", "--flip")
    doc = json.loads(out)
    assert rc == 0 and doc["accuracy"] == doc["test_acc"] == summary["test_acc"]
    assert set(doc) == {"checkpoint", "test_acc", "accuracy", "accuracy_flip", "relu_count", "images"}
    assert 0 <= doc["accuracy_flip"] <= 100
    rc, out, _ = run_cli(capsys, "evaluate", summary["final"], "--data", data_arg)
    assert rc == 0 and len(out.strip().splitlines()) == 1  # without --flip: the plain line only
    rc, out, _ = run_cli(capsys, "evaluate", summary["final"], "--data", data_arg, "--flip")
    first, second = out.strip().splitlines()
    assert rc == 0 and first.startswith(f"top-1 accuracy: {summary['test_acc']:.2f}% on 6 test images")
    assert second.startswith(f"top-1 accuracy with flip averaging: {doc['accuracy_flip']:.2f}%")


@pytest.mark.parametrize("flags, message", [
    (["--label-smoothing", "-0.1"], "--label-smoothing must be in [0, 1), got -0.1"),
    (["--label-smoothing", "1"], "--label-smoothing must be in [0, 1)"),
    (["--ema", "1"], "--ema (the EMA decay) must be in [0, 1)"),
    (["--ema", "-0.5"], "--ema (the EMA decay) must be in [0, 1)"),
])
def test_bad_recipe_flags_are_one_error_line(capsys, tmp_path, tiny_folder, flags, message):
    data_arg, _ = tiny_folder
    assert_clean_error(*run_cli(capsys, "train", "--data", data_arg, "--out", str(tmp_path / "o"), *flags),
                       message)
    assert not (tmp_path / "o").exists()


# -- optimizer config ---------------------------------------------------------------------------------------

def test_config_keys_reach_the_train_config(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("train:\n  candidates:\n    label_smoothing: 0.1\n    ema_decay: 0.99\n")
    config = load_config(str(path))
    tc = config.train.candidates.train_config(config.kd)
    assert tc.label_smoothing == 0.1 and tc.ema_decay == 0.99 and tc.kd_alpha == config.kd.alpha
    assert config.train.teacher.train_config().ema_decay == 0.0 == config.train.teacher.label_smoothing
    d = config.to_dict()["train"]
    assert d["candidates"]["label_smoothing"] == 0.1 and d["candidates"]["ema_decay"] == 0.99
    assert "ema_decay" not in d["teacher"] and "label_smoothing" not in d["teacher"]  # at 0: left out
    assert load_config().train.candidates.ema_decay == 0.0  # optional keys: the built-in YAML lacks them


@pytest.mark.parametrize("text, words", [
    ("train:\n  candidates:\n    ema_decay: 1", ["config key train.candidates.ema_decay", "[0, 1)", "got 1.0"]),
    ("train:\n  finals:\n    ema_decay: -0.1", ["train.finals.ema_decay", "[0, 1)"]),
    ("train:\n  teacher:\n    label_smoothing: -0.2", ["train.teacher.label_smoothing", "[0, 1)"]),
    ("train:\n  teacher:\n    label_smoothing: lots", ["train.teacher.label_smoothing", "must be a number"]),
    ("train:\n  teacher:\n    ema_decy: 0.9", ["unknown config key train.teacher.ema_decy", "did you mean train.teacher.ema_decay"]),
])
def test_bad_config_values_are_one_clear_error(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text + "\n")
    with pytest.raises(UserError) as err:
        load_config(str(path))
    assert "\n" not in str(err.value)
    for word in words:
        assert word in str(err.value), str(err.value)


def test_an_optimize_run_recorded_before_the_new_keys_resumes(tmp_path, monkeypatch):
    """run.json and the jobs' last.pt of a run started with the code before label_smoothing/ema_decay
    were Training keys: finished jobs are skipped, a half-finished one resumes from its last.pt."""
    config = tiny_config()
    _, first, out = run_fake(tmp_path, monkeypatch)
    # run.json's config: what the old code wrote (dataclasses.asdict of a Training without the keys)
    recorded = json.loads((out / "run.json").read_text())
    old = dataclasses.asdict(config)
    for section in old["train"].values():
        del section["label_smoothing"], section["ema_decay"]
    assert recorded["config"] == old
    (out / "jobs" / "keep-s3" / "final.pt").unlink()  # killed mid-job
    _, again, _ = run_fake(tmp_path, monkeypatch, resume=True)
    assert [c["name"] for c in again.calls] == ["keep-s3"] and again.calls[0]["resume"]
    # turning a recipe option on is another run: refused
    with pytest.raises(UserError, match="config differ"):
        run_fake(tmp_path, monkeypatch, resume=True, config=tiny_config(train={"candidates": {"ema_decay": 0.9}}))

    # the half-finished job for real: its last.pt (from train(), config without ema_decay) resumes
    data = tiny_data()
    job = pipeline.Job("keep-s3", "culled", TINY.replace(num_classes=3, stem_relu=False, cull=(1, 2, 4)),
                       dataclasses.replace(config.train.candidates, epochs=2))
    directory = tmp_path / "real" / "jobs" / job.name
    interrupt_after_first_save(monkeypatch)
    with pytest.raises(Interrupted):
        train(job.spec, data, str(directory), job.training.train_config(), progress=False, log=quiet)
    state = torch.load(directory / LAST, weights_only=True)
    del state["config"]["ema_decay"]
    torch.save(state, directory / LAST)
    monkeypatch.setattr(pipeline, "train", T.train)  # run_fake put its fake trainer there
    ctx = pipeline.JobContext(str(tmp_path / "real"), "folder:/tmp/tiny", None, "unused", True, "s")
    pipeline.train_job(job, ctx, data)
    log = [json.loads(line) for line in (directory / "train.log").read_text().splitlines()]
    assert log[0] == {"resumed_from_epoch": 1} and log[1]["epoch"] == 2
    assert json.loads((directory / "result.json").read_text())["epochs"] == 2

"""`deepreduce bench` and the stock CrypTen path (secure/tools/stock.py, secure/tools/bench.py).

The multi-process tests (marked slow) run tiny random-weight models (alpha 0.125, 8x8 inputs), so
they take about a minute each on a busy 2-core machine. No assertion depends on a timing: the
speedup is checked against the measured values it is computed from, not against a target.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepreduce.cli import main
from deepreduce.relus import relu_count
from deepreduce.spec import ModelSpec
from secure.tools import bench
from deepreduce.checkpoint import random_checkpoint

pytestmark = pytest.mark.usefixtures("deepreduce_env")

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(alpha=0.125, input_size=8)
TOLERANCE = 1e-2  # logits, as for the project's runtime (16-bit fixed point)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUNTIME_KEYS = {"online_s", "offline_s", "mb", "rounds"}


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_schema(doc: dict) -> None:
    """The report schema of the latency issue: models[] with name, relu_count, batch_size,
    stock/ours {online_s, offline_s, mb, rounds} and speedup = stock online_s / ours online_s."""
    assert doc["kind"] == "deepreduce-bench" and doc["format_version"] == 1
    assert doc["command"].startswith("deepreduce bench")
    assert {"cpu_count", "platform", "torch", "crypten"} <= set(doc["machine"])
    assert isinstance(doc["models"], list) and doc["models"]
    for entry in doc["models"]:
        assert isinstance(entry["name"], str) and entry["name"]
        assert isinstance(entry["relu_count"], int) and isinstance(entry["batch_size"], int)
        for runtime in ("stock", "ours"):
            figures = entry[runtime]
            assert RUNTIME_KEYS <= set(figures), figures
            assert all(isinstance(figures[k], (int, float)) for k in RUNTIME_KEYS)
            assert isinstance(figures["rounds"], int) and figures["rounds"] >= 0
            assert figures["online_s"] > 0 and figures["offline_s"] >= 0 and figures["mb"] >= 0
        assert entry["speedup"] == pytest.approx(entry["stock"]["online_s"] / entry["ours"]["online_s"])


# -- the stock path: logits equal the plaintext PyTorch model (batch-norm in) ----------------------------

@pytest.mark.slow
def test_stock_crypten_matches_plaintext_pytorch():
    from secure.tools.stock import plaintext_logits, run_stock_local
    spec = ModelSpec(**TINY, cull=(4,), thin="top")
    ckpt = random_checkpoint(spec, seed=5)
    batches = [torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    run_ = run_stock_local(ckpt, batches, timeout_s=180)

    assert len(run_.logits) == 2
    for got, x in zip(run_.logits, batches):
        expected = plaintext_logits(ckpt, x)
        assert got.shape == expected.shape == (2, 10)
        assert (got - expected).abs().max().item() <= TOLERANCE
        assert torch.equal(got.argmax(1), expected.argmax(1))
        assert expected.std().item() > 0.05  # not a degenerate all-equal output
    # three processes, each its own: server, client, dealer
    assert len(set(run_.pids.values())) == 3 and set(run_.pids) == {"server", "client", "dealer"}
    server, client = run_.server, run_.client
    assert server["offline_s"] > 0 and server["convert_s"] > 0
    for q in server["queries"]:
        assert q["rounds"] > 0 and q["bytes_sent"] > 0 and q["bytes_received"] > 0
        assert q["relu_count"] == relu_count(spec) * 2  # every ReLU of the batch, in ReLU modules
        assert q["relu_s"] + q["linear_s"] == pytest.approx(q["online_s"])
        assert "logits" not in q  # the server never learns the output
    assert all(q["online_s"] > 0 for q in client["queries"])
    assert run_.dealer["bytes_sent"] > 0  # the TTP dealer served the server's triples


def test_from_pytorch_patch_converts_identity_nodes():
    """The compatibility patch: TorchScript export (no onnxscript) and ONNX Identity nodes."""
    script = """
import io, warnings, onnx, torch
from secure.reference.crypten_compat import patch_from_pytorch
crypten = patch_from_pytorch()
assert patch_from_pytorch() is crypten
crypten.init()  # one party
try:
    for model in (torch.nn.Sequential(torch.nn.Identity()), torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())):
        x = torch.randn(2, 4)
        f = io.BytesIO()
        crypten.nn.onnx_converter._export_pytorch_model(f, model, x)
        f.seek(0)
        print([n.op_type for n in onnx.load(f).graph.node])
        enc = crypten.nn.from_pytorch(model, x).encrypt()
        got = enc(crypten.cryptensor(x)).get_plain_text()
        assert torch.allclose(got, model(x).detach(), atol=1e-3), (got, model(x))
finally:
    crypten.uninit()
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "['Identity']" and lines[-1] == "ok"


# -- the whole command on a tiny model -------------------------------------------------------------------

@pytest.mark.slow
def test_bench_command_writes_the_issue_schema(tmp_path, capsys):
    spec_file = tmp_path / "tiny.json"
    ModelSpec(**TINY, cull=(1,), thin="bottom").save(str(spec_file))
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    argv = ["bench", "--spec", str(spec_file), "--no-full", "--batch-sizes", "1,2", "--repeats", "1",
            "--timeout", "180", "--json-out", str(out_json), "--plot", str(out_png), "--no-progress"]
    rc, out, err = run(capsys, *argv)
    assert rc == 0, out + err
    doc = json.loads(out_json.read_text())
    assert_schema(doc)
    assert doc["command"] == "deepreduce " + " ".join(argv)
    assert doc["settings"]["warmup"] == 1
    assert [(e["name"], e["batch_size"]) for e in doc["models"]] == [("tiny", 1), ("tiny", 2)]
    for e in doc["models"]:
        assert e["relu_count"] == relu_count(ModelSpec(**TINY, cull=(1,), thin="bottom"))
        for runtime in ("stock", "ours"):
            assert e[runtime]["max_abs_error"] <= TOLERANCE  # both agree with the plaintext model
            assert 0 <= e[runtime]["relu_share"] <= 1
            assert e[runtime]["warmup"] == 1 and len(e[runtime]["online_s_runs"]) == 1  # the warm-up not counted
        assert e["stock"]["queries_per_session"] == 2
        assert set(e["projections"]) == set(doc["links"])
    assert out_png.read_bytes()[:8] == PNG_MAGIC
    assert "tiny" in out and "speedup" in out and "LAN" in out


@pytest.mark.slow
def test_bench_takes_a_plan_file_with_the_reference_engine_as_baseline(tmp_path, capsys):
    """An exported PyTorch module (max pooling: comparisons) has no ModelSpec: its baseline is CrypTen's MPC
    tensors on the same plan, and both runtimes agree with the plan in plaintext."""
    import secure
    from support.models import randomize_bn, vgg
    plan_path = tmp_path / "vgg.plan"
    plan = secure.export_module(randomize_bn(vgg(width=4)), torch.randn(2, 3, 32, 32), str(plan_path))
    out_json = tmp_path / "bench.json"
    rc, out, err = run(capsys, "bench", "--plan", str(plan_path), "--batch-sizes", "1", "--repeats", "1",
                       "--warmup", "0", "--timeout", "180", "--json-out", str(out_json), "--no-progress")
    assert rc == 0, out + err
    (entry,) = json.loads(out_json.read_text())["models"]
    assert entry["name"] == "vgg" and entry["spec"] is None and entry["plan_hash"] == plan.plan_hash
    assert entry["relu_count"] == plan.relu_count and entry["comparison_count"] == plan.comparison_count > 0
    assert entry["stock"]["baseline"] == "reference engine" and entry["stock"]["engine"] == "crypten"
    assert entry["ours"]["engine"] == "fast"
    for runtime in ("stock", "ours"):
        assert entry[runtime]["max_abs_error"] <= TOLERANCE
    assert entry["speedup"] > 0


# -- without processes: figures, speedup, reports, model sets, errors ----------------------------------

def fake_figures(online: float, mb: float = 2.0, rounds: int = 10) -> dict:
    return {"online_s": online, "offline_s": 0.5, "mb": mb, "rounds": rounds, "relu_share": 0.25,
            "linear_share": 0.75, "mb_sent": mb / 2, "mb_received": mb / 2, "online_s_runs": [online],
            "max_abs_error": 0.0}


def test_speedup_and_projections_come_from_the_measured_values(monkeypatch, tmp_path):
    measured = {"stock": {1: 3.0, 4: 2.0}, "ours": {1: 0.5, 4: 0.25}}
    monkeypatch.setattr(bench, "measure_stock", lambda m, b, r, t, w: fake_figures(measured["stock"][b], 40.0, 900))
    monkeypatch.setattr(bench, "measure_ours", lambda m, b, r, t, e, w: fake_figures(measured["ours"][b], 4.0, 90))
    model = bench.random_model("tiny", ModelSpec(**TINY))
    doc = bench.run_bench([model], [1, 4], repeats=1, progress=False, log=lambda *a: None)
    doc = {"command": "deepreduce bench", "machine": bench.machine_info(), **doc}
    assert_schema(doc)
    assert [e["speedup"] for e in doc["models"]] == [pytest.approx(6.0), pytest.approx(8.0)]
    for e in doc["models"]:
        for name, p in e["projections"].items():
            assert p["speedup"] == pytest.approx(p["stock_s"] / p["ours_s"])
            assert p["stock_s"] > e["stock"]["online_s"]  # the network only adds time
    table = bench.format_table(doc)
    assert "tiny" in table and "6.0x" in table and "8.0x" in table
    assert "LAN" in bench.format_projections(doc)
    bench.plot_bench(doc, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG_MAGIC


def test_a_failed_run_is_recorded_not_fatal(monkeypatch):
    def broken(*args):
        raise RuntimeError("party server exited with code 1 without a result")
    monkeypatch.setattr(bench, "measure_stock", lambda m, b, r, t, w: fake_figures(1.0))
    monkeypatch.setattr(bench, "measure_ours", broken)
    model = bench.random_model("tiny", ModelSpec(**TINY))
    doc = bench.run_bench([model], [1], repeats=1, progress=False, log=lambda *a: None)
    (entry,) = doc["models"]
    assert entry["speedup"] is None and "exited with code 1" in entry["ours"]["error"]
    assert doc["failures"] == ["tiny batch 1 ours"]
    assert "failed" in bench.format_table(doc)


def test_per_image_figures_and_median():
    servers = [{"online_s": t, "bytes_sent": 3e6, "bytes_received": 5e6, "rounds": 7, "relu_s": t / 4,
                "linear_s": 3 * t / 4} for t in (4.0, 8.0, 100.0)]
    f = bench._figures([4.0, 8.0, 100.0], servers, offline_s=2.0, batch_size=4, error=0.001, extra={})
    assert f["online_s"] == pytest.approx(2.0)  # median 8 s for 4 images
    assert f["offline_s"] == pytest.approx(0.5)
    assert f["mb"] == pytest.approx(2.0) and f["rounds"] == 7  # MB per image, rounds per batch
    assert f["relu_share"] == pytest.approx(0.25) and f["linear_share"] == pytest.approx(0.75)


def test_golden_models_and_quick_set():
    counts = {m.name: m.relu_count for m in bench.golden_models()}
    assert counts == {"resnet18-full": 557_056, "s2s3-thin": 98_304, "demo-a0.5-s2s3-thin": 49_152, "no-relu": 0}
    quick = bench.golden_models(quick=True)
    assert quick[0].name == "resnet18-full" and any(m.relu_count < 100_000 for m in quick) and len(quick) == 2
    # the stock path and ours run the same weights: the plan is exported from the same checkpoint
    m = quick[1]
    assert m.plan.relu_count == m.relu_count and m.plan.spec == m.spec.to_dict()


def test_frontier_models(tmp_path):
    points = []
    for i, fields in enumerate([dict(cull=(1,), thin="bottom"), dict(cull=(1, 2, 3, 4), stem_relu=False),
                                dict()]):
        spec = ModelSpec(**TINY, **fields)
        path = tmp_path / "jobs" / f"m{i}" / "final.pt"
        path.parent.mkdir(parents=True)
        random_checkpoint(spec, seed=i).save(str(path))
        points.append({"name": f"m{i}", "relu_count": relu_count(spec), "accuracy": 50.0 + i,
                       "spec": spec.to_dict(), "checkpoint": f"jobs/m{i}/final.pt"})
    (tmp_path / "frontier.json").write_text(json.dumps({"format_version": 1, "frontier": points}))
    models = bench.frontier_models(str(tmp_path))
    assert [m.name for m in models] == ["resnet18-full", "m1", "m0", "m2"]  # fewest ReLUs first
    assert models[0].spec.input_size == 8 and models[0].spec.alpha == 1.0  # the frontier's data shape
    assert models[1].accuracy == 51.0
    quick = bench.frontier_models(str(tmp_path), quick=True, full=False)
    assert [m.name for m in quick] == ["m2"]  # the largest under 100K ReLUs


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--batch-sizes", "0"], "--batch-sizes must be positive"),
    (["--engine", "warp"], "unknown --engine 'warp'"),
    (["--frontier", "/nonexistent/run"], "frontier.json does not exist"),
    (["--spec", "/nonexistent/spec.json"], "cannot read spec file"),
    (["--plan", "/nonexistent/m.plan"], "plan /nonexistent/m.plan does not exist"),
    (["--json-out", "{tmp}/a-file/x.json"], "a-file is not a writable directory"),
])
def test_user_errors_are_one_line(capsys, monkeypatch, tmp_path, argv, message):
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("measured despite the error"))
    (tmp_path / "a-file").write_text("")
    rc, out, err = run(capsys, "bench", "--no-progress", *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert rc == 2 and out == ""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err

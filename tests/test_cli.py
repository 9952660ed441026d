"""The `deepreduce` command: count (JSON and table), train/evaluate round trip, and clean errors
(exit code 2, one `error: ...` line on stderr, no traceback)."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import torch

from deepreduce.checkpoint import load_checkpoint
from deepreduce.cli import main
from deepreduce.spec import ModelSpec
from support.datasets import write_image_tree
from support.env import python_cmd, subprocess_env

pytestmark = pytest.mark.usefixtures("deepreduce_env")


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_clean_error(rc: int, out: str, err: str, message: str) -> None:
    assert rc == 2
    assert out == ""
    # `evaluate` shows dataset-decoding progress bars on stderr; apart from those, one line.
    lines = [line for line in err.split("\n") if line.strip() and not line.lstrip("\r").startswith("decode ")]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err


# -- count ----------------------------------------------------------------------------------------

def test_count_json_default(capsys):
    rc, out, err = run(capsys, "count", "--json")
    assert rc == 0 and err == ""
    (line,) = out.strip().splitlines()  # exactly one JSON object
    d = json.loads(line)
    assert d["relu_count"] == 557_056
    assert d["stages"] == {"stem": 65_536, "S1": 262_144, "S2": 131_072, "S3": 65_536, "S4": 32_768}
    assert list(d["sites"]) == ModelSpec().site_names() and sum(d["sites"].values()) == 557_056
    assert ModelSpec.from_dict(d["spec"]) == ModelSpec()
    assert "measured_relu_count" not in d


@pytest.mark.parametrize("flags, expected", [
    (["--no-stem-relu", "--cull", "1,4", "--thin", "bottom", "--alpha", "0.5", "--classes", "100"], 49_152),
    (["--no-stem-relu", "--blocks", "2,1,1,1", "--cull", "1", "--thin", "bottom", "--alpha", "0.5", "--rho", "0.5"],
     7_168),
    (["--input-size", "64", "--no-stem-relu", "--cull", "1"], 917_504),
    (["--arch", "wrn22_8"], 1_392_640),
    (["--arch", "wrn22_8", "--remove", "s3.head"], 1_359_872),
    (["--remove", "stem,s2.b1.r1"], 557_056 - 65_536 - 32_768),
])
def test_count_json_flags(capsys, flags, expected):
    rc, out, _ = run(capsys, "count", "--json", "--measure", *flags)
    d = json.loads(out)
    assert rc == 0 and d["relu_count"] == expected == d["measured_relu_count"]


def test_count_table(capsys):
    rc, out, err = run(capsys, "count", "--no-stem-relu", "--cull", "1,4", "--thin", "bottom", "--alpha", "0.5")
    assert rc == 0 and err == ""
    lines = out.strip().splitlines()
    assert lines[0].split() == ["stage", "ReLUs", "share"]
    rows = {}
    for line in lines[1:]:
        m = re.fullmatch(r"(\S+)\s+([\d,]+)(?:\s+([\d.]+)%)?", line.strip())
        assert m, line
        rows[m.group(1)] = (int(m.group(2).replace(",", "")), m.group(3) and float(m.group(3)))
    assert {k: v[0] for k, v in rows.items()} == {"stem": 0, "S1": 0, "S2": 32_768, "S3": 16_384, "S4": 0,
                                                  "total": 49_152}
    assert rows["S2"][1] == pytest.approx(66.7) and rows["S3"][1] == pytest.approx(33.3)
    assert "49,152" in lines[-1]


def test_count_table_wrn_and_measure(capsys):
    rc, out, _ = run(capsys, "count", "--arch", "wrn22_8", "--alpha", "0.25", "--measure")
    names = [line.split()[0] for line in out.strip().splitlines()[1:]]
    assert rc == 0 and names == ["S1", "S2", "S3", "total", "measured"]
    total = int(out.strip().splitlines()[-2].split()[1].replace(",", ""))
    assert out.strip().splitlines()[-1] == f"measured with forward hooks: {total:,}"


def test_count_from_spec_file_with_overrides(capsys, tmp_path):
    spec_file = tmp_path / "spec.json"
    ModelSpec(alpha=0.5, stem_relu=False, cull=(1,), thin="bottom", blocks=(2, 1, 1, 1)).save(str(spec_file))
    d = json.loads(run(capsys, "count", "--json", "--spec", str(spec_file))[1])
    assert d["relu_count"] == 64 * 16 * 16 + 128 * 8 * 8 + 256 * 4 * 4  # one r1 ReLU in each of S2-S4
    d = json.loads(run(capsys, "count", "--json", "--spec", str(spec_file), "--rho", "0.5")[1])
    assert d["relu_count"] == 7_168 and d["spec"]["blocks"] == [2, 1, 1, 1]
    # A different --arch brings its own default depth instead of the file's blocks.
    d = json.loads(run(capsys, "count", "--json", "--spec", str(spec_file), "--arch", "wrn22_8", "--cull", "")[1])
    assert d["spec"]["blocks"] == [3, 3, 3] and d["spec"]["alpha"] == 0.5


@pytest.mark.parametrize("argv, message", [
    (["count", "--alpha", "-1"], "alpha must be in (0, 4], got -1.0"),
    (["count", "--rho", "2"], "rho must be in (0, 1]"),
    (["count", "--cull", "5"], "cull stages must be in 1..4"),
    (["count", "--blocks", "2,2"], "blocks must list 4 positive integers"),
    (["count", "--remove", "s9.b9.r9"], "remove names unknown ReLU sites"),
    (["count", "--spec", "/no/such/spec.json"], "cannot read spec file /no/such/spec.json"),
    (["train", "--data", "nosuchkind:x", "--out", "o"], "is not KIND:PATH"),
    (["train", "--data", "folder:/no/such/data", "--out", "o"], "--data path /no/such/data does not exist"),
    (["train", "--data", "cifar10:/tmp", "--out", "o", "--alpha", "0"], "alpha must be in (0, 4]"),
    (["evaluate", "/no/such/final.pt", "--data", "folder:/tmp"], "checkpoint /no/such/final.pt does not exist"),
])
def test_bad_input_is_one_error_line(capsys, argv, message):
    assert_clean_error(*run(capsys, *argv), message)


def test_bad_spec_file_and_unreadable_checkpoint(capsys, tmp_path, tiny_folder):
    data_arg, _ = tiny_folder
    (tmp_path / "bad.json").write_text('{"alpha": 0.5, "depth": 3}')
    assert_clean_error(*run(capsys, "count", "--spec", str(tmp_path / "bad.json")), "unknown spec fields ['depth']")
    (tmp_path / "final.pt").write_bytes(b"this is not a checkpoint")
    assert_clean_error(*run(capsys, "evaluate", str(tmp_path / "final.pt"), "--data", data_arg),
                       "is not a readable deepreduce checkpoint")
    (tmp_path / "empty").mkdir()
    assert_clean_error(*run(capsys, "train", "--data", f"folder:{tmp_path / 'empty'}", "--out", str(tmp_path / "o")),
                       "expected an image-folder tree")


def test_errors_through_the_real_entry_point(tmp_path):
    """`python -m deepreduce`: exit status 2, one line on stderr, nothing else."""
    (tmp_path / "final.pt").write_bytes(b"garbage")
    for argv, message in ((["count", "--alpha", "-1"], "error: alpha must be in (0, 4]"),
                          (["evaluate", str(tmp_path / "final.pt"), "--data", "nosuchkind:x"],
                           "is not a readable deepreduce checkpoint")):
        p = subprocess.run(python_cmd(*argv), env=subprocess_env(), capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and p.stdout == ""
        assert len(p.stderr.strip().splitlines()) == 1 and message in p.stderr, p.stderr


# -- train / evaluate -----------------------------------------------------------------------------

def test_train_then_evaluate(capsys, tmp_path, tiny_folder):
    data_arg, _ = tiny_folder
    out_dir = tmp_path / "run"
    rc, out, err = run(capsys, "train", "--data", data_arg, "--out", str(out_dir), "--alpha", "0.125",
                       "--epochs", "2", "--batch-size", "4", "--lr", "0.05", "--no-progress")
    assert rc == 0, err
    lines = out.strip().splitlines()
    epochs = [json.loads(line) for line in lines[:-1]]
    assert [e["epoch"] for e in epochs] == [1, 2]
    summary = json.loads(lines[-1])
    assert summary["final"] == str(out_dir / "final.pt")
    ckpt = load_checkpoint(summary["final"])
    # Classes, channels and input size come from the data.
    assert (ckpt.spec.num_classes, ckpt.spec.in_channels, ckpt.spec.input_size) == (3, 3, 8)
    assert ckpt.classes == ["ant", "bee", "cow"] and summary["relu_count"] == ckpt.metrics["relu_count"]
    assert summary["test_acc"] == ckpt.metrics["test_acc"] == epochs[-1]["test_acc"]

    rc, out, _ = run(capsys, "evaluate", summary["final"], "--data", data_arg, "--json")
    assert rc == 0
    assert json.loads(out) == {"checkpoint": summary["final"], "test_acc": summary["test_acc"],
                               "accuracy": summary["test_acc"], "relu_count": summary["relu_count"], "images": 6}
    rc, out, _ = run(capsys, "evaluate", summary["final"], "--data", data_arg)
    assert rc == 0 and out.strip() == (f"top-1 accuracy: {summary['test_acc']:.2f}% on 6 test images "
                                       f"({summary['relu_count']:,} ReLUs per image)")


def test_train_grayscale_resized(capsys, tmp_path):
    write_image_tree(tmp_path / "gray", {"train": {"x": 4, "y": 4}, "test": {"x": 2, "y": 2}}, size=6, channels=1)
    arg = f"folder:{tmp_path / 'gray'}"
    out_dir = tmp_path / "run"
    common = ["--alpha", "0.125", "--epochs", "1", "--batch-size", "4", "--no-progress"]
    assert_clean_error(*run(capsys, "train", "--data", arg, "--out", str(out_dir), "--input-size", "8", *common),
                       "6x6 but the model expects 8x8: pass --resize")
    rc, out, err = run(capsys, "train", "--data", arg, "--out", str(out_dir), "--input-size", "8", "--resize", *common)
    assert rc == 0, err
    ckpt = load_checkpoint(str(out_dir / "final.pt"))
    assert (ckpt.spec.in_channels, ckpt.spec.input_size, ckpt.spec.num_classes) == (1, 8, 2)
    assert len(ckpt.mean) == 1 and ckpt.state_dict["conv1.weight"].shape[1] == 1
    # Evaluating needs the same resize; without it the size mismatch is a clean error.
    assert_clean_error(*run(capsys, "evaluate", str(out_dir / "final.pt"), "--data", arg),
                       "6x6 but the model expects 8x8")
    rc, out, _ = run(capsys, "evaluate", str(out_dir / "final.pt"), "--data", arg, "--resize", "--json")
    assert rc == 0 and json.loads(out)["images"] == 4


def test_evaluate_on_data_the_model_does_not_fit(capsys, tmp_path, tiny_folder):
    rgb_arg, _ = tiny_folder
    gray_arg = f"folder:{tmp_path / 'gray'}"
    write_image_tree(tmp_path / "gray", {"train": {"a": 2, "b": 2, "c": 2}, "test": {"a": 1}}, channels=1)
    two_arg = f"folder:{tmp_path / 'two'}"
    write_image_tree(tmp_path / "two", {"train": {"a": 2, "b": 2}, "test": {"a": 1}})
    common = ["--alpha", "0.125", "--epochs", "1", "--batch-size", "4", "--no-progress"]
    for arg, name in ((rgb_arg, "rgb"), (gray_arg, "gray")):
        rc, _, err = run(capsys, "train", "--data", arg, "--out", str(tmp_path / name), *common)
        assert rc == 0, err
    assert_clean_error(*run(capsys, "evaluate", str(tmp_path / "rgb" / "final.pt"), "--data", gray_arg),
                       "the spec expects 3x8x8 inputs but")
    assert_clean_error(*run(capsys, "evaluate", str(tmp_path / "gray" / "final.pt"), "--data", rgb_arg),
                       "the spec expects 1x8x8 inputs but")
    assert_clean_error(*run(capsys, "evaluate", str(tmp_path / "rgb" / "final.pt"), "--data", two_arg),
                       "the spec has 3 classes but")


def test_resume_flag_and_spec_mismatch(capsys, tmp_path, tiny_folder):
    data_arg, _ = tiny_folder
    base = ["train", "--data", data_arg, "--out", str(tmp_path / "run"), "--alpha", "0.125", "--epochs", "1",
            "--batch-size", "4", "--no-progress"]
    assert run(capsys, *base)[0] == 0
    rc, out, _ = run(capsys, *base, "--resume")
    assert rc == 0 and out.splitlines()[0] == json.dumps({"resumed_from_epoch": 1})
    assert_clean_error(*run(capsys, *base, "--resume", "--thin", "top"), "was written with another spec")
    assert_clean_error(*run(capsys, *base, "--classes", "5"), "the spec has 5 classes but")
    assert torch.load(tmp_path / "run" / "final.pt", weights_only=True)["spec"]["thin"] == "none"

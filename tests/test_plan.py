"""Secure plans: export == the PyTorch eval model on real CIFAR-10, file format, hashing, CLI."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from deepreduce.cli import main as cli_main
from deepreduce.data import load_image_files, normalize
from deepreduce.errors import UserError
from deepreduce.relus import relu_count, relu_sites
from deepreduce.spec import ModelSpec
from secure.core.export import export_plan, plan_from_checkpoint
from secure.core.plaintext import prediction_records, run_plaintext
from secure.core.plan import MAGIC, SecurePlan
from deepreduce.checkpoint import random_checkpoint

N_IMAGES = 64

# Every kind of reshaping the optimiser produces, on both architectures. Widths are small for
# speed, except one full-width ResNet18 (alpha 1) so that the real layer sizes are covered too.
SPECS = {
    "r18-full-a1": ModelSpec(alpha=1.0),
    "r18-full": ModelSpec(alpha=0.25),
    "r18-culled": ModelSpec(alpha=0.25, cull=(1, 4)),
    "r18-thin-bottom": ModelSpec(alpha=0.25, thin="bottom"),
    "r18-thin-top": ModelSpec(alpha=0.25, thin="top", stem_relu=False),
    "r18-alpha-rho": ModelSpec(alpha=0.5, rho=0.5),
    "r18-blocks-2111": ModelSpec(alpha=0.25, blocks=(2, 1, 1, 1), remove=("s2.b1.r1",)),
    "wrn-small": ModelSpec(arch="wrn22_8", widen=1, alpha=0.5),
    "wrn-culled-thin": ModelSpec(arch="wrn22_8", widen=2, alpha=0.25, cull=(2,), thin="top", rho=0.5),
    "wrn-thin-bottom": ModelSpec(arch="wrn22_8", widen=1, alpha=0.25, thin="bottom", blocks=(1, 2, 1)),
}


@pytest.fixture(scope="module")
def test_pixels(cifar10) -> torch.Tensor:
    """The first real CIFAR-10 test images of every class, uint8."""
    per_class = N_IMAGES // len(cifar10.classes) + 1
    picks = [np.flatnonzero(cifar10.test.labels.numpy() == c)[:per_class] for c in range(len(cifar10.classes))]
    return cifar10.test.images[np.concatenate(picks)[:N_IMAGES]]


def saved_checkpoint(tmp_path, spec: ModelSpec, seed: int = 0):
    ckpt = random_checkpoint(spec, seed=seed)
    path = tmp_path / "final.pt"
    ckpt.save(str(path))
    return ckpt, str(path)


@pytest.mark.parametrize("name", list(SPECS))
def test_plan_matches_pytorch_eval_model_on_real_images(tmp_path, test_pixels, name):
    spec = SPECS[name]
    ckpt, path = saved_checkpoint(tmp_path, spec, seed=len(name))
    plan = export_plan(path)
    x = normalize(test_pixels, ckpt.mean, ckpt.std)
    with torch.no_grad():
        expected = ckpt.build()(x).double()
    logits = run_plaintext(plan, x)
    assert logits.dtype == torch.float64 and logits.shape == (N_IMAGES, spec.num_classes)
    assert (logits - expected).abs().max().item() <= 1e-4
    assert expected.std().item() > 1e-2  # the logits really vary with the image

    assert plan.relu_count == relu_count(spec)
    assert plan.relu_per_layer == dict(relu_sites(spec))
    assert plan.spec == spec.to_dict() and plan.input_shape == (3, 32, 32)
    assert plan.classes == ckpt.classes and plan.mean == ckpt.mean and plan.std == ckpt.std


def test_plan_ops_have_no_batch_norm_and_no_removed_relus():
    spec = ModelSpec(alpha=0.25, cull=(2,), thin="bottom")
    plan = plan_from_checkpoint(random_checkpoint(spec))
    kinds = [op.kind for op in plan.ops]
    assert "scale_shift" not in kinds  # ResNet18: every batch-norm follows a conv and is folded
    assert [op.site for op in plan.ops if op.kind == "relu"] == list(relu_sites(spec))
    assert kinds[0] == "input" and kinds[-2:] == ["avgpool", "linear"]
    assert kinds.count("add") == sum(spec.blocks)
    for op in plan.ops:
        assert op.id == plan.ops.index(op) and all(j < op.id for j in op.inputs)
    wrn = plan_from_checkpoint(random_checkpoint(ModelSpec(arch="wrn22_8", widen=1, alpha=0.25)))
    # pre-activation: the block-input batch-norms (one per block) and the head stay affine ops
    assert [op.kind for op in wrn.ops].count("scale_shift") == sum(wrn.spec["blocks"]) + 1


def test_save_load_round_trip(tmp_path):
    plan = plan_from_checkpoint(random_checkpoint(ModelSpec(arch="wrn22_8", widen=1, alpha=0.25), seed=3))
    path = tmp_path / "model.plan"
    plan.save(str(path))
    assert os.listdir(tmp_path) == ["model.plan"]  # written through a temp file + rename
    loaded = SecurePlan.load(str(path))
    assert loaded.plan_hash == plan.plan_hash and len(plan.plan_hash) == 64
    assert loaded.ops == plan.ops and loaded.input_shape == plan.input_shape
    assert (loaded.classes, loaded.mean, loaded.std, loaded.spec, loaded.relu_count) == \
        (plan.classes, plan.mean, plan.std, plan.spec, plan.relu_count)
    assert list(loaded.tensors) == list(plan.tensors)
    assert all(torch.equal(loaded.tensors[k], plan.tensors[k]) for k in plan.tensors)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(run_plaintext(loaded, x), run_plaintext(plan, x))


def test_file_is_magic_length_json_header_and_raw_float32(tmp_path):
    plan = plan_from_checkpoint(random_checkpoint(ModelSpec(alpha=0.25, blocks=(1, 1, 1, 1))))
    path = tmp_path / "model.plan"
    plan.save(str(path))
    raw = path.read_bytes()
    assert raw[:8] == MAGIC
    (length,) = struct.unpack("<Q", raw[8:16])
    header = json.loads(raw[16:16 + length])
    assert header["plan_hash"] == plan.plan_hash and header["ops"] == [op.to_dict() for op in plan.ops]
    data = raw[16 + length:]
    entry = header["tensors"][0]
    first = np.frombuffer(data[entry["offset"]:entry["offset"] + entry["nbytes"]], dtype="<f4")
    assert np.array_equal(first.reshape(entry["shape"]), plan.tensors[entry["name"]].numpy())
    assert len(data) == sum(e["nbytes"] for e in header["tensors"])


def test_hash_changes_with_any_weight_or_metadata(tmp_path):
    spec = ModelSpec(alpha=0.25, blocks=(1, 1, 1, 1))
    ckpt = random_checkpoint(spec, seed=5)
    base = plan_from_checkpoint(ckpt).plan_hash
    assert plan_from_checkpoint(random_checkpoint(spec, seed=5)).plan_hash == base  # deterministic

    for key in ("stages.1.0.conv2.weight", "stages.3.0.bn1.running_var", "fc.bias"):
        state = {k: v.clone() for k, v in ckpt.state_dict.items()}
        state[key].view(-1)[0] += 1e-3
        changed = type(ckpt)(spec, state, ckpt.mean, ckpt.std, ckpt.classes)
        assert plan_from_checkpoint(changed).plan_hash != base, key
    renamed = type(ckpt)(spec, ckpt.state_dict, ckpt.mean, ckpt.std, ["plane"] + ckpt.classes[1:])
    assert plan_from_checkpoint(renamed).plan_hash != base


@pytest.fixture
def plan_file(tmp_path) -> tuple[str, bytes]:
    plan = plan_from_checkpoint(random_checkpoint(ModelSpec(alpha=0.25, blocks=(1, 1, 1, 1))))
    path = tmp_path / "model.plan"
    plan.save(str(path))
    return str(path), path.read_bytes()


def _write(path: str, raw: bytes) -> str:
    with open(path, "wb") as f:
        f.write(raw)
    return path


@pytest.mark.parametrize("cut", [0, 5, 8, 12, 16, 200, -1000, -1])
def test_truncated_plan_is_a_user_error(plan_file, cut):
    path, raw = plan_file
    with pytest.raises(UserError, match="truncated|corrupt|not a secure plan"):
        SecurePlan.load(_write(path, raw[:cut]))


def test_corrupt_plans_are_user_errors(plan_file):
    path, raw = plan_file
    (length,) = struct.unpack("<Q", raw[8:16])
    flipped_weight = bytearray(raw)
    flipped_weight[-3] ^= 0x40
    with pytest.raises(UserError, match="hash mismatch"):
        SecurePlan.load(_write(path, bytes(flipped_weight)))

    header = json.loads(raw[16:16 + length])
    header["meta"]["classes"][0] = "dragon"  # consistent JSON, wrong content
    blob = json.dumps(header).encode()
    with pytest.raises(UserError, match="hash mismatch"):
        SecurePlan.load(_write(path, MAGIC + struct.pack("<Q", len(blob)) + blob + raw[16 + length:]))

    garbled = bytearray(raw)
    garbled[16 + length // 2] = ord("}")
    with pytest.raises(UserError, match="corrupt"):
        SecurePlan.load(_write(path, bytes(garbled)))
    with pytest.raises(UserError, match="corrupt|truncated"):
        SecurePlan.load(_write(path, raw + b"\0\0\0\0"))
    with pytest.raises(UserError, match="bad header length|truncated"):
        SecurePlan.load(_write(path, raw[:8] + struct.pack("<Q", 1 << 40) + raw[16:]))
    with pytest.raises(UserError, match="wrong magic"):
        SecurePlan.load(_write(path, b"PK\x03\x04" + raw[4:]))
    with pytest.raises(UserError, match="wrong magic"):  # e.g. a checkpoint passed by mistake
        SecurePlan.load(_write(path, b"\x80\x02" + raw))
    with pytest.raises(UserError, match="does not exist"):
        SecurePlan.load(path + ".missing")


def test_public_info_is_json_and_holds_no_weight_values():
    plan = plan_from_checkpoint(random_checkpoint(ModelSpec(alpha=0.25, cull=(4,))))
    public = json.loads(json.dumps(plan.public_info().to_dict()))
    assert public["plan_hash"] == plan.plan_hash and public["relu_count"] == plan.relu_count
    assert public["input_shape"] == [3, 32, 32] and public["classes"] == plan.classes
    assert public["mean"] == plan.mean and public["std"] == plan.std and public["spec"] == plan.spec
    assert public["relu_per_layer"] == plan.relu_per_layer
    assert public["ops"] == [op.to_dict() for op in plan.ops]
    assert public["tensor_shapes"] == {k: list(t.shape) for k, t in plan.tensors.items()}
    # no weight values: the whole description is tiny next to the weights, and holds no float
    # other than the normalisation constants and the spec's alpha/rho
    assert len(json.dumps(public)) < sum(t.numel() for t in plan.tensors.values()) / 10
    floats = set()

    def collect(v):
        if isinstance(v, float):
            floats.add(v)
        elif isinstance(v, dict):
            [collect(x) for x in v.values()]
        elif isinstance(v, list):
            [collect(x) for x in v]
    collect({k: v for k, v in public.items() if k not in ("mean", "std", "spec")})
    assert not floats


def test_prediction_records():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, -1.0, 0.0]], dtype=torch.float64)
    records = prediction_records(logits, ["a", "b", "c"], ["x.png", "y.jpg"])
    probs = torch.softmax(logits, dim=1)
    assert records == [
        {"image": "x.png", "class_index": 1, "class_name": "b", "probability": float(probs[0, 1])},
        {"image": "y.jpg", "class_index": 0, "class_name": "a", "probability": float(probs[1, 0])},
    ]
    assert all(type(r["class_index"]) is int and type(r["probability"]) is float for r in records)


def test_cli_export_and_predict(tmp_path, test_pixels, capsys):
    ckpt, ckpt_path = saved_checkpoint(tmp_path, ModelSpec(alpha=0.25, thin="top"), seed=9)
    images = []
    for i, suffix in enumerate([".png", ".jpg", ".png"]):
        images.append(str(tmp_path / f"img{i}{suffix}"))
        Image.fromarray(test_pixels[i * 7].permute(1, 2, 0).numpy()).save(images[-1])
    plan_path = str(tmp_path / "model.plan")

    assert cli_main(["export", ckpt_path, "--out", plan_path]) == 0
    exported = json.loads(capsys.readouterr().out)
    plan = SecurePlan.load(plan_path)
    assert exported["plan_hash"] == plan.plan_hash and exported["relu_count"] == relu_count(ckpt.spec)

    assert cli_main(["predict", plan_path, *images, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    x = normalize(load_image_files(images, 3, 32), ckpt.mean, ckpt.std)
    assert printed == {"images": prediction_records(run_plaintext(plan, x), plan.classes, images)}
    assert [r["class_index"] for r in printed["images"]] == ckpt.build()(x).argmax(1).tolist()

    assert cli_main(["predict", ckpt_path, *images, "--json"]) == 0  # a checkpoint works too
    assert json.loads(capsys.readouterr().out) == printed

    assert cli_main(["predict", plan_path, images[0]]) == 0  # readable table
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["image", "class", "probability"]
    assert table[1].split()[:2] == [images[0], printed["images"][0]["class_name"]]


def test_cli_errors_exit_2(tmp_path, capsys):
    png = str(tmp_path / "x.png")
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(png)
    big = str(tmp_path / "big.png")
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(big)
    plan_path = str(tmp_path / "model.plan")
    plan_from_checkpoint(random_checkpoint(ModelSpec(alpha=0.25, blocks=(1, 1, 1, 1)))).save(plan_path)

    cases = [["export", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "m.plan")],
             ["predict", str(tmp_path / "missing.plan"), png],
             ["predict", png, png],  # an image is neither a plan nor a checkpoint
             ["predict", plan_path, str(tmp_path / "missing.png")],
             ["predict", plan_path, big]]
    for argv in cases:
        assert cli_main(argv) == 2, argv
        assert capsys.readouterr().err.startswith("error: ")
    assert cli_main(["predict", plan_path, big, "--resize", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["images"]) == 1


def test_public_plan_round_trips_and_refuses_malformed_descriptions():
    """What the server sends (PublicPlan.to_dict as JSON) comes back equal; a description with a missing
    field, an unknown op kind or an op reading a later op is a ValueError naming the problem."""
    from secure.core.plan import PublicPlan
    plan = plan_from_checkpoint(random_checkpoint(ModelSpec(alpha=0.25, cull=(4,))))
    public = plan.public_info()
    sent = json.loads(json.dumps(public.to_dict()))
    assert PublicPlan.from_dict(sent) == public
    broken = [{k: v for k, v in sent.items() if k != "classes"},
              dict(sent, ops=[sent["ops"][0], dict(sent["ops"][1], op="maxpool")] + sent["ops"][2:]),
              dict(sent, ops=[sent["ops"][0], dict(sent["ops"][1], inputs=[5])] + sent["ops"][2:]),
              dict(sent, format_version=99)]
    for d in broken:
        with pytest.raises(ValueError):
            PublicPlan.from_dict(d)

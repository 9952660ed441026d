"""Bring your own model (issue #22), phase 1: any PyTorch CNN traced into the op graph
(deepreduce.trace), its ReLU and max-pooling comparison counts by hand, its plan (secure.export_module)
equal to PyTorch on real CIFAR-10 images, masked ReLUs in both forms, the CrypTen reference engine on every
kind those plans hold (against plaintext, with max-pool comparisons counted apart from ReLUs), the one-line
error for what a plan cannot hold, `deepreduce count/export --module`, and plans of ModelSpecs unchanged byte
for byte."""

from __future__ import annotations

import copy
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deepreduce
import secure
from deepreduce.checkpoint import CIFAR10_MEAN, CIFAR10_STD, random_checkpoint
from deepreduce.cli import main as cli_main
from deepreduce.data import normalize
from deepreduce.errors import UserError
from deepreduce.graph import OP_KINDS, Op
from deepreduce.masks import MaskedReLU
from deepreduce.spec import ModelSpec
from deepreduce.trace import comparison_count, count_module, relu_count, trace
from secure.core.correlations import tournament
from secure.core.party import Rendezvous
from secure.core.export import plan_from_checkpoint
from secure.core.plaintext import run_plaintext
from secure.core.plan import PublicPlan, SecurePlan
from secure.core.profiling import LayerProfile, Profile
from secure.reference.engine import CRYPTEN_KINDS, _run_party as crypten_party
from secure.tools.local import run_local_parties
from support import models as M
from support.env import CIFAR10_CLASSES, ROOT

pytestmark = pytest.mark.usefixtures("deepreduce_env")

N_IMAGES = 40
SHAPE = (3, 32, 32)

# -- the counts, by hand (32 x 32 inputs) ------------------------------------------------------------
# torchvision ResNet stem: 7x7/2 conv -> 16x16, one ReLU site there, 3x3/2 max pooling (padding 1) ->
# 8x8; stages at 8x8, 4x4, 2x2, 1x1.
# ResNet-18, width 16: 2 basic blocks per stage, 2 ReLU sites per block, widths 16, 32, 64, 128.
R18_RELUS = (16 * 16 * 16                   # stem
             + 2 * 2 * 16 * 8 * 8           # layer1
             + 2 * 2 * 32 * 4 * 4           # layer2
             + 2 * 2 * 64 * 2 * 2           # layer3
             + 2 * 2 * 128 * 1 * 1)         # layer4
# 3x3 max pooling of the 16 x 16 x 16 stem output to 16 x 8 x 8: 8 comparisons per output.
R_MAXPOOL = 16 * 8 * 8 * (3 * 3 - 1)
# ResNet-50, width 8: bottlenecks (3, 4, 6, 3), planes 8, 16, 32, 64, outputs 4x planes. ReLU 1 follows
# the 1x1 conv at the block's input size; the first block of a stage strides in its 3x3 conv, so ReLU 2
# and 3 are at the output size.
R50_RELUS = (8 * 16 * 16                                             # stem
             + 3 * (8 * 8 * 8 + 8 * 8 * 8 + 32 * 8 * 8)              # layer1 (8x8, no stride)
             + (16 * 8 * 8 + 16 * 4 * 4 + 64 * 4 * 4)                # layer2 block 0 (8x8 -> 4x4)
             + 3 * (16 * 4 * 4 + 16 * 4 * 4 + 64 * 4 * 4)            # layer2 blocks 1-3
             + (32 * 4 * 4 + 32 * 2 * 2 + 128 * 2 * 2)               # layer3 block 0
             + 5 * (32 * 2 * 2 + 32 * 2 * 2 + 128 * 2 * 2)           # layer3 blocks 1-5
             + (64 * 2 * 2 + 64 * 1 * 1 + 256 * 1 * 1)               # layer4 block 0
             + 2 * (64 * 1 * 1 + 64 * 1 * 1 + 256 * 1 * 1))         # layer4 blocks 1-2
R50_MAXPOOL = 8 * 8 * 8 * (3 * 3 - 1)
# VGG, width 16: conv 16 @32, M, 32 @16, M, 64 @8 x2, M, 128 @4 x2, M, 128 @2 x2, M -> 1x1; the
# classifier's Linear-BN-ReLU holds 128 more. 2x2 max pooling: 3 comparisons per output.
VGG_RELUS = 16 * 32 * 32 + 32 * 16 * 16 + 2 * 64 * 8 * 8 + 2 * 128 * 4 * 4 + 2 * 128 * 2 * 2 + 128
VGG_MAXPOOL = 3 * (16 * 16 * 16 + 32 * 8 * 8 + 64 * 4 * 4 + 128 * 2 * 2 + 128 * 1 * 1)
# MobileNet, width 8: stem 8 @32; blocks (depthwise ReLU at the block's output size, then pointwise):
# 8->16 @32, 16->32 /2 @16, 32->32 @16 (dilated), 32->64 /2 @8, 64->64 @8.
MOBILE_RELUS = (8 * 32 * 32
                + 8 * 32 * 32 + 16 * 32 * 32
                + 16 * 16 * 16 + 32 * 16 * 16
                + 32 * 16 * 16 + 32 * 16 * 16
                + 32 * 8 * 8 + 64 * 8 * 8
                + 64 * 8 * 8 + 64 * 8 * 8)
# ConcatNet: stem 16 @32; three dense layers of 8 @32; the transition's ReLU on the 16 + 3 x 8 = 40
# concatenated channels @32; after the 2x2 average pooling the Inception outputs 8 + 8 + 8 + 16 = 40
# channels @16, all through one ReLU. Its 3x3 max pooling branch (stride 1, padding 1) keeps 16 @16.
CONCAT_RELUS = 16 * 32 * 32 + 3 * 8 * 32 * 32 + 40 * 32 * 32 + 40 * 16 * 16
CONCAT_MAXPOOL = 16 * 16 * 16 * (3 * 3 - 1)
# Masked ResNet-18, width 16 (support.models.snl_mask): the stem linear (0); layer1 and layer3 keep a
# quarter of the channels (4 of 16 @8x8, 16 of 64 @2x2) at each of their 4 sites; layer2 and layer4
# keep the top half of the rows (32 channels x 2 of 4 rows x 4 @4x4; the single row @1x1: all 128).
MASKED_RELUS = 0 + 4 * (4 * 8 * 8) + 4 * (32 * 2 * 4) + 4 * (16 * 2 * 2) + 4 * (128 * 1 * 1)

ARCHS = {  # name: (factory, ReLUs, comparisons)
    "resnet18": (M.resnet18, R18_RELUS, R_MAXPOOL),
    "resnet50": (M.resnet50, R50_RELUS, R50_MAXPOOL),
    "vgg": (M.vgg, VGG_RELUS, VGG_MAXPOOL),
    "mobilenet": (M.mobilenet, MOBILE_RELUS, 0),
    "concat": (M.concatnet, CONCAT_RELUS, CONCAT_MAXPOOL),
    "resnet18-snl-masks": (lambda: M.resnet18(act=M.snl_act), MASKED_RELUS, R_MAXPOOL),
    "resnet18-maskedrelu": (lambda: M.resnet18(act=M.masked_act), MASKED_RELUS, R_MAXPOOL),
}


@pytest.fixture(scope="module")
def cifar_x(cifar10) -> torch.Tensor:
    """Real CIFAR-10 test images, 4 of every class, normalised."""
    per_class = N_IMAGES // len(cifar10.classes)
    picks = [np.flatnonzero(cifar10.test.labels.numpy() == c)[:per_class] for c in range(len(cifar10.classes))]
    return normalize(cifar10.test.images[np.concatenate(picks)], CIFAR10_MEAN, CIFAR10_STD)


def test_hand_counted_relus_and_comparisons():
    assert (R18_RELUS, R_MAXPOOL, MASKED_RELUS) == (11_776, 8_192, 2_816)  # the sums above, spelled out
    for name, (factory, relus, comparisons) in ARCHS.items():
        model = factory()
        counts = count_module(model, SHAPE)
        assert (counts["relu_count"], counts["comparison_count"]) == (relus, comparisons), name
        assert sum(counts["sites"].values()) == relus and sum(counts["comparisons"].values()) == comparisons
        assert relu_count(model, torch.zeros(1, *SHAPE)) == relus and comparison_count(model, SHAPE) == comparisons
        assert deepreduce.relu_count(model, SHAPE) == relus  # the package's relu_count takes modules too
    assert deepreduce.relu_count(ModelSpec(num_classes=100)) == 557_056  # and still specs


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ARCHS))
def test_exported_plan_equals_pytorch_on_real_images(tmp_path, cifar_x, name):
    factory, relus, comparisons = ARCHS[name]
    model = factory()
    path = str(tmp_path / "m.plan")
    written = secure.export_module(model, cifar_x[:2], path, class_names=CIFAR10_CLASSES,
                                   mean=CIFAR10_MEAN, std=CIFAR10_STD)
    plan = SecurePlan.load(path)  # the content hash is checked on load
    assert plan.plan_hash == written.plan_hash and plan.ops == written.ops
    assert plan.relu_count == relus and plan.comparison_count == comparisons
    assert plan.spec == {"arch": "module", "name": type(model).__name__, "comparison_count": comparisons}
    assert plan.classes == CIFAR10_CLASSES and plan.mean == CIFAR10_MEAN and plan.input_shape == SHAPE
    with torch.no_grad():  # PyTorch in float64 (the plan's arithmetic), and as the model runs (float32)
        expected = copy.deepcopy(model).double()(cifar_x.double())
        as_run = model(cifar_x).double()
    logits = run_plaintext(plan, cifar_x)
    assert logits.shape == (N_IMAGES, 10)
    assert (logits - expected).abs().max().item() <= 1e-4
    assert (logits - as_run).abs().max().item() <= 1e-5 * max(1.0, as_run.abs().max().item())
    assert expected.std(0).mean().item() > 1e-2  # the logits really vary with the image
    kinds = {op.kind for op in plan.ops}
    assert ("maxpool" in kinds) == (comparisons > 0)
    # every batch-norm folds into the conv or linear before it, except the ConcatNet's pre-activation one
    assert sum(op.kind == "scale_shift" for op in plan.ops) == (1 if name == "concat" else 0)


@pytest.mark.slow
def test_both_mask_forms_give_the_same_plan_ops_and_logits(cifar_x):
    snl, masked = M.resnet18(act=M.snl_act), M.resnet18(act=M.masked_act)
    weights = {k: v for k, v in masked.state_dict().items() if not k.endswith(".mask")}
    assert all(torch.equal(v, snl.state_dict()[k]) for k, v in weights.items())  # the same network
    a, b = secure.export_module(snl, cifar_x[:2], None), secure.export_module(masked, cifar_x[:2], None)
    assert [op.relu_count for op in a.ops] == [op.relu_count for op in b.ops]
    assert [t.tolist() for t in a.tensors.values()] == [t.tolist() for t in b.tensors.values()]
    assert torch.equal(run_plaintext(a, cifar_x), run_plaintext(b, cifar_x))
    with torch.no_grad():
        assert torch.allclose(snl(cifar_x), masked(cifar_x), atol=0, rtol=0)


def test_mask_ops_per_channel_and_per_pixel():
    ops, tensors = trace(M.resnet18(act=M.masked_act), SHAPE)
    relus = [op for op in ops if op.kind == "relu"]
    assert not [op for op in relus if op.site.startswith("relu")]  # the all-zero stem mask: no op at all
    assert len(relus) == 16
    for op in relus:
        stage = op.site.split(".")[0]
        if stage in ("layer1", "layer3"):  # per channel: C x 1 x 1
            mask = tensors[op.mask]
            assert list(mask.shape) == [op.shape[0], 1, 1]
            assert op.relu_count == op.shape[0] // 4 * op.shape[1] * op.shape[2]
        elif stage == "layer2":  # per pixel: the full shape
            assert list(tensors[op.mask].shape) == op.shape and op.relu_count == op.shape[0] * 8
        else:  # layer4: the mask keeps everything, a plain relu op
            assert op.mask is None and "mask" not in op.to_dict() and op.relu_count == 128
        assert Op.from_dict(json.loads(json.dumps(op.to_dict()))) == op


def test_masked_relu_module():
    m = MaskedReLU(torch.tensor([1.0, 0.0, 1.0]))
    x = torch.randn(2, 3, 4, 4)
    y = m(x)
    assert torch.equal(y[:, 0], x[:, 0].relu()) and torch.equal(y[:, 1], x[:, 1]) and m.kept((3, 4, 4)) == 32
    flat = MaskedReLU(torch.tensor([0, 1, 1, 0]))
    assert flat.kept((4,)) == 2 and "mask" in flat.state_dict()
    with pytest.raises(ValueError):
        MaskedReLU(torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError):
        MaskedReLU(torch.ones(2, 2))


# -- operator coverage and semantics (random inputs; export_module checks the plan against the module) --

class Zoo(nn.Module):
    """The less common forms: functional conv and linear with parameters, grouped and dilated conv,
    'same' padding, in-place ReLUs whose input is read again, clamp, torch.add with alpha, sub, div, neg,
    per-channel constants, a batch-norm after an add, adaptive pooling to 2x2, global max pooling and
    average pooling with the kernel read from the activation's size, a keepdim mean feeding a 1x1 conv, a linear without bias, BatchNorm1d with no linear before it, a masked
    ReLU on flat features, dropout and identity."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.b = nn.Parameter(torch.randn(8) * 0.1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.same = nn.Conv2d(8, 8, 5, padding="same", bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.register_buffer("per_channel", torch.linspace(0.5, 1.5, 8).view(1, 8, 1, 1))
        self.squeeze = nn.Conv2d(8, 8, 1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.gmax = nn.AdaptiveMaxPool2d(1)
        self.fc1 = nn.Linear(8 * 2 * 2 + 8 + 8 + 8, 16, bias=False)
        self.bn1d = nn.BatchNorm1d(16)
        self.act = MaskedReLU(torch.arange(16) % 3 == 0)
        self.drop, self.ident = nn.Dropout(0.3), nn.Identity()
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        x = F.conv2d(x, self.w, self.b, stride=2, padding=1)
        y = self.grouped(x)
        F.relu(y, inplace=True)  # in place: `y` is read again below, after the ReLU
        z = self.same(y).clamp(min=0)
        z = torch.add(z, y, alpha=0.5) - x / 4
        z = self.bn(-z) * self.per_channel + 0.1
        s = F.relu(self.squeeze(z.mean((2, 3), keepdim=True)))
        gavg = F.avg_pool2d(z, z.size()[3]).squeeze(3).squeeze(2)  # a kernel read from the activation's size
        feats = torch.cat([torch.flatten(self.pool(z), 1), self.gmax(z).view(-1, 8), s.flatten(1), gavg], 1)
        h = self.act(self.bn1d(self.drop(self.fc1(feats))))
        return self.fc2(self.ident(h))


def test_operator_zoo_plan_equals_module(tmp_path):
    torch.manual_seed(0)
    model = M.randomize_bn(Zoo())
    x = torch.randn(6, *SHAPE)
    model.train()  # tracing runs in eval mode and gives the flags back
    plan = secure.export_module(model, x, str(tmp_path / "zoo.plan"))
    assert model.training and model.bn.training
    model.eval()
    with torch.no_grad():
        assert (run_plaintext(SecurePlan.load(str(tmp_path / "zoo.plan")), x) - model(x).double()).abs().max() <= 1e-4
    kinds = [op.kind for op in plan.ops]
    convs = [op for op in plan.ops if op.kind == "conv"]
    assert [(c.groups, c.dilation, c.padding) for c in convs] == [
        (None, None, [1, 1]), (2, [2, 2], [2, 2]), (None, None, [2, 2]), (None, None, [0, 0])]
    assert {"scale", "scale_shift", "reshape", "concat", "maxpool", "avgpool2d", "avgpool", "add"} <= set(kinds)
    assert [op.relu_count for op in plan.ops if op.kind == "relu"] == [8 * 16 * 16, 8 * 16 * 16, 8, 6]
    assert plan.comparison_count == 8 * (16 * 16 - 1)
    for op in plan.ops:  # every op survives JSON
        assert Op.from_dict(json.loads(json.dumps(op.to_dict()))) == op
    public = PublicPlan.from_dict(json.loads(json.dumps(plan.public_info().to_dict())))
    assert public.ops == plan.ops and public.comparison_count == plan.comparison_count


def test_snl_form_with_any_operand_order_and_a_scalar_mask():
    class Forms(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.register_buffer("m", torch.tensor([1.0, 0.0, 0.0, 1.0]).view(4, 1, 1))

        def forward(self, x):
            x = self.conv(x)
            x = (1 - self.m) * x + self.m * torch.relu(x)  # swapped terms and factors
            x = x * 0.0 + F.relu(x) * 1.0  # a scalar mask of 1: a plain ReLU
            x = torch.mul(torch.relu(x), 0.0) + torch.mul(x, 1.0)  # a scalar mask of 0: no ReLU at all
            return x.flatten(1)

    model = Forms().eval()
    ops, _ = trace(model, (3, 8, 8))
    relus = [(op.relu_count, op.mask is not None) for op in ops if op.kind == "relu"]
    assert relus == [(2 * 64, True), (4 * 64, False)]
    assert not [op for op in ops if op.kind in ("scale", "scale_shift", "add")]
    x = torch.randn(3, 3, 8, 8)
    plan = secure.export_module(model, x, None)
    with torch.no_grad():
        assert (run_plaintext(plan, x) - model(x).double()).abs().max() <= 1e-5


def test_plan_validation_refuses_inconsistent_new_ops(tmp_path):
    plan = secure.export_module(M.resnet18(width=8, act=M.masked_act), torch.randn(2, *SHAPE), None)
    masked = next(op for op in plan.ops if op.mask is not None)
    masked.relu_count += 1
    bad = SecurePlan(ops=plan.ops, tensors=plan.tensors, input_shape=plan.input_shape, classes=plan.classes,
                     mean=plan.mean, std=plan.std, spec=plan.spec, relu_count=plan.relu_count)
    bad.save(str(tmp_path / "bad.plan"))
    with pytest.raises(UserError, match="mask keeps another number"):
        SecurePlan.load(str(tmp_path / "bad.plan"))


# -- the CrypTen reference engine on every kind (secure/reference/engine.py) ----------------------------

class EveryKind(nn.Module):
    """Every kind the CrypTen engine once refused, in one tiny network: max pooling with padding and an odd
    window (9 elements: one waits a tournament level), per-channel and per-pixel ReLU masks, depthwise and
    dilated grouped convolutions, concat on images and on flat features, a constant scale and offset, a
    2x2 average pool, a global average pool read by a ReLU, flatten, a batch-norm on flat features."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.channels = MaskedReLU(torch.tensor([1.0, 0, 1, 1, 0, 0, 1, 0]))
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.pixels = MaskedReLU(torch.rand(16, 8, 8, generator=torch.Generator().manual_seed(3)) < 0.5)
        self.avg = nn.AvgPool2d(2)
        self.bn = nn.BatchNorm1d(16)
        self.fc = nn.Linear(16 + 16 * 2 * 2, 10)

    def forward(self, x):
        x = self.channels(self.pool(self.stem(x)))  # 8 x 8 x 8
        x = torch.cat([self.depthwise(x), self.dilated(x)], 1)
        x = self.avg(self.pixels(x) * 0.5 + 0.25)  # 16 x 4 x 4
        g = self.bn(F.relu(F.adaptive_avg_pool2d(x, 1).flatten(1)))
        return self.fc(torch.cat([g, torch.flatten(F.max_pool2d(x, 2), 1)], 1))


# The largest logit error, as the CrypTen tests of tests/test_runtime.py allow on their logits of order 1;
# relative beyond that: CrypTen's 16-bit fixed point errs in proportion to the values (random deep networks
# such as the ResNet-50 reach logits of order 100).
CRYPTEN_TOLERANCE = 1e-2


def assert_crypten_matches_plaintext(plan: SecurePlan, x: torch.Tensor, logits: torch.Tensor) -> None:
    expected = run_plaintext(plan, x)
    assert logits.dtype == torch.float64 and logits.shape == expected.shape
    scale = max(1.0, expected.abs().max().item())
    assert (logits - expected).abs().max().item() <= CRYPTEN_TOLERANCE * scale
    assert torch.equal(logits.argmax(1), expected.argmax(1))
    assert expected.std().item() > 0.05  # not a degenerate all-equal output


def crypten_run(plan: SecurePlan, x: torch.Tensor):
    run = run_local_parties(plan, x, timeout_s=120, engine="crypten")
    assert_crypten_matches_plaintext(plan, x, run.client.logits)
    assert run.server.profile.engine == "crypten"
    return run


def assert_costs_follow_the_plan(plan: SecurePlan, profile, n: int) -> None:
    """Each layer reports the plan's ReLUs and max-pool comparisons (the latter apart from the ReLUs); a
    masked ReLU pays for its kept positions only and a max pool for its comparisons, at the same bytes each as
    any ReLU; a max pool takes one ReLU run of rounds per tournament level. `profile`: the client's (the
    server's also counts its requests to the dealer)."""
    layers = {lp.name: lp for lp in profile.layers}
    for op in plan.ops[1:]:
        lp = layers[op.name]
        assert (lp.relu_count, lp.comparison_count) == (op.relu_count * n, op.comparison_count * n), op.name
    assert (profile.relu_count, profile.comparison_count) == (plan.relu_count * n, plan.comparison_count * n)
    relus = [lp for lp in profile.layers if lp.op == "relu"]
    (relu_rounds,) = {lp.rounds for lp in relus}
    (per_relu,) = {round(lp.bytes_sent / lp.relu_count) for lp in relus}
    for op in plan.ops:
        if op.kind == "maxpool":
            lp = layers[op.name]
            assert lp.rounds == len(tournament(math.prod(op.kernel))) * relu_rounds
            assert round(lp.bytes_sent / lp.comparison_count) == per_relu


@pytest.mark.slow
def test_crypten_engine_runs_every_kind_and_agrees_with_plaintext(cifar_x):
    torch.manual_seed(0)
    plan = secure.export_module(M.randomize_bn(EveryKind()), cifar_x[:2], None)
    kinds = {op.kind for op in plan.ops}
    assert {"maxpool", "concat", "scale", "avgpool2d", "avgpool", "reshape", "scale_shift"} <= kinds
    assert any(op.groups and op.dilation for op in plan.ops) and any(op.groups == 8 for op in plan.ops)
    masks = sorted(list(plan.tensors[op.mask].shape[1:]) for op in plan.ops if op.mask)
    assert masks == [[1, 1], [8, 8]]  # a per-channel and a per-pixel mask
    assert any(op.kind == "scale_shift" and len(op.shape) == 1 for op in plan.ops)
    x = cifar_x[:2]
    run = crypten_run(plan, x)
    assert_costs_follow_the_plan(plan, run.client.profile, len(x))


CRYPTEN_ARCHS = {  # the architectures above at small widths (scripts/any_model_table.py: the tests' widths)
    "resnet18-snl-masks": lambda: M.resnet18(width=4, act=M.snl_act),
    "resnet50": lambda: M.resnet50(width=4),
    "vgg": lambda: M.vgg(width=4),
    "mobilenet": lambda: M.mobilenet(width=4),
    "concat": M.concatnet,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CRYPTEN_ARCHS))
def test_crypten_engine_agrees_with_plaintext_on_traced_architectures(cifar_x, name):
    plan = secure.export_module(CRYPTEN_ARCHS[name](), cifar_x[:2], None)
    x = cifar_x[2:4]
    run = crypten_run(plan, x)
    assert_costs_follow_the_plan(plan, run.client.profile, len(x))


def test_profiles_written_before_comparison_counts_still_load():
    layers = [LayerProfile("pool", "maxpool", 0.5, 10, 20, 3, 0, comparison_count=8),
              LayerProfile("relu", "relu", 0.5, 10, 20, 3, 4)]
    profile = Profile.from_layers(layers, 1.0, 2, False, engine="fast")
    assert (profile.relu_count, profile.comparison_count) == (4, 8)
    old = json.loads(json.dumps(profile.to_dict()))
    del old["comparison_count"]
    for layer in old["layers"]:
        del layer["comparison_count"]
    loaded = Profile.from_dict(old)
    assert loaded.comparison_count == 0 and [lp.comparison_count for lp in loaded.layers] == [0, 0]
    assert loaded.relu_count == 4 and loaded.layers[1].relu_count == 4


def test_crypten_engine_runs_every_kind_and_still_refuses_an_unknown_one_at_session_start():
    assert set(CRYPTEN_KINDS) == set(OP_KINDS)
    public = secure.export_module(nn.Sequential(nn.Conv2d(3, 4, 3, stride=8), nn.Flatten(), nn.Linear(64, 2)),
                                  torch.randn(2, *SHAPE), None).public_info()
    public.ops = [*public.ops[:-1], Op(len(public.ops) - 1, "softmax", "soft", [1], [64]), public.ops[-1]]
    with pytest.raises(ValueError, match="crypten engine cannot run op 'soft' \\(softmax\\)"):  # before any rendezvous
        crypten_party("client", public, public.tensor_shapes, torch.zeros(1, *SHAPE), 1,
                      Rendezvous("127.0.0.1", 1, 1.0), False)
    masked = secure.export_module(nn.Sequential(nn.Conv2d(3, 4, 3), MaskedReLU(torch.tensor([1, 0, 1, 1])),
                                                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)),
                                  torch.randn(2, *SHAPE), None).public_info()
    masked.masks = {}  # a server too old to send them
    with pytest.raises(ValueError, match="lacks the ReLU mask"):
        crypten_party("client", masked, masked.tensor_shapes, torch.zeros(1, *SHAPE), 1,
                      Rendezvous("127.0.0.1", 1, 1.0), False)


# -- value range --------------------------------------------------------------------------------

def test_calibration_records_the_range_and_refuses_a_plan_beyond_it(tmp_path):
    model = M.vgg(width=4)
    x = torch.randn(4, *SHAPE)
    plan = secure.export_module(model, x, None, calibration=x)
    assert 0 < plan.spec["value_range"] < 2 ** 19

    class Loud(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(F.relu(self.conv(x) * 1e7).mean((2, 3)))

    out = tmp_path / "loud.plan"
    with pytest.raises(UserError, match=r"before relu relu .*exact range") as err:
        secure.export_module(Loud(), x, str(out), calibration=x)
    assert "\n" not in str(err.value) and not out.exists()


# -- what a plan cannot hold: one line, nothing written -----------------------------------------------

USER_FILE = """
from support import models as M

def attention():
    return M.resnet18_with("attn", M.Attention(32))

def gate():
    return M.resnet18_with("gate", M.Gate())

def lstm():
    return M.LSTMHead()

def softmax():
    import torch.nn as nn
    return M.resnet18_with("attn", nn.Softmax(dim=1))

def resnet18():
    return M.resnet18()

def masked():
    return M.resnet18(act=M.masked_act)

def broken():
    raise RuntimeError("no GPU here")
"""


@pytest.fixture
def user_file(tmp_path) -> str:
    path = tmp_path / "user_models.py"
    path.write_text(USER_FILE)
    return str(path)


@pytest.mark.parametrize("factory,operator,where", [
    ("attention", "transpose", "layer3.1.attn"),
    ("gate", "sigmoid", "layer3.1.gate"),
    ("softmax", "Softmax", "layer3.1.attn"),
    ("lstm", "LSTM", "rnn"),
])
def test_unsupported_operator_is_one_error_line_and_no_file(tmp_path, capsys, user_file, factory, operator, where):
    out = tmp_path / "m.plan"
    assert cli_main(["export", "--module", f"{user_file}:{factory}", "--input-shape", "3,32,32",
                     "--out", str(out)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: unsupported operator {operator} at {where}:")
    assert captured.out == "" and not out.exists() and not list(tmp_path.glob("m.plan*"))
    assert cli_main(["count", "--module", f"{user_file}:{factory}", "--input-shape", "3,32,32"]) == 2
    assert capsys.readouterr().err.splitlines() == lines


def test_module_problems_are_one_error_line(tmp_path, capsys, user_file):
    cases = [
        (["count", "--module", f"{user_file}:nothing", "--input-shape", "3,32,32"], "defines no callable"),
        (["count", "--module", f"{user_file}:broken", "--input-shape", "3,32,32"], "no GPU here"),
        (["count", "--module", str(tmp_path / "missing.py") + ":f", "--input-shape", "3,32,32"], "does not exist"),
        (["count", "--module", user_file, "--input-shape", "3,32,32"], "FILE.py:FACTORY"),
        (["count", "--module", f"{user_file}:resnet18"], "--input-shape"),
        (["count", "--module", f"{user_file}:resnet18", "--input-shape", "32,32"], "C,H,W"),
        (["count", "--module", f"{user_file}:resnet18", "--input-shape", "3,32,32", "--alpha", "0.5"], "--alpha"),
        (["count", "--input-shape", "3,32,32"], "--module"),
        (["export", "--module", f"{user_file}:resnet18", "--input-shape", "3,32,32", "--out",
          str(tmp_path / "a.plan"), "--classes", "a,b"], "2 class names for 10 outputs"),
        (["export", "--module", f"{user_file}:resnet18", "--input-shape", "3,32,32", "--out",
          str(tmp_path / "a.plan"), "--mean", "0.5"], "one per input channel"),
        (["export", "--module", f"{user_file}:resnet18", "--input-shape", "3,32,32", "--out",
          str(tmp_path / "a.plan"), "--weights", str(tmp_path / "none.pt")], "does not exist"),
        (["export", "--out", str(tmp_path / "a.plan")], "--module"),
        (["export", "x.pt", "--out", str(tmp_path / "a.plan"), "--input-shape", "3,32,32"], "--input-shape"),
    ]
    for argv, fragment in cases:
        assert cli_main(argv) == 2, argv
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], (argv, lines)
    assert not (tmp_path / "a.plan").exists()
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "wrong.pt")
    assert cli_main(["count", "--module", f"{user_file}:resnet18", "--input-shape", "3,32,32",
                     "--weights", str(tmp_path / "wrong.pt")]) == 2
    assert "does not fit the module" in capsys.readouterr().err


def test_cli_count_module(capsys, user_file):
    assert cli_main(["count", "--module", f"{user_file}:masked", "--input-shape", "3,32,32", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["relu_count"], doc["comparison_count"]) == (MASKED_RELUS, R_MAXPOOL)
    assert doc["sites"]["layer1.0.relu1"] == 4 * 8 * 8 and doc["comparisons"] == {"maxpool": R_MAXPOOL}
    assert doc["input_shape"] == [3, 32, 32] and doc["output_shape"] == [10]
    assert cli_main(["count", "--module", f"{user_file}:resnet18", "--input-shape", "3,32,32"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["site", "count"] and table[1].split() == ["relu", "4,096", "ReLUs"]
    assert table[-2].split() == ["total", "ReLUs", f"{R18_RELUS:,}"]
    assert table[-1].split() == ["max-pooling", "comparisons", f"{R_MAXPOOL:,}"]


def test_cli_export_module_with_weights_classes_and_normalisation(tmp_path, capsys, user_file):
    trained = M.resnet18(seed=1)  # other weights than the factory's
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    out = str(tmp_path / "m.plan")
    classes = ",".join(CIFAR10_CLASSES)
    assert cli_main(["export", "--module", f"{user_file}:resnet18", "--weights", str(tmp_path / "w.pt"),
                     "--input-shape", "3,32,32", "--out", out, "--classes", classes,
                     "--mean", ",".join(map(str, CIFAR10_MEAN)), "--std", ",".join(map(str, CIFAR10_STD))]) == 0
    printed = json.loads(capsys.readouterr().out)
    plan = SecurePlan.load(out)
    assert printed == {"plan": out, "plan_hash": plan.plan_hash, "relu_count": R18_RELUS,
                       "comparison_count": R_MAXPOOL, "ops": len(plan.ops)}
    assert plan.classes == CIFAR10_CLASSES and plan.mean == CIFAR10_MEAN and plan.std == CIFAR10_STD
    assert plan.spec["name"] == "resnet18"
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        assert (run_plaintext(plan, x) - trained(x).double()).abs().max() <= 1e-4


def test_cli_export_module_with_calibration(tmp_path, capsys, tiny_folder):
    data_arg, _ = tiny_folder  # 8 x 8 RGB images
    path = tmp_path / "small.py"
    path.write_text("import torch.nn as nn\n\ndef make():\n    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), "
                    "nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 3))\n")
    out = str(tmp_path / "s.plan")
    assert cli_main(["export", "--module", f"{path}:make", "--input-shape", "3,8,8", "--out", out,
                     "--calibration", data_arg, "--classes", "ant,bee,cow"]) == 0
    printed = json.loads(capsys.readouterr().out)
    plan = SecurePlan.load(out)
    assert 0 < printed["value_range"] == plan.spec["value_range"] < 2 ** 19
    assert plan.relu_count == 4 * 6 * 6 and plan.comparison_count == 4 * 3 * 3 * 3


# -- plans of ModelSpecs: unchanged ------------------------------------------------------------------

# The JSON keys every op kind had before modules could be exported: a ModelSpec export must emit exactly
# these (new fields only appear for new kinds or when set), so that its content hash is unchanged.
LEGACY_KEYS = {"input": set(), "conv": {"weight", "bias", "stride", "padding"}, "scale_shift": {"scale", "shift"},
               "relu": {"site", "relu_count"}, "add": set(), "avgpool": set(), "linear": {"weight", "bias"}}
BASE_KEYS = {"id", "op", "name", "inputs", "shape"}


def test_shipped_demo_plan_loads_with_its_hash():
    plan = SecurePlan.load(str(ROOT / "demo" / "model.plan"))
    assert plan.plan_hash.startswith("dc856688")
    for op in plan.ops:
        assert set(op.to_dict()) == BASE_KEYS | LEGACY_KEYS[op.kind]


@pytest.mark.parametrize("spec", [ModelSpec(alpha=0.25, cull=(1,), thin="top", stem_relu=False),
                                  ModelSpec(arch="wrn22_8", widen=1, alpha=0.25, rho=0.5)])
def test_modelspec_export_emits_no_new_field(tmp_path, spec):
    plan = plan_from_checkpoint(random_checkpoint(spec, seed=1))
    plan.save(str(tmp_path / "p.plan"))
    raw = (tmp_path / "p.plan").read_bytes()
    header = json.loads(raw[16:16 + int.from_bytes(raw[8:16], "little")])
    for op in header["ops"]:
        assert set(op) == BASE_KEYS | LEGACY_KEYS[op["op"]], op
    assert SecurePlan.load(str(tmp_path / "p.plan")).plan_hash == plan.plan_hash
    assert plan.comparison_count == 0 and os.path.getsize(tmp_path / "p.plan") == len(raw)

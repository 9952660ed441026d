"""ReLU accounting: DeepReDuce golden values (exact), hand-computed counts, analytic == measured, and
removed ReLUs being no module at all."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from deepreduce.models import build_model
from deepreduce.relus import measure_relu_count, measured_relu_count, relu_count, relu_count_by_stage, relu_sites
from deepreduce.spec import ModelSpec

pytestmark = pytest.mark.usefixtures("deepreduce_env")


def r18(**kw) -> ModelSpec:
    return ModelSpec(**{"num_classes": 100, **kw})


# -- golden values from DeepReDuce (Jha et al., 2021), ResNet18 on CIFAR-100 -------------------------

GOLDEN = [
    (r18(), 557_056),
    (r18(stem_relu=False), 491_520),
    (r18(alpha=0.5), 278_528),
    (r18(stem_relu=False, cull=(1,)), 229_376),
    (r18(stem_relu=False, cull=(1,), thin="bottom"), 114_688),
    (r18(stem_relu=False, cull=(1,), thin="bottom", alpha=0.5), 57_344),
    (r18(stem_relu=False, cull=(1, 4), thin="bottom", alpha=0.5), 49_152),
    (r18(stem_relu=False, cull=(1,), thin="bottom", rho=0.5), 28_672),
    (r18(stem_relu=False, cull=(1,), thin="bottom", alpha=0.5, rho=0.5), 14_336),
    (r18(stem_relu=False, cull=(1, 4), thin="bottom", alpha=0.5, rho=0.5), 12_288),
    (r18(stem_relu=False, blocks=(2, 1, 1, 1), cull=(1,), thin="bottom", alpha=0.5, rho=0.5), 7_168),
    (r18(input_size=64), 2_228_224),
    (r18(input_size=64, stem_relu=False, cull=(1,)), 917_504),
]


@pytest.mark.parametrize("spec, expected", GOLDEN, ids=[str(e) for _, e in GOLDEN])
def test_deepreduce_golden_values(spec, expected):
    assert relu_count(spec) == expected


def test_golden_values_measured_with_hooks():
    # Independent check of a few golden values on real forward passes.
    for spec, expected in (GOLDEN[0], GOLDEN[6], GOLDEN[10]):
        assert measured_relu_count(spec) == expected


# -- hand computations from the layer shapes -----------------------------------------------------------

def resnet18_stage_counts(size=32, alpha=1.0, stem=True):
    """Per-stage ReLUs of ResNet18: every block has 2 ReLUs of the stage's output shape."""
    widths = [int(64 * alpha), int(128 * alpha), int(256 * alpha), int(512 * alpha)]
    maps = [size, size // 2, size // 4, size // 8]
    table = {"stem": widths[0] * size * size if stem else 0}
    for s in range(4):
        table[f"S{s + 1}"] = 2 * 2 * widths[s] * maps[s] ** 2
    return table


def wrn22_8_stage_counts(size=32):
    """WRN-22-8: 3 stages of 3 pre-activation blocks; widths 16 (stem), 128, 256, 512.

    A block has a pre-activation ReLU on its *input* (r2) and one after its first conv (r1), at the
    block's output shape (the first block of stages 2 and 3 downsamples in conv1). The final BN-ReLU
    (s3.head) sits on the stage-3 output.
    """
    s1 = 16 * size**2 + 128 * size**2 + 2 * (128 * size**2 + 128 * size**2)
    h2 = size // 2
    s2 = 128 * size**2 + 256 * h2**2 + 2 * (256 * h2**2 + 256 * h2**2)
    h3 = size // 4
    s3 = 256 * h2**2 + 512 * h3**2 + 2 * (512 * h3**2 + 512 * h3**2)
    head = 512 * h3**2
    return {"S1": s1, "S2": s2, "S3": s3 + head}


def test_resnet18_per_stage_table():
    table = relu_count_by_stage(ModelSpec())
    assert list(table) == ["stem", "S1", "S2", "S3", "S4"]
    assert dict(table) == resnet18_stage_counts() == {
        "stem": 65_536, "S1": 262_144, "S2": 131_072, "S3": 65_536, "S4": 32_768}
    assert sum(table.values()) == relu_count(ModelSpec()) == 557_056
    assert dict(relu_count_by_stage(ModelSpec(input_size=64, alpha=0.5))) == resnet18_stage_counts(64, 0.5)
    culled = relu_count_by_stage(ModelSpec(stem_relu=False, cull=(1, 4)))
    assert dict(culled) == {"stem": 0, "S1": 0, "S2": 131_072, "S3": 65_536, "S4": 0}


def test_wrn22_8_total_and_per_stage():
    spec = ModelSpec(arch="wrn22_8")
    hand = wrn22_8_stage_counts(32)
    assert sum(hand.values()) == 1_392_640
    table = relu_count_by_stage(spec)
    assert list(table) == ["S1", "S2", "S3"]
    assert dict(table) == hand
    assert relu_count(spec) == 1_392_640
    assert relu_count(spec.replace(remove=("s3.head",))) == 1_392_640 - 512 * 8 * 8 == 1_359_872
    assert relu_count(spec.replace(input_size=64)) == sum(wrn22_8_stage_counts(64).values())


def test_thin_top_vs_bottom_by_hand():
    # ResNet18: both ReLUs of a block see the same shape, so top and bottom cost the same: half the blocks.
    blocks_only = sum(v for k, v in resnet18_stage_counts().items() if k != "stem")
    for thin in ("bottom", "top"):
        assert relu_count(ModelSpec(stem_relu=False, thin=thin)) == blocks_only // 2 == 245_760
    assert list(relu_sites(ModelSpec(stem_relu=False, thin="top"))) == [
        f"s{s}.b{b}.r2" for s in range(1, 5) for b in (1, 2)]
    assert list(relu_sites(ModelSpec(stem_relu=False, thin="bottom"))) == [
        f"s{s}.b{b}.r1" for s in range(1, 5) for b in (1, 2)]
    # WRN-22-8: they differ, because r2 (pre-activation) of a stage's first block sees the narrower input.
    bottom = 3 * 128 * 32**2 + 3 * 256 * 16**2 + 3 * 512 * 8**2 + 512 * 8**2       # r1 sites + head
    top = (16 * 32**2 + 2 * 128 * 32**2) + (128 * 32**2 + 2 * 256 * 16**2) + (256 * 16**2 + 2 * 512 * 8**2) \
        + 512 * 8**2                                                                  # r2 sites + head
    assert (bottom, top) == (720_896, 704_512)
    assert relu_count(ModelSpec(arch="wrn22_8", thin="bottom")) == bottom
    assert relu_count(ModelSpec(arch="wrn22_8", thin="top")) == top


def test_remove_site_subtracts_exactly_that_site():
    base = ModelSpec()
    assert relu_count(base.replace(remove=("s2.b1.r1",))) == 557_056 - 128 * 16 * 16
    assert relu_count(base.replace(remove=("stem", "s4.b2.r2"))) == 557_056 - 64 * 32 * 32 - 512 * 4 * 4
    assert "s2.b1.r1" not in relu_sites(base.replace(remove=("s2.b1.r1",)))


def test_no_relus_at_all():
    spec = ModelSpec(stem_relu=False, cull=(1, 2, 3, 4))
    assert relu_count(spec) == 0 == measured_relu_count(spec)
    assert not [m for m in build_model(spec).modules() if isinstance(m, nn.ReLU)]
    assert relu_count(ModelSpec(arch="wrn22_8", alpha=0.25, cull=(1, 2, 3))) == 0


# -- analytic == measured on many random specs -------------------------------------------------------

def random_spec(rng: random.Random, arch: str, alpha: float, rho: float) -> ModelSpec:
    stages = 4 if arch == "resnet18" else 3
    base = ModelSpec(arch=arch)
    blocks = tuple(rng.randint(1, 3) for _ in range(stages))
    probe = ModelSpec(arch=arch, blocks=blocks)
    sites = probe.site_names()
    return ModelSpec(
        arch=arch, alpha=alpha, rho=rho, blocks=blocks,
        num_classes=rng.choice([2, 10, 100]), in_channels=rng.choice([1, 3]),
        input_size=rng.choice([16, 32, 64]),
        stem_relu=rng.random() < 0.5,
        cull=tuple(s for s in range(1, stages + 1) if rng.random() < 0.3),
        thin=rng.choice(["none", "bottom", "top"]),
        remove=tuple(rng.sample(sites, rng.randint(0, 3))),
        widen=rng.choice([1, 2, 8]) if arch == "wrn22_8" else base.widen,
    )


CASES = [(arch, alpha, rho, seed)
         for arch in ("resnet18", "wrn22_8") for alpha in (0.25, 0.5, 1.0) for rho in (1.0, 0.5, 0.25)
         for seed in range(2)]


def _cheaper(spec: ModelSpec) -> ModelSpec:
    # Full-width WRN-22-8 at 64x64 is slow on a CPU; width 8 is still covered at smaller inputs.
    if spec.arch == "wrn22_8" and spec.alpha * spec.widen * spec.input_size / spec.stem_stride > 256:
        return spec.replace(input_size=16 * spec.stem_stride)
    return spec


@pytest.mark.parametrize("arch, alpha, rho, seed", CASES)
def test_analytic_equals_measured(arch, alpha, rho, seed):
    torch.manual_seed(0)
    rng = random.Random(f"{arch}-{alpha}-{rho}-{seed}")
    spec = _cheaper(random_spec(rng, arch, alpha, rho))
    model = build_model(spec)
    assert measure_relu_count(model, spec) == relu_count(spec), spec
    # Per site too: the shapes of the actual activations match the analytic site sizes.
    assert_sites_match_modules(model, spec)


def test_random_specs_cover_the_space():
    specs = [_cheaper(random_spec(random.Random(f"{a}-{al}-{r}-{s}"), a, al, r)) for a, al, r, s in CASES]
    assert {s.input_size for s in specs} >= {16, 32, 64}
    assert {s.thin for s in specs} == {"none", "bottom", "top"}
    assert any(s.cull for s in specs) and any(s.remove for s in specs) and any(not s.stem_relu for s in specs)
    assert {s.blocks for s in specs if s.arch == "resnet18"} - {(2, 2, 2, 2)}


# -- a removed ReLU is no module call at all ------------------------------------------------------------

def site_modules(model: nn.Module, spec: ModelSpec) -> dict[str, nn.Module]:
    """The module at each ReLU site, by the architecture's attribute layout."""
    out = {}
    for site in spec.site_names():
        if site == "stem" or site == "s3.head":
            out[site] = model.relu
        else:
            stage, block, pos = site.split(".")
            out[site] = getattr(model.stages[int(stage[1:]) - 1][int(block[1:]) - 1], "relu" + pos[1:])
    return out


def assert_sites_match_modules(model: nn.Module, spec: ModelSpec) -> None:
    modules = site_modules(model, spec)
    kept = [s for s in spec.site_names() if spec.keeps(s)]
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == len(kept)
    for site, module in modules.items():
        if spec.keeps(site):
            assert isinstance(module, nn.ReLU), site
        else:
            assert isinstance(module, nn.Identity) and not isinstance(module, nn.ReLU), site
    # Every kept ReLU runs exactly once per forward pass, on an activation of the analytic size.
    calls = {}
    by_module = {id(m): s for s, m in modules.items()}
    hooks = [m.register_forward_hook(lambda m, i, o: calls.setdefault(by_module[id(m)], []).append(o[0].numel()))
             for m in relus]
    with torch.no_grad():
        model.eval()(torch.zeros(2, spec.in_channels, spec.input_size, spec.input_size))
    for h in hooks:
        h.remove()
    assert calls == {site: [n] for site, n in relu_sites(spec).items()}


@pytest.mark.parametrize("spec", [
    ModelSpec(),
    ModelSpec(stem_relu=False, cull=(1, 4), thin="bottom", alpha=0.25),
    ModelSpec(thin="top", remove=("stem", "s2.b2.r2"), alpha=0.25),
    ModelSpec(arch="wrn22_8", alpha=0.125, thin="bottom", remove=("s3.head",)),
    ModelSpec(arch="wrn22_8", alpha=0.125, cull=(2,), thin="top"),
], ids=range(5))
def test_removed_relus_are_not_modules(spec):
    model = build_model(spec)
    assert_sites_match_modules(model, spec)
    removed = [s for s in spec.site_names() if not spec.keeps(s)]
    n_modules = sum(isinstance(m, nn.ReLU) for m in model.modules())
    assert n_modules == len(spec.site_names()) - len(removed)
    # No functional ReLU hides in a forward() either: with every site removed the network is affine.
    if spec == ModelSpec():
        return
    affine = build_model(spec.replace(stem_relu=False, cull=tuple(range(1, spec.num_stages + 1)))).eval()
    x = torch.randn(2, spec.in_channels, spec.input_size, spec.input_size)
    with torch.no_grad():
        f0 = affine(torch.zeros_like(x))
        assert torch.allclose(affine(x) + affine(-x), 2 * f0, atol=1e-4)


def test_measured_count_is_per_image():
    spec = ModelSpec(alpha=0.25, stem_relu=False, cull=(1,))
    model = build_model(spec)
    assert measure_relu_count(model, spec) == relu_count(spec) == 229_376 // 4
    assert model.training  # measuring leaves the mode as it was

"""ModelSpec: JSON round-trip, validation with clear UserErrors, site names and the remove/cull/thin masks."""

from __future__ import annotations

import json
import re

import pytest

from deepreduce.errors import UserError
from deepreduce.spec import SPEC_FORMAT_VERSION, ModelSpec

RESNET_SITES = ["stem"] + [f"s{s}.b{b}.r{r}" for s in range(1, 5) for b in (1, 2) for r in (1, 2)]
WRN_SITES = [f"s{s}.b{b}.r{r}" for s in range(1, 4) for b in (1, 2, 3) for r in (1, 2)] + ["s3.head"]

SPECS = [
    ModelSpec(),
    ModelSpec(num_classes=100, alpha=0.5, rho=0.5, blocks=(2, 1, 1, 1), stem_relu=False, cull=(4, 1),
              thin="bottom", remove=("s3.b1.r2", "s2.b1.r1")),
    ModelSpec(arch="wrn22_8", in_channels=1, input_size=64, thin="top", remove=("s3.head",), widen=4),
    ModelSpec(arch="wrn22_8", blocks=(1, 2, 1), cull=(2,), alpha=0.25),
]


# -- serialisation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", SPECS, ids=range(len(SPECS)))
def test_json_round_trip(spec):
    text = spec.to_json()
    d = json.loads(text)
    assert d["format_version"] == SPEC_FORMAT_VERSION == 1
    assert set(d) == {"format_version", "arch", "num_classes", "in_channels", "input_size", "alpha", "rho",
                      "blocks", "stem_relu", "cull", "thin", "remove", "widen"}
    back = ModelSpec.from_json(text)
    assert back == spec and hash(back) == hash(spec)
    assert back.to_dict() == spec.to_dict()
    # Plain JSON types only (lists, not tuples), so other tools can read it.
    assert isinstance(d["blocks"], list) and isinstance(d["cull"], list) and isinstance(d["remove"], list)


def test_save_and_load_file(tmp_path):
    spec = SPECS[1]
    path = tmp_path / "sub" / "spec.json"
    spec.save(str(path))
    assert json.loads(path.read_text())["format_version"] == 1
    assert ModelSpec.load(str(path)) == spec
    assert not [p for p in path.parent.iterdir() if p.name != "spec.json"]  # no temp file left behind


def test_from_dict_without_version_and_with_defaults():
    spec = ModelSpec.from_dict({"alpha": 0.5})
    assert spec == ModelSpec(alpha=0.5)
    assert spec.blocks == (2, 2, 2, 2)
    assert ModelSpec.from_dict({"arch": "wrn22_8"}).blocks == (3, 3, 3)


def test_list_fields_are_normalised():
    a = ModelSpec(cull=[4, 1], remove=["s2.b2.r1", "s2.b1.r1"], blocks=[2, 2, 2, 2])
    b = ModelSpec(cull=(1, 4), remove=("s2.b1.r1", "s2.b2.r1"))
    assert a == b and hash(a) == hash(b)
    assert a.cull == (1, 4) and a.remove == ("s2.b1.r1", "s2.b2.r1")


# -- validation -------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, message", [
    ({"arch": "resnet50"}, "unknown arch 'resnet50'"),
    ({"alpha": 0}, "alpha must be in (0, 4]"),
    ({"alpha": -0.5}, "alpha must be in (0, 4]"),
    ({"rho": 1.5}, "rho must be in (0, 1]"),
    ({"rho": 0}, "rho must be in (0, 1]"),
    ({"blocks": (2, 2, 2)}, "blocks must list 4 positive integers for resnet18"),
    ({"blocks": (2, 0, 2, 2)}, "blocks must list 4 positive integers"),
    ({"arch": "wrn22_8", "blocks": (3, 3, 3, 3)}, "blocks must list 3 positive integers for wrn22_8"),
    ({"cull": (5,)}, "cull stages must be in 1..4"),
    ({"cull": (0,)}, "cull stages must be in 1..4"),
    ({"arch": "wrn22_8", "cull": (4,)}, "cull stages must be in 1..3"),
    ({"cull": (1, 1)}, "cull lists a stage twice"),
    ({"thin": "middle"}, "thin must be one of none, bottom, top"),
    ({"remove": ("s9.b1.r1",)}, "remove names unknown ReLU sites ['s9.b1.r1']"),
    ({"remove": ("s1.b3.r1",)}, "unknown ReLU sites"),          # ResNet18 stage 1 has 2 blocks
    ({"arch": "wrn22_8", "remove": ("stem",)}, "unknown ReLU sites ['stem']"),  # WRN has no stem ReLU
    ({"remove": ("s3.head",)}, "unknown ReLU sites"),           # ...and ResNet18 no head ReLU
    ({"num_classes": 1}, "num_classes must be an integer >= 2"),
    ({"in_channels": 4}, "in_channels must be 1 or 3"),
    ({"input_size": 2}, "input_size must be an integer >= 4"),
    ({"widen": 0}, "widen must be an integer >= 1"),
])
def test_invalid_specs_raise_clear_user_errors(fields, message):
    with pytest.raises(UserError) as info:
        ModelSpec(**fields)
    text = str(info.value)
    assert message in text
    assert "\n" not in text
    # The same error comes out of the JSON path.
    with pytest.raises(UserError, match=re.escape(message)):
        ModelSpec.from_json(json.dumps({"format_version": 1, **{k: list(v) if isinstance(v, tuple) else v
                                                                 for k, v in fields.items()}}))


def test_unknown_json_field():
    with pytest.raises(UserError, match=r"unknown spec fields \['depth'\]") as info:
        ModelSpec.from_dict({"arch": "resnet18", "depth": 50})
    assert "valid fields are" in str(info.value) and "alpha" in str(info.value)


@pytest.mark.parametrize("version", [0, 2, "1"])
def test_wrong_format_version(version):
    with pytest.raises(UserError, match=f"spec format_version {version} is not supported"):
        ModelSpec.from_dict({"format_version": version, "alpha": 0.5})


@pytest.mark.parametrize("text, message", [
    ("{not json", "spec is not valid JSON"),
    ("[1, 2]", "a model spec must be a JSON object"),
    ('{"alpha": "wide"}', "malformed spec"),
    ('{"blocks": 5}', "malformed spec"),
    ('{"cull": ["x"]}', "malformed spec"),
])
def test_malformed_json_is_a_user_error(text, message):
    with pytest.raises(UserError, match=message):
        ModelSpec.from_json(text)


def test_load_missing_file(tmp_path):
    with pytest.raises(UserError, match="cannot read spec file"):
        ModelSpec.load(str(tmp_path / "nope.json"))


def test_replace_revalidates():
    with pytest.raises(UserError, match="alpha"):
        ModelSpec().replace(alpha=-1)
    assert ModelSpec().replace(alpha=0.5).alpha == 0.5


# -- sites and masks --------------------------------------------------------------------------------

def test_site_names():
    assert ModelSpec().site_names() == RESNET_SITES
    assert ModelSpec(arch="wrn22_8").site_names() == [
        f"s{s}.b{b}.r{r}" for s in range(1, 4) for b in (1, 2, 3) for r in (1, 2)] + ["s3.head"]
    assert sorted(ModelSpec(arch="wrn22_8").site_names()) == sorted(WRN_SITES)
    assert ModelSpec(blocks=(2, 1, 1, 1)).site_names() == ["stem", "s1.b1.r1", "s1.b1.r2", "s1.b2.r1", "s1.b2.r2",
                                                           "s2.b1.r1", "s2.b1.r2", "s3.b1.r1", "s3.b1.r2",
                                                           "s4.b1.r1", "s4.b1.r2"]


def kept(spec):
    return [s for s in spec.site_names() if spec.keeps(s)]


def test_keeps_cull_thin_stem():
    assert kept(ModelSpec()) == RESNET_SITES
    assert kept(ModelSpec(stem_relu=False)) == RESNET_SITES[1:]
    assert kept(ModelSpec(stem_relu=False, cull=(1, 4))) == [s for s in RESNET_SITES[1:] if s[1] in "23"]
    assert kept(ModelSpec(thin="bottom")) == ["stem"] + [s for s in RESNET_SITES[1:] if s.endswith("r1")]
    assert kept(ModelSpec(thin="top")) == ["stem"] + [s for s in RESNET_SITES[1:] if s.endswith("r2")]
    # WRN: culling stage 3 takes the head ReLU with it; thinning leaves the head alone.
    assert "s3.head" not in kept(ModelSpec(arch="wrn22_8", cull=(3,)))
    assert "s3.head" in kept(ModelSpec(arch="wrn22_8", thin="bottom"))
    assert "s3.head" in kept(ModelSpec(arch="wrn22_8", thin="top"))


def test_remove_finer_masks():
    spec = ModelSpec(remove=("stem", "s2.b1.r1", "s4.b2.r2"))
    assert kept(spec) == [s for s in RESNET_SITES if s not in ("stem", "s2.b1.r1", "s4.b2.r2")]
    # remove composes with cull and thin (removing an already-removed site is harmless).
    spec = ModelSpec(cull=(1,), thin="bottom", stem_relu=False, remove=("s1.b1.r1", "s3.b2.r1"))
    assert kept(spec) == ["s2.b1.r1", "s2.b2.r1", "s3.b1.r1", "s4.b1.r1", "s4.b2.r1"]
    wrn = ModelSpec(arch="wrn22_8", remove=("s3.head", "s1.b1.r2"))
    assert kept(wrn) == [s for s in ModelSpec(arch="wrn22_8").site_names() if s not in ("s3.head", "s1.b1.r2")]


def test_site_stage():
    assert ModelSpec.site_stage("stem") == 0
    assert ModelSpec.site_stage("s3.b2.r1") == 3
    assert ModelSpec.site_stage("s3.head") == 3


def test_rho_sets_stem_stride():
    assert [ModelSpec(rho=r).stem_stride for r in (1, 0.5, 0.25)] == [1, 2, 4]
    from deepreduce.models import relu_site_shapes
    assert relu_site_shapes(ModelSpec(rho=0.5))["s4.b2.r2"][1:] == (2, 2)      # 32 -> 16 -> 8 -> 4 -> 2
    assert relu_site_shapes(ModelSpec(input_size=64))["s4.b2.r2"][1:] == (8, 8)
    assert relu_site_shapes(ModelSpec(arch="wrn22_8"))["s3.head"][1:] == (8, 8)

"""ModelSpec: everything that decides a network's shape and where its ReLUs are.

A spec is plain data (JSON round-trip with a format version) so it can travel from the optimizer
to checkpoints, frontier files and secure plans. ReLU *sites* are named uniformly across
architectures: ``stem``, and ``s{stage}.b{block}.r{position}`` (position 1 = the ReLU after
conv1/bn1 of a block, 2 = the one after the residual add).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from .errors import UserError
from .fileio import atomic_write_json

SPEC_FORMAT_VERSION = 1
THIN_MODES = ("none", "bottom", "top")


def _architecture(name: str):
    """The architecture's record (stages, default blocks, sites outside the blocks): its module in
    deepreduce.models owns these facts. Imported here, not at the top: the models import torch."""
    from .models import architecture
    return architecture(name)


@dataclass(frozen=True)
class ModelSpec:
    arch: str = "resnet18"
    num_classes: int = 10
    in_channels: int = 3
    input_size: int = 32
    alpha: float = 1.0
    rho: float = 1.0
    blocks: tuple[int, ...] | None = None  # None: the architecture's default
    stem_relu: bool = True
    cull: tuple[int, ...] = ()
    thin: str = "none"
    remove: tuple[str, ...] = ()  # finer control: extra ReLU sites removed by name
    widen: int = 8  # WideResNet width factor (ignored by resnet18)

    def __post_init__(self):
        # Normalise list-like fields so equality and hashing work after a JSON round-trip.
        arch = _architecture(self.arch)  # an unknown name fails here, with the known ones listed
        blocks = arch.default_blocks if self.blocks is None else self.blocks
        object.__setattr__(self, "blocks", tuple(int(b) for b in blocks))
        object.__setattr__(self, "cull", tuple(sorted(int(s) for s in self.cull)))
        object.__setattr__(self, "remove", tuple(sorted(str(s) for s in self.remove)))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "rho", float(self.rho))
        self.validate()

    # -- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        stages = self.num_stages
        _check(isinstance(self.num_classes, int) and self.num_classes >= 2,
               f"num_classes must be an integer >= 2, got {self.num_classes!r}")
        _check(self.in_channels in (1, 3), f"in_channels must be 1 or 3, got {self.in_channels!r}")
        _check(isinstance(self.input_size, int) and self.input_size >= 4,
               f"input_size must be an integer >= 4, got {self.input_size!r}")
        _check(0 < self.alpha <= 4, f"alpha must be in (0, 4], got {self.alpha}")
        _check(0 < self.rho <= 1, f"rho must be in (0, 1], got {self.rho}")
        _check(len(self.blocks) == stages and all(b >= 1 for b in self.blocks),
               f"blocks must list {stages} positive integers for {self.arch}, got {list(self.blocks)}")
        bad = [s for s in self.cull if not 1 <= s <= stages]
        _check(not bad, f"cull stages must be in 1..{stages}, got {list(self.cull)}")
        _check(len(set(self.cull)) == len(self.cull), f"cull lists a stage twice: {list(self.cull)}")
        _check(self.thin in THIN_MODES, f"thin must be one of {', '.join(THIN_MODES)}, got {self.thin!r}")
        valid_sites = set(self.site_names())
        unknown = [s for s in self.remove if s not in valid_sites]
        _check(not unknown, f"remove names unknown ReLU sites {unknown}: see `deepreduce count --json` for the site names")
        _check(isinstance(self.stem_relu, bool), f"stem_relu must be true or false, got {self.stem_relu!r}")
        _check(isinstance(self.widen, int) and self.widen >= 1, f"widen must be an integer >= 1, got {self.widen!r}")

    # -- geometry shared by the architectures ----------------------------------------------
    @property
    def stem_stride(self) -> int:
        """DeepReDuce's rho: downsample the input with the stride of the 3x3 stem."""
        return max(1, round(1 / self.rho))

    @property
    def num_stages(self) -> int:
        return _architecture(self.arch).stages

    def site_names(self) -> list[str]:
        """Every ReLU site of the architecture, kept or not, in network order."""
        arch = _architecture(self.arch)
        names = list(arch.lead_sites)
        for stage, nblocks in enumerate(self.blocks, start=1):
            for block in range(1, nblocks + 1):
                names += [f"s{stage}.b{block}.r1", f"s{stage}.b{block}.r2"]
        return names + list(arch.tail_sites)

    @staticmethod
    def site_stage(site: str) -> int:
        """The stage a site belongs to (0 for the stem)."""
        return 0 if site == "stem" else int(site.split(".")[0][1:])

    def keeps(self, site: str) -> bool:
        """Whether the ReLU at `site` is present under cull/thin/remove."""
        if site in self.remove:
            return False
        if site == "stem":
            return self.stem_relu
        if self.site_stage(site) in self.cull:
            return False
        pos = site.rsplit(".", 1)[1]
        if pos == "head":  # WRN's final BN-ReLU is outside any block: thinning leaves it
            return True
        if self.thin == "bottom":
            return pos == "r1"
        if self.thin == "top":
            return pos == "r2"
        return True

    # -- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        return {"format_version": SPEC_FORMAT_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        if not isinstance(d, dict):
            raise UserError("a model spec must be a JSON object")
        d = dict(d)
        version = d.pop("format_version", SPEC_FORMAT_VERSION)
        if version != SPEC_FORMAT_VERSION:
            raise UserError(f"spec format_version {version} is not supported (this version reads {SPEC_FORMAT_VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown spec fields {unknown}: valid fields are {sorted(known)}")
        try:
            return cls(**d)
        except (TypeError, ValueError) as exc:  # e.g. {"blocks": 5} or {"alpha": "wide"}
            raise UserError(f"malformed spec: {exc}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise UserError(f"spec is not valid JSON ({exc})") from None

    @classmethod
    def load(cls, path: str) -> "ModelSpec":
        try:
            with open(path) as f:
                return cls.from_json(f.read())
        except OSError as exc:
            raise UserError(f"cannot read spec file {path}: {exc.strerror}") from None

    def save(self, path: str) -> None:
        atomic_write_json(path, self.to_dict())

    def replace(self, **changes) -> "ModelSpec":
        return dataclasses.replace(self, **changes)


def _conv_out(size: int, stride: int) -> int:
    """Output size of a 3x3 convolution with padding 1."""
    return (size - 1) // stride + 1


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)

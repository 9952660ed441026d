"""The optimizer's YAML configuration: schema, defaults, validation.

Every hyperparameter of a `deepreduce optimize` run lives in one YAML file. The defaults are the
built-in ``deepreduce/configs/resnet18-cifar.yaml``; a user file needs only the keys it changes
(it is deep-merged over the defaults; lists are replaced, not merged). Schema::

    base:                     # the all-ReLU network every candidate derives from (and the teacher)
      arch: resnet18          # resnet18 (4 stages) | wrn22_8 (3 stages)
      alpha: 1.0              # channel width multiplier, in (0, 4]
      rho: 1.0                # input downsampling (stem stride round(1/rho)), in (0, 1]
      blocks: null            # blocks per stage, e.g. [2, 2, 2, 2]; null = the arch's default
      widen: 8                # WideResNet width factor (ignored by resnet18)
    evaluation:
      test_subset: null       # accuracy on a fixed random subset of N test images (null = all)
    train:                    # SGD one-cycle hyperparameters, one block per kind of job, each with
      teacher: {...}          #   epochs (>= 1), batch_size (>= 1), lr (> 0), weight_decay (>= 0),
      criticality: {...}      #   subset (images, or null = all), seed, compile (bool), init
      candidates: {...}       #   (scratch | teacher: warm start, below); criticality nets train
      finals: {...}           #   without KD, candidates, finals and ablations with it (kd below);
                              #   optional: label_smoothing (in [0, 1), with KD too) and ema_decay
                              #   (in [0, 1); 0 = off: evaluate and save an EMA of the weights), default 0
    kd:                       # distillation of every candidate from the teacher
      enabled: true
      temperature: 4.0        # > 0
      alpha: 0.9              # weight of the soft loss, in [0, 1]
    criticality:
      order: critical         # critical: keep the most critical stages first | per_relu: the largest
                              #   gain per 1K ReLUs first (budget-aware) | reverse of critical (ablation)
    culling:
      stem_relu: false        # whether candidates keep the stem ReLU (DeepReDuce drops it)
    thinning:
      enabled: true
      position: bottom        # bottom: keep the ReLU after conv1 (DeepReDuce) | top: after the add
    reshape:                  # shrink culled/thinned parents further to reach very low budgets
      enabled: true
      apply_to: thinned       # culled | thinned | all: which parents get reshaped
      alphas: [0.5, 0.25]     # width factors on top of base.alpha, each in (0, 1]
      rhos: [0.5]             # input-downsampling factors on top of base.rho, each in (0, 1]
      blocks: []              # blocks-per-stage variants, each no deeper than base.blocks
    pruning:
      enabled: true           # skip reshaped variants that cannot improve the frontier (below)
      max_relus: null         # candidates with more ReLUs are not trained (null = no cap; applies
                              #   even with enabled: false); variants under the cap are trained even
                              #   when their parent was capped
    budgets: [100000, 50000, 15000]   # ReLU budgets: frontier.json picks the best model under each
    finals:
      budgets: []             # retrain the best candidate within each of these ReLU budgets with train.finals
    ablations:
      budget: null            # ablate the best candidate within this ReLU budget; null = no ablation jobs
      kd: true                # the pick's spec trained with KD switched (off if it was on)
      order: true             # the pick's shape keeping the stages of the other criticality order
    quick: {...}              # overrides applied with --quick (same schema, any subset of keys);
                              # typos in it are reported even without --quick

The reshape grid of a parent is every combination of {1} + alphas, {1} + rhos and
{base.blocks} + blocks except the parent itself. Pruning: a reshaped variant of parent P is not
trained when an already-trained candidate with no more ReLUs than the variant has a higher
accuracy than P (shrinking P is not expected to beat P, so the variant would be dominated). A parent
above pruning.max_relus has no accuracy, so this rule cannot skip its variants.

Warm start (train.<kind>.init: teacher): the job starts from the teacher's weights wherever a
tensor's name and shape match. Culling, thinning and rho keep every shape, so those students only
adapt to the missing ReLUs (far fewer epochs than from scratch, which matters on a CPU); alpha
variants match nothing but the classifier bias, so they in effect start from scratch. DeepReDuce
itself trains from scratch (the default).

Finals: the search trains every candidate briefly (train.candidates); the pick of each budget in
finals.budgets (the most accurate search candidate within it) is then trained again, as
train.finals says (DeepReDuce trains its chosen models longer), and joins the candidates as
``final-<pick>``. Ablations: at the pick of ablations.budget (among the search candidates, so both
sides had the same epochs), the same spec with KD switched, and the same shape (kept-stage count,
thinning, alpha, rho, blocks) keeping the stages the other criticality order would keep. Thinned vs.
culled needs no extra job: every thinned candidate is compared with the culled candidate nearest in
ReLU count (within 2x).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass
from importlib import resources

import yaml

from ..errors import UserError
from ..models import ARCHITECTURES, architecture
from ..spec import THIN_MODES
from ..train import TrainConfig

DEFAULT_CONFIG = "resnet18-cifar.yaml"
ORDERS = ("critical", "per_relu", "reverse")
APPLY_TO = ("culled", "thinned", "all")
INITS = ("scratch", "teacher")


@dataclass(frozen=True)
class Base:
    arch: str
    alpha: float
    rho: float
    blocks: list[int] | None
    widen: int

    def check(self) -> None:
        _require(self.arch in ARCHITECTURES, "base.arch", f"must be one of {', '.join(ARCHITECTURES)}, got {self.arch!r}")
        _require(0 < self.alpha <= 4, "base.alpha", f"must be in (0, 4], got {self.alpha}")
        _require(0 < self.rho <= 1, "base.rho", f"must be in (0, 1], got {self.rho}")
        _require(self.widen >= 1, "base.widen", f"must be >= 1, got {self.widen}")
        if self.blocks is not None:
            _check_blocks(self.blocks, "base.blocks", self.arch, None)

    @property
    def depth(self) -> list[int]:
        return list(self.blocks or architecture(self.arch).default_blocks)


@dataclass(frozen=True)
class Evaluation:
    test_subset: int | None

    def check(self) -> None:
        _require(self.test_subset is None or self.test_subset >= 1, "evaluation.test_subset",
                 f"must be a positive number of images or null, got {self.test_subset}")


@dataclass(frozen=True)
class Training:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    subset: int | None
    seed: int
    compile: bool
    init: str = "scratch"   # scratch | teacher: warm-start from the teacher's weights where shapes match
    # Recipe options, optional in the YAML (default 0 = off). At 0 they are left out of
    # OptimizeConfig.to_dict, the run's identity in run.json, so a run started before they existed
    # still resumes (see OPTIONAL_AT_ZERO).
    label_smoothing: float = 0.0   # of the hard-label loss, in [0, 1) (with KD too)
    ema_decay: float = 0.0         # exponential moving average of the weights, in [0, 1): evaluated and saved

    def check(self, where: str) -> None:
        _require(self.init in INITS, f"{where}.init", f"must be one of {', '.join(INITS)}, got {self.init!r}")
        _require(self.epochs >= 1, f"{where}.epochs", f"must be >= 1, got {self.epochs}")
        _require(self.batch_size >= 1, f"{where}.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.lr > 0, f"{where}.lr", f"must be positive, got {self.lr}")
        _require(self.weight_decay >= 0, f"{where}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(self.subset is None or self.subset >= 1, f"{where}.subset",
                 f"must be a positive number of images or null, got {self.subset}")
        _require(0 <= self.label_smoothing < 1, f"{where}.label_smoothing",
                 f"must be in [0, 1) (0 = off), got {self.label_smoothing}")
        _require(0 <= self.ema_decay < 1, f"{where}.ema_decay",
                 f"must be in [0, 1) (0 = off, e.g. 0.999), got {self.ema_decay}")

    def train_config(self, kd: "KD | None" = None) -> TrainConfig:
        extra = {"kd_temperature": kd.temperature, "kd_alpha": kd.alpha} if kd else {}
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                           weight_decay=self.weight_decay, subset=self.subset, seed=self.seed,
                           compile=self.compile, label_smoothing=self.label_smoothing,
                           ema_decay=self.ema_decay, **extra)


# Training keys added after runs had been recorded: at their default (0, off) they are left out of
# OptimizeConfig.to_dict, so run.json's config of a run started before them equals the current one.
OPTIONAL_AT_ZERO = ("label_smoothing", "ema_decay")


@dataclass(frozen=True)
class TrainSections:
    teacher: Training
    criticality: Training
    candidates: Training
    finals: Training

    def check(self) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).check(f"train.{f.name}")
        _require(self.teacher.init == "scratch", "train.teacher.init",
                 "must be scratch: the teacher cannot start from itself")


@dataclass(frozen=True)
class KD:
    enabled: bool
    temperature: float
    alpha: float

    def check(self) -> None:
        _require(self.temperature > 0, "kd.temperature", f"must be positive, got {self.temperature}")
        _require(0 <= self.alpha <= 1, "kd.alpha", f"must be in [0, 1], got {self.alpha}")


@dataclass(frozen=True)
class Criticality:
    order: str

    def check(self) -> None:
        _require(self.order in ORDERS, "criticality.order", f"must be one of {', '.join(ORDERS)}, got {self.order!r}")


@dataclass(frozen=True)
class Culling:
    stem_relu: bool

    def check(self) -> None:
        pass


@dataclass(frozen=True)
class Thinning:
    enabled: bool
    position: str

    def check(self) -> None:
        positions = [m for m in THIN_MODES if m != "none"]
        _require(self.position in positions, "thinning.position",
                 f"must be one of {', '.join(positions)}, got {self.position!r}")


@dataclass(frozen=True)
class Reshape:
    enabled: bool
    apply_to: str
    alphas: list[float]
    rhos: list[float]
    blocks: list[list[int]]

    def check(self, base: Base) -> None:
        _require(self.apply_to in APPLY_TO, "reshape.apply_to",
                 f"must be one of {', '.join(APPLY_TO)}, got {self.apply_to!r}")
        for key in ("alphas", "rhos"):
            for v in getattr(self, key):
                _require(0 < v <= 1, f"reshape.{key}", f"entries are factors in (0, 1] (they shrink the parent), got {v}")
        for i, variant in enumerate(self.blocks):
            _check_blocks(variant, f"reshape.blocks[{i}]", base.arch, base.depth)
        if self.enabled and not self.grid(base):
            raise UserError("reshape: the grid is empty (alphas, rhos and blocks add nothing beyond the parent): "
                            "add values below 1 / shallower block lists, or set reshape.enabled: false")

    def grid(self, base: Base) -> list[tuple[float, float, tuple[int, ...]]]:
        """(alpha factor, rho factor, blocks) triples, the parent's own shape excluded."""
        depth = tuple(base.depth)
        alphas = sorted({1.0, *self.alphas}, reverse=True)
        rhos = sorted({1.0, *self.rhos}, reverse=True)
        blocks = [depth] + [tuple(b) for b in self.blocks if tuple(b) != depth]
        blocks = list(dict.fromkeys(blocks))
        return [(a, r, b) for a in alphas for r in rhos for b in blocks if (a, r, b) != (1.0, 1.0, depth)]


@dataclass(frozen=True)
class Pruning:
    enabled: bool
    max_relus: int | None

    def check(self) -> None:
        _require(self.max_relus is None or self.max_relus >= 1, "pruning.max_relus",
                 f"must be a positive ReLU count or null, got {self.max_relus}")


@dataclass(frozen=True)
class Finals:
    budgets: list[int]


@dataclass(frozen=True)
class Ablations:
    budget: int | None
    kd: bool
    order: bool


@dataclass(frozen=True)
class OptimizeConfig:
    base: Base
    evaluation: Evaluation
    train: TrainSections
    kd: KD
    criticality: Criticality
    culling: Culling
    thinning: Thinning
    reshape: Reshape
    pruning: Pruning
    budgets: list[int]
    finals: Finals
    ablations: Ablations

    def check(self) -> None:
        for section in (self.base, self.evaluation, self.train, self.kd, self.criticality, self.culling,
                        self.thinning, self.pruning):
            section.check()
        self.reshape.check(self.base)
        _require(not (self.reshape.enabled and self.reshape.apply_to == "thinned" and not self.thinning.enabled),
                 "reshape.apply_to", "is thinned but thinning.enabled is false, so nothing would be reshaped: "
                 "set reshape.apply_to: culled (or all), or reshape.enabled: false")
        _require(all(b >= 1 for b in self.budgets), "budgets", f"must be positive ReLU counts, got {self.budgets}")
        _require(all(b >= 1 for b in self.finals.budgets), "finals.budgets",
                 f"must be positive ReLU counts, got {self.finals.budgets}")
        _require(self.ablations.budget is None or self.ablations.budget >= 1, "ablations.budget",
                 f"must be a positive ReLU count or null, got {self.ablations.budget}")

    def to_dict(self) -> dict:
        """The config as plain data (run.json's identity of a run, frontier.json's meta): the keys of
        OPTIONAL_AT_ZERO appear only when set, so a run recorded before they existed still matches."""
        out = dataclasses.asdict(self)
        for section in out["train"].values():
            for key in OPTIONAL_AT_ZERO:
                if section.get(key) == 0:
                    del section[key]
        return out


# -- loading -------------------------------------------------------------------------------------

def builtin_config_path(name: str = DEFAULT_CONFIG) -> str:
    return str(resources.files("deepreduce").joinpath("configs", name))


def builtin_config_names() -> list[str]:
    folder = resources.files("deepreduce").joinpath("configs")
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_config(path: str | None = None, quick: bool = False) -> OptimizeConfig:
    """The validated config: FILE (or a built-in name) merged over the defaults, then `quick`."""
    raw = _read_yaml(builtin_config_path())
    if path is not None:
        raw = deep_merge(raw, _read_yaml(_resolve(path)))
    return config_from_dict(raw, quick=quick)


def config_from_dict(raw: dict, quick: bool = False) -> OptimizeConfig:
    raw = copy.deepcopy(raw)
    overrides = raw.pop("quick", None) or {}
    _require(isinstance(overrides, dict), "quick", "must be a mapping of overrides")
    _check_keys(raw, OptimizeConfig, "")
    _check_keys(overrides, OptimizeConfig, "quick.")  # typos in the quick section fail even without --quick
    if quick:
        raw = deep_merge(raw, overrides)
    config = _build(OptimizeConfig, raw, "")
    config.check()
    return config


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _resolve(path: str) -> str:
    if os.path.isfile(path):
        return path
    if os.sep not in path and path in builtin_config_names():
        return builtin_config_path(path)
    raise UserError(f"config file {path} does not exist: pass a YAML file or one of the built-in configs "
                    f"({', '.join(builtin_config_names())})")


def _read_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as exc:
        raise UserError(f"cannot read config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"config {path} is not valid YAML: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"config {path} must be a YAML mapping (key: value lines) at the top level")
    return raw


def _check_keys(raw: dict, cls: type, prefix: str) -> None:
    """Unknown keys anywhere in the tree are errors that suggest the closest valid key."""
    hints = typing.get_type_hints(cls)
    for key, value in raw.items():
        if key not in hints:
            close = difflib.get_close_matches(str(key), list(hints), n=1)
            fix = f"did you mean {prefix}{close[0]}?" if close else f"valid keys here: {', '.join(hints)}"
            raise UserError(f"unknown config key {prefix}{key}: {fix}")
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            _check_keys(value, hints[key], f"{prefix}{key}.")


def _build(cls: type, raw, where: str):
    name = where.rstrip(".") or "the config"
    _require(isinstance(raw, dict), name, f"must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    optional = {f.name for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    missing = [k for k in hints if k not in raw and k not in optional]
    _require(not missing, name, f"lacks {', '.join(missing)}: add them (see deepreduce/configs/{DEFAULT_CONFIG})")
    return cls(**{k: _coerce(raw[k], hints[k], f"{where}{k}") for k in hints if k in raw})


def _coerce(value, hint, key: str):
    """Type-check one value against its annotation (int, float, bool, str, X | None, list[X], a section)."""
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key)
    if origin is list:
        _require(isinstance(value, list), key, f"must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        _require(isinstance(value, bool), key, f"must be true or false, got {value!r}")
    elif hint is int:
        _require(isinstance(value, int) and not isinstance(value, bool), key, f"must be an integer, got {value!r}")
    elif hint is float:
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), key,
                 f"must be a number, got {value!r}")
        return float(value)
    elif hint is str:
        _require(isinstance(value, str), key, f"must be a string, got {value!r}")
    return value


def _check_blocks(blocks: list[int], key: str, arch: str, limit: list[int] | None) -> None:
    stages = architecture(arch).stages
    _require(len(blocks) == stages and all(b >= 1 for b in blocks), key,
             f"must list {stages} positive block counts for {arch}, got {blocks}")
    if limit is not None:
        _require(all(b <= m for b, m in zip(blocks, limit)), key,
                 f"{blocks} is deeper than base.blocks {limit}: reshaping only removes blocks")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise UserError(f"config key {key} {message}")

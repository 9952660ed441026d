"""DeepReDuce's search space: criticality networks and the culled / thinned / reshaped candidates.

All functions here are pure: specs in, specs out. Stage numbers are 1-based (S1 = stage 1).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..relus import relu_count, relu_count_by_stage
from ..spec import ModelSpec
from .config import OptimizeConfig

NO_RELU = "crit-none"


@dataclass(frozen=True)
class Candidate:
    name: str
    spec: ModelSpec
    kind: str                   # culled | thinned | reshaped
    stages: tuple[int, ...]     # the stages whose ReLUs are kept, most critical first
    parent: str | None = None   # the culled/thinned candidate a reshaped one shrinks

    @property
    def relu_count(self) -> int:
        return relu_count(self.spec)


def all_stages(spec: ModelSpec) -> list[int]:
    return list(range(1, spec.num_stages + 1))


def keep_only(base: ModelSpec, stages, stem_relu: bool = False) -> ModelSpec:
    """`base` with every stage outside `stages` culled."""
    return base.replace(stem_relu=stem_relu, cull=tuple(s for s in all_stages(base) if s not in stages), thin="none")


# -- step 2: criticality ---------------------------------------------------------------------------

def criticality_specs(base: ModelSpec) -> dict[str, ModelSpec]:
    """The no-ReLU network and, per stage, the network keeping only that stage (stem ReLU dropped)."""
    specs = {NO_RELU: keep_only(base, ())}
    for stage in all_stages(base):
        specs[f"crit-s{stage}"] = keep_only(base, (stage,))
    return specs


def criticality_table(stage_accuracy: dict[int, float], no_relu_accuracy: float,
                      stage_relus: dict[int, int]) -> list[dict]:
    """Rows per stage, most critical first: criticality = accuracy gain over the no-ReLU network.

    Ties in gain go to the stage with the larger gain per 1K ReLUs (cheaper), then the lower stage.
    """
    rows = []
    for stage, acc in stage_accuracy.items():
        gain = acc - no_relu_accuracy
        relus = stage_relus[stage]
        rows.append({"stage": stage, "name": f"S{stage}", "accuracy": acc, "gain": round(gain, 4),
                     "relu_count": relus, "gain_per_1k_relus": round(1000.0 * gain / relus, 6) if relus else 0.0})
    return sorted(rows, key=lambda r: (-r["gain"], -r["gain_per_1k_relus"], r["stage"]))


def stage_relus(base: ModelSpec) -> dict[int, int]:
    """ReLUs each stage holds in the un-thinned network."""
    by_stage = relu_count_by_stage(base.replace(stem_relu=False, cull=(), thin="none"))
    return {s: by_stage[f"S{s}"] for s in all_stages(base)}


def culling_order(table: list[dict], order: str) -> list[int]:
    """Stages in the order culling keeps them: most critical first (`critical`), most gain per 1K
    ReLUs first (`per_relu`: under a ReLU budget a stage's price matters, and S1 holds half of
    ResNet18's ReLUs), or the reverse of `critical` (`reverse`, the ablation)."""
    stages = [row["stage"] for row in table]
    if order == "per_relu":
        by_price = sorted(table, key=lambda r: (-r["gain_per_1k_relus"], -r["gain"], r["stage"]))
        return [row["stage"] for row in by_price]
    return stages if order == "critical" else stages[::-1]


# -- steps 3-5: candidates ------------------------------------------------------------------------

def stage_label(stages) -> str:
    return "keep-" + "".join(f"s{s}" for s in sorted(stages))


def culled_candidates(base: ModelSpec, order: list[int], stem_relu: bool) -> list[Candidate]:
    """Keep the k first stages of `order`, k = 1..stages."""
    out = []
    for k in range(1, len(order) + 1):
        kept = tuple(order[:k])
        out.append(Candidate(stage_label(kept), keep_only(base, kept, stem_relu), "culled", kept))
    return out


def thinned_candidate(parent: Candidate, position: str) -> Candidate:
    """One ReLU per block: `bottom` keeps the ReLU after conv1 (DeepReDuce), `top` the one after the add."""
    suffix = "-thin" if position == "bottom" else f"-thin-{position}"
    return Candidate(parent.name + suffix, parent.spec.replace(thin=position), "thinned", parent.stages)


def reshaped_candidates(parent: Candidate, base: ModelSpec, grid) -> list[Candidate]:
    """Narrower (alpha), downsampled (rho) and shallower (blocks) versions of `parent`."""
    out = []
    for alpha_factor, rho_factor, blocks in grid:
        spec = parent.spec.replace(alpha=round(base.alpha * alpha_factor, 6), rho=round(base.rho * rho_factor, 6),
                                   blocks=tuple(blocks))
        suffix = "".join([f"-a{alpha_factor:g}" if alpha_factor != 1 else "",
                          f"-r{rho_factor:g}" if rho_factor != 1 else "",
                          "-b" + "".join(map(str, blocks)) if tuple(blocks) != base.blocks else ""])
        out.append(Candidate(parent.name + suffix, spec, "reshaped", parent.stages, parent.name))
    return out


def parent_candidates(config: OptimizeConfig, base: ModelSpec, order: list[int]) -> list[Candidate]:
    """Culled candidates, then (if enabled) their thinned variants."""
    culled = culled_candidates(base, order, config.culling.stem_relu)
    thinned = [thinned_candidate(c, config.thinning.position) for c in culled] if config.thinning.enabled else []
    return culled + thinned


def reshape_parents(config: OptimizeConfig, parents: list[Candidate]) -> list[Candidate]:
    if not config.reshape.enabled:
        return []
    want = {"culled": ("culled",), "thinned": ("thinned",), "all": ("culled", "thinned")}[config.reshape.apply_to]
    return [p for p in parents if p.kind in want]


def reshaped_for(config: OptimizeConfig, base: ModelSpec, parents: list[Candidate]) -> list[Candidate]:
    """Every reshaped candidate, fewest ReLUs first (cheap ones train first and can prune the rest)."""
    grid = config.reshape.grid(config.base)
    out = [c for p in reshape_parents(config, parents) for c in reshaped_candidates(p, base, grid)]
    return sorted(out, key=lambda c: (c.relu_count, c.name))


def all_candidates(config: OptimizeConfig, base: ModelSpec, order: list[int]) -> list[Candidate]:
    parents = parent_candidates(config, base, order)
    return parents + reshaped_for(config, base, parents)

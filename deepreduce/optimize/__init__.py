"""The DeepReDuce optimizer (Jha et al., ICML 2021): a Pareto frontier of (ReLU count, accuracy) models.

    teacher -> stage criticality -> culling -> thinning -> reshaping -> KD -> frontier

Modules: `config` (the YAML schema and validation), `candidates` (the search space, pure
functions), `pareto` (non-dominated selection, budget picks, pruning rule), `pipeline` (resumable
jobs under DIR/jobs/), `executor` (where the jobs run: in this process, or side by side on Ray),
`report` (frontier.json/csv/png and text tables), `latency` (secure-runtime
measurements of frontier models). Python API::

    from deepreduce.optimize import load_config, optimize
    doc = optimize("folder:cifar10-jpeg.tar.gz", "runs/opt", load_config(quick=True))
    doc = optimize(..., executor=ExecutorSettings("ray", workers=4))   # jobs side by side on Ray (docs/RAY.md)
"""

from __future__ import annotations

from .config import OptimizeConfig, load_config
from .executor import ExecutorSettings
from .pareto import budget_picks, pareto_front


def optimize(data_arg: str, out_dir: str, config: OptimizeConfig, *, resume: bool = False,
             teacher: str | None = None, quick: bool = False, progress: bool = True, out=None,
             executor: ExecutorSettings | None = None) -> dict:
    """Run (or --resume) the whole pipeline; returns the frontier document also written to DIR.
    `executor`: where the jobs run (default: one after another in this process)."""
    from ..data import load_dataset
    from .pipeline import Optimizer
    data = load_dataset(data_arg, progress=progress)
    return Optimizer(out_dir, data, data_arg, config, resume=resume, teacher=teacher, quick=quick,
                     progress=progress, out=out, executor=executor).run()


__all__ = ["ExecutorSettings", "OptimizeConfig", "budget_picks", "load_config", "optimize", "pareto_front"]

"""Export to a secure plan: a trained checkpoint (its architecture's op graph, `deepreduce.models`,
batch-norm folded, removed ReLUs gone, checked against the spec's analytic ReLU count), or any PyTorch
module (`export_module`: traced by `deepreduce.trace`, checked against the module's own output)."""

from __future__ import annotations

from deepreduce.checkpoint import Checkpoint, load_checkpoint
from deepreduce.models import export_graph
from deepreduce.relus import relu_count as spec_relu_count
from secure.core.plan import SecurePlan, is_plan_file


def load_plan_or_checkpoint(path: str) -> SecurePlan:
    """A plan file as is, or a checkpoint exported on the fly."""
    return SecurePlan.load(path) if is_plan_file(path) else export_plan(path)


def export_plan(checkpoint_path: str) -> SecurePlan:
    return plan_from_checkpoint(load_checkpoint(checkpoint_path))


def plan_from_checkpoint(ckpt: Checkpoint) -> SecurePlan:
    spec = ckpt.spec
    ops, tensors = export_graph(ckpt.build(), spec)
    total = sum(op.relu_count for op in ops if op.kind == "relu")
    expected = spec_relu_count(spec)
    if total != expected:  # the graph and the analytic count are computed independently
        raise RuntimeError(f"exported plan has {total} ReLUs but the spec counts {expected}")
    return SecurePlan(ops=ops, tensors=tensors, input_shape=tuple(ops[0].shape), classes=list(ckpt.classes),
                      mean=list(ckpt.mean), std=list(ckpt.std), spec=spec.to_dict(), relu_count=total)


# -- any PyTorch module (deepreduce.trace) ----------------------------------------------------------

def export_module(model, example_input, out: str | None, *, class_names=None, mean=None, std=None,
                  calibration=None, name: str | None = None) -> SecurePlan:
    """Trace `model` (any CNN of the operators `deepreduce.trace` supports) into a plan and write it to
    `out` (None: only return it). `example_input`: a normalised N x C x H x W batch (its first image is
    used for the checks) or the per-image shape (C, H, W). `mean`/`std`: the per-channel normalisation
    on [0, 1] pixels (default 0 and 1: the model takes raw pixels in [0, 1]). `calibration`: normalised
    images whose activations must stay inside the engines' exact range (`value_range`); the plan
    records the largest magnitude seen. Nothing is written on any error."""
    import torch

    from deepreduce.errors import UserError
    from deepreduce.trace import trace

    ops, tensors = trace(model, example_input)
    channels = ops[0].shape[0]
    out_shape = ops[-1].shape
    if len(out_shape) != 1:
        raise UserError(f"{type(model).__name__} returns per-image shape {tuple(out_shape)}: a plan's output is "
                        "N x classes (flatten the logits)")
    classes = [f"class{i}" for i in range(out_shape[0])] if class_names is None else [str(c) for c in class_names]
    if len(classes) != out_shape[0]:
        raise UserError(f"{len(classes)} class names for {out_shape[0]} outputs of {type(model).__name__}")
    mean = [0.0] * channels if mean is None else [float(m) for m in mean]
    std = [1.0] * channels if std is None else [float(s) for s in std]
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise UserError(f"--mean and --std need {channels} values (one per input channel), std above 0")
    spec = {"arch": "module", "name": name or type(model).__name__,
            "comparison_count": sum(op.comparison_count for op in ops if op.kind == "maxpool")}
    relus = sum(op.relu_count for op in ops if op.kind == "relu")
    plan = SecurePlan(ops=ops, tensors=tensors, input_shape=tuple(ops[0].shape), classes=classes,
                      mean=mean, std=std, spec=spec, relu_count=relus)

    # The plan must compute what the module computes (float64 plan vs the module as it is).
    x = example_input if isinstance(example_input, torch.Tensor) else \
        torch.randn(2, *ops[0].shape, generator=torch.Generator().manual_seed(0))
    check_agrees(plan, model, x[:4])
    if calibration is not None:
        spec["value_range"] = check_value_range(plan, calibration)
        plan = SecurePlan(ops=ops, tensors=tensors, input_shape=plan.input_shape, classes=classes, mean=mean,
                          std=std, spec=spec, relu_count=relus)
    if out is not None:
        plan.save(out)
    return plan


def check_agrees(plan: SecurePlan, model, x, tolerance: float = 1e-4) -> None:
    """A UserError unless the plan's plaintext logits equal the module's on `x` (relative to their size)."""
    import torch

    from deepreduce.errors import UserError
    from secure.core.plaintext import run_plaintext
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        param = next(iter(model.parameters()), None)
        with torch.no_grad():
            expected = model(x.to(param.device if param is not None else "cpu",
                                  param.dtype if param is not None else torch.float32)).double().cpu()
    finally:
        for m, flag in training.items():
            m.training = flag
    got = run_plaintext(plan, x.detach().double().cpu())
    diff = (got - expected).abs().max().item()
    if not diff <= tolerance * max(1.0, expected.abs().max().item()):
        raise UserError(f"the traced plan does not reproduce {type(model).__name__} (largest logit difference "
                        f"{diff:.3g}): an operator behaves differently from its traced form")


def value_window() -> float:
    """The largest magnitude the fast engine's sign test is exact for (default ReLU parameters):
    |x| < 2^(drop_bits + relu_bits - ACT_BITS)."""
    from secure.core.correlations import ReluParams
    from secure.core.ring import ACT_BITS
    relu = ReluParams()
    return 2.0 ** (relu.drop_bits + relu.relu_bits - ACT_BITS)


def check_value_range(plan: SecurePlan, images, batch_size: int = 64) -> float:
    """The largest |activation| of any op on the normalised calibration `images` (N x C x H x W); a
    UserError naming the op when a compared value leaves the window: ReLU inputs must stay below it,
    max-pooling inputs below half of it (their differences are compared)."""
    from deepreduce.errors import UserError
    from secure.core.plaintext import run_plaintext
    window = value_window()
    largest = {op.id: 0.0 for op in plan.ops}

    def observe(op, y):
        largest[op.id] = max(largest[op.id], float(y.abs().max().item()) if y.numel() else 0.0)

    for start in range(0, len(images), batch_size):
        run_plaintext(plan, images[start:start + batch_size], observe=observe)
    largest[0] = max([float(images.abs().max().item())] if len(images) else [0.0])
    for op in plan.ops:
        limit = window / 2 if op.kind == "maxpool" else window if op.kind == "relu" else None
        if limit is not None and largest[op.inputs[0]] >= limit:
            raise UserError(f"activations reach {largest[op.inputs[0]]:.4g} before {op.kind} {op.name} on the "
                            f"calibration images, beyond the secure engines' exact range ({limit:g}): "
                            "scale the network down (smaller weights, batch-norm) before exporting")
    return max(largest.values())

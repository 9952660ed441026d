"""Export a trained checkpoint to a secure plan: its architecture's op graph (`deepreduce.models`),
batch-norm folded, removed ReLUs gone, checked against the spec's analytic ReLU count."""

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

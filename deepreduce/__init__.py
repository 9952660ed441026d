"""DeepReDuce: ReLU-reduced CNNs for private inference.

The CLI (`deepreduce ...`) is a thin layer over this API::

    from deepreduce import ModelSpec, relu_count, load_dataset, train, TrainConfig
    spec = ModelSpec(alpha=0.5, cull=(1, 4), thin="bottom", stem_relu=False)
    relu_count(spec)                                    # 49152
    relu_count(my_module, (3, 32, 32))                  # any traceable CNN (deepreduce.trace)
    data = load_dataset("folder:cifar10-jpeg.tar.gz")
    result = train(spec, data, "runs/demo", TrainConfig(epochs=15), teacher="runs/teacher/final.pt")

Names are imported lazily, so `deepreduce.errors` or `deepreduce.spec` load without torch.
"""

import importlib

_EXPORTS = {
    "Checkpoint": "checkpoint", "load_checkpoint": "checkpoint",
    "Dataset": "data", "Split": "data", "load_dataset": "data", "load_image_files": "data",
    "UserError": "errors",
    "kd_loss": "kd",
    "build_model": "models",
    "MaskedReLU": "masks",
    "measured_relu_count": "relus", "relu_count_by_stage": "relus", "relu_sites": "relus",
    "ModelSpec": "spec",
    # relu_count(spec) is the analytic count of deepreduce.relus; relu_count(module, example_input) traces
    "relu_count": "trace", "comparison_count": "trace", "count_module": "trace",
    "TrainConfig": "train", "TrainResult": "train", "evaluate_model": "train", "train": "train",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

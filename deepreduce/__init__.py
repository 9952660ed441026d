"""DeepReDuce: ReLU-reduced CNNs for private inference.

The CLI (`deepreduce ...`) is a thin layer over this API::

    from deepreduce import ModelSpec, relu_count, load_dataset, train, TrainConfig
    spec = ModelSpec(alpha=0.5, cull=(1, 4), thin="bottom", stem_relu=False)
    relu_count(spec)                                    # 49152
    data = load_dataset("folder:cifar10-jpeg.tar.gz")
    result = train(spec, data, "runs/demo", TrainConfig(epochs=15), teacher="runs/teacher/final.pt")
"""

from .checkpoint import Checkpoint, load_checkpoint
from .data import Dataset, Split, load_dataset, load_image_files
from .errors import UserError
from .kd import kd_loss
from .models import build_model
from .relus import measured_relu_count, relu_count, relu_count_by_stage, relu_sites
from .spec import ModelSpec
from .train import TrainConfig, TrainResult, evaluate_model, train

__all__ = [
    "Checkpoint", "Dataset", "ModelSpec", "Split", "TrainConfig", "TrainResult", "UserError",
    "build_model", "evaluate_model", "kd_loss", "load_checkpoint", "load_dataset", "load_image_files",
    "measured_relu_count", "relu_count", "relu_count_by_stage", "relu_sites", "train",
]

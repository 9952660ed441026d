"""ReLU-aware knowledge distillation (Hinton et al.): the teacher is the all-ReLU network."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float, alpha: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y).

    The T^2 factor keeps the soft-target gradients on the same scale as the hard-label ones.
    `label_smoothing` applies to the hard-label term only (the targets (1 - e) * onehot(y) + e / K,
    as in `F.cross_entropy`); the teacher's soft targets are already smooth.
    """
    soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.log_softmax(teacher_logits / temperature, dim=1),
                    reduction="batchmean", log_target=True)
    hard = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    return alpha * temperature**2 * soft + (1 - alpha) * hard

"""Fine-grained ReLU masks: a ReLU kept or linearised per channel or per pixel.

`MaskedReLU(mask)` is the module for users' own networks (SNL, SENet or AutoReP-style results)::

    from deepreduce import MaskedReLU
    act = MaskedReLU(torch.tensor([1, 0, 1, 1]))      # per channel: (C,)
    act = MaskedReLU(keep)                            # per pixel: (C, H, W), 1 = keep, 0 = identity

Only kept positions cost ReLUs in a secure run; `deepreduce.trace` recognises this module, and also the
form SNL-style code writes, ``relu(x) * m + x * (1 - m)`` with a constant 0/1 ``m``.
"""

from __future__ import annotations

import torch
from torch import nn


class MaskedReLU(nn.Module):
    """ReLU where ``mask`` is 1, identity where it is 0. ``mask``: (C,) per channel or (C, H, W) per
    pixel of an N x C x H x W input, or (F,) for an N x F input. The mask is a buffer (in the state dict)."""

    mask: torch.Tensor

    def __init__(self, mask):
        super().__init__()
        mask = torch.as_tensor(mask).detach().to(torch.float32)
        if mask.dim() not in (1, 3):
            raise ValueError(f"a ReLU mask has shape (C,) or (C, H, W), not {tuple(mask.shape)}")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("a ReLU mask holds only 0 (identity) and 1 (keep the ReLU)")
        self.register_buffer("mask", mask.clone())

    def broadcast_mask(self, x: torch.Tensor) -> torch.Tensor:
        """The mask shaped to broadcast against `x` (N x C x H x W or N x F)."""
        m = self.mask
        if m.dim() == 1 and x.dim() == 4:
            m = m.view(-1, 1, 1)
        if m.dim() != x.dim() - 1 or any(a not in (1, b) for a, b in zip(m.shape, x.shape[1:])):
            raise ValueError(f"MaskedReLU mask of shape {tuple(self.mask.shape)} does not fit an input of "
                             f"shape {tuple(x.shape)}")
        return m.unsqueeze(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(self.broadcast_mask(x).bool(), torch.relu(x), x)

    def kept(self, shape) -> int:
        """ReLUs kept per image for an input of per-image `shape` (C, H, W) or (F,)."""
        x = torch.zeros(1, *shape)
        return int(self.broadcast_mask(x).expand_as(x).sum().item())

    def extra_repr(self) -> str:
        return f"mask={tuple(self.mask.shape)}, kept={int(self.mask.sum().item())}/{self.mask.numel()}"

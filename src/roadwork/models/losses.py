"""Training losses beyond cross-entropy (torch; imported only where a network is trained)."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["gatekeeper_loss"]


def gatekeeper_loss(logits: Any, labels: Any, alpha: float) -> Any:
    """Gatekeeper (Rabanser et al., 2025, arXiv 2502.19335), for the small model of a cascade:
    ``α · CE`` on the rows it classifies correctly plus ``(1 − α) · KL(p ‖ uniform)`` on the rows it gets wrong,
    each averaged over the batch. Right answers get sharper, wrong ones flatter, so a confidence gate separates
    them better (what the cascade's deferral relies on). Which rows are correct is decided without gradient."""
    import torch

    log_p = torch.log_softmax(logits, dim=1)
    correct = (logits.argmax(dim=1) == labels).float()
    ce = -log_p.gather(1, labels[:, None]).squeeze(1)
    kl_uniform = (log_p.exp() * log_p).sum(dim=1) + math.log(logits.shape[1])  # KL(p ‖ U) = Σ p log p + log K
    return (alpha * correct * ce + (1 - alpha) * (1 - correct) * kl_uniform).mean()

"""Training losses beyond cross-entropy (torch; imported only where a network is trained)."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["deferral_loss", "gatekeeper_loss"]


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


def deferral_loss(outputs: Any, labels: Any, p_large: Any, cost: float, aux_weight: float = 1.0) -> Any:
    """A small model and its deferral gate trained together on the cascade's objective (the LCRON idea,
    Wang et al., ICML 2025, carried from ranking funnels to classification).

    ``outputs`` (B, K+1): K class logits and one gate logit, g = sigmoid(gate) = P(answer here). ``p_large``
    (B,): the large model's probability of the true class (fixed; it is not trained). The system answers with
    the small model with probability g and defers otherwise, so the probability that the system is right is
    ``g · p_small(y|x) + (1 − g) · p_large(y|x)``; the loss is its negative log plus ``cost · (1 − g)`` (the
    price of deferring), plus ``aux_weight`` × the small model's own cross-entropy — LCRON's per-stage auxiliary
    loss, which keeps the small classifier learning on the images it defers."""
    import torch

    k = outputs.shape[1] - 1
    log_ps = torch.log_softmax(outputs[:, :k], dim=1)
    log_ps_y = log_ps.gather(1, labels[:, None]).squeeze(1)
    log_g = torch.nn.functional.logsigmoid(outputs[:, k])
    log_1mg = torch.nn.functional.logsigmoid(-outputs[:, k])
    log_pl = torch.log(p_large.clamp_min(1e-12))
    system = -torch.logaddexp(log_g + log_ps_y, log_1mg + log_pl)  # −log[g·p_s + (1−g)·p_L], stably
    return (system + cost * log_1mg.exp() - aux_weight * log_ps_y).mean()

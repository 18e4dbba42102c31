"""Deep mutual learning (Zhang, Xiang, Hospedales & Lu, CVPR 2018): two networks trained
together, each also pulled toward the other's class posterior."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mutual_kl(logits_a: torch.Tensor, logits_b: torch.Tensor, *,
              temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The two mimicry terms of deep mutual learning over the same classes.

    With ``p = softmax(logits_a / T)`` and ``q = softmax(logits_b / T)`` (``float [B, C]``
    each), returns ``(T^2 * KL(q || p), T^2 * KL(p || q))``, each averaged over the batch:
    the first trains network A toward B's posterior (``q`` is detached), the second B toward
    A's (``p`` detached). ``T^2`` keeps the gradients' scale independent of ``T`` (Hinton,
    Vinyals & Dean 2015).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits_a.shape != logits_b.shape or logits_a.dim() != 2:
        raise ValueError(f"need two [B, C] logit tensors of one shape, got "
                         f"{tuple(logits_a.shape)} and {tuple(logits_b.shape)}")
    t = float(temperature)
    log_p = F.log_softmax(logits_a.float() / t, dim=1)
    log_q = F.log_softmax(logits_b.float() / t, dim=1)
    a = F.kl_div(log_p, log_q.detach(), log_target=True, reduction="batchmean")
    b = F.kl_div(log_q, log_p.detach(), log_target=True, reduction="batchmean")
    return a * t * t, b * t * t

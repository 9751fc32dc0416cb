"""The training objectives, each returned as SUMS so that micro-batches and ranks add up exactly:
the trainer divides by the global count once (mean aggregation) or not at all (sum aggregation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_nll(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of -log p(ids[t+1] | ids[..t]) over counted targets, number of counted targets).

    ids (B, L); mask (B, L) marks the tokens that count as TARGETS (all of them when None).
    """
    logits = model(ids[:, :-1])  # (B, L-1, V)
    targets = ids[:, 1:]
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                          reduction="none").view_as(targets)  # (B, L-1)
    if mask is None:
        return nll.sum(), torch.tensor(float(targets.numel()))
    m = mask[:, 1:].to(nll.dtype)
    return (nll * m).sum(), m.sum()


def sequence_logp(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p over the masked target tokens of each row: (B,)."""
    logits = model(ids[:, :-1]).float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, L-1)
    return (logp * mask[:, 1:].to(logp.dtype)).sum(-1)


def dpo_loss(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair DPO loss -log sigmoid(beta * ((pc - rc) - (pr - rr))): policy (p) and reference (r)
    log-probabilities of the chosen (c) and rejected (r) replies, each (B,)."""
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))

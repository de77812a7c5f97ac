"""Preference tuning's math (issue 40): DPO and IPO on pairs of answers to one prompt.

A pair is two rows that share a prompt: the chosen answer and the rejected one. A micro-batch of
n pairs holds 2n rows, the n chosen first, then the n rejected in the same order (one forward
for both, as TRL does). Each row's labels are its answer tokens (the prompt masked with -100, as
instruction tuning masks it), aligned with the inputs as distft's labels are (`token_loss`): the
row's log-probability of its answer is the sum over its answer tokens of log p(token | before).

With the policy's log-probs (pi) and the reference model's (ref; fixed, the model before
training), a pair's implicit rewards are beta * (pi - ref) for each answer, and its loss:
- `sigmoid` (DPO, Rafailov et al. 2023): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)));
- `ipo` (Azar et al. 2023): ((avg_c - avg_r) - 1 / (2 beta))^2, where avg is (pi - ref) per answer
  token, as TRL computes it (the IPO authors' length normalisation).

The metrics carry the names users know from TRL's DPOTrainer: rewards/chosen, rewards/rejected,
rewards/margins, rewards/accuracies (the share of pairs whose chosen reward is the larger),
logps/chosen, logps/rejected. tests/unit/test_preference.py checks loss, rewards and gradients
against TRL's DPOTrainer on the same model and batch.

The trainer gets the per-token log-probs from the chunked head (distft.model.loss
`computing_token_logps`: no [rows, tokens, vocabulary] logits, the head's matmul done again in
the backward, since a pair's gradient weight, its sigmoid, is known only after both answers are
scored); `answer_logps` is the plain path from the logits, which the chunked one equals.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distft.config import OBJECTIVE_LOSSES as LOSSES
from distft.data.samples import IGNORE_INDEX
from distft.model.build import token_logps


def answer_sums(token_logps: torch.Tensor, labels: torch.Tensor,
                sequences: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(each answer's summed log-probability, its answer token count) from the targets'
    per-token log-probs [rows, T - 1] (`distft.model.build.token_logps`, or the chunked head's).
    Unpacked, an answer is a row. Packed (`sequences` [rows, T]: each position's answer index,
    -1 for padding; a packed row holds several answers), the sums go by answer index."""
    mask = labels[:, 1:] != IGNORE_INDEX
    if sequences is None:
        return token_logps.sum(dim=1), mask.sum(dim=1)
    index = sequences[:, 1:].to(token_logps.device)
    count = int(index.max()) + 1 if index.numel() else 0
    keep = mask & (index >= 0)
    sums = torch.zeros(count, dtype=token_logps.dtype, device=token_logps.device).index_add(
        0, index[keep], token_logps[keep])
    tokens = torch.zeros(count, dtype=torch.long, device=mask.device).index_add(
        0, index[keep], torch.ones_like(index[keep]))
    return sums, tokens


def answer_logps(logits: torch.Tensor, labels: torch.Tensor,
                 sequences: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-answer summed log-probability of the answer tokens, per-answer token count) from
    the logits (the plain path). `labels` aligned with the inputs (the shift happens here); prompt
    tuning's virtual tokens in front of the logits are dropped, as in `token_loss`."""
    return answer_sums(token_logps(logits, labels), labels, sequences)


def pair_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                ref_rejected: torch.Tensor, beta: float, loss: str = "sigmoid",
                chosen_tokens: torch.Tensor | None = None,
                rejected_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair loss, chosen rewards, rejected rewards) of n pairs' log-probs (module docstring).
    `ipo` needs each answer's token count."""
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    if loss == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    elif loss == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("objective.loss=ipo needs the answers' token counts")
        delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"objective.loss={loss!r}: one of {', '.join(LOSSES)}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A micro-batch's per-row values as (chosen, rejected): its first half and its second."""
    half = values.size(0) // 2
    return values[:half], values[half:]


def pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, policy_chosen: torch.Tensor,
                 policy_rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-pair sums under TRL's names (divide by the number of pairs for the means TRL logs):
    summed, so that micro-batches, accumulation steps and ranks add up before one division."""
    return {
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
        "logps/chosen": policy_chosen.detach().sum(),
        "logps/rejected": policy_rejected.detach().sum(),
    }

"""The optional memory-aware critic of MRL: a value model that reads the query *and* the STM.

GRPO's group baseline estimates the value of a state by the mean reward of its G rollouts. The critic instead
learns ``V(query, STM)``, the expected reward of answering ``query`` from memory state ``STM``: it is a copy of
the policy's token embedding and decoder (whose memory cross-attention reads the STM, hence memory-aware) with a
scalar value head on the mean of the query's hidden states. It has its own optimizer and is fitted by mean
squared error to the rewards of every generation round; the policy's advantage is then ``reward - V`` (IMPO has
no GAE: each answer is scored once, so the one-step advantage is all there is).

Use it through ``MRLConfig(advantage_estimator="critic", critic_learning_rate=...)``; the trainer saves it in
every checkpoint (``critic.pt``) and restores it on resume.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from trl.trainer.utils import nanstd

from .trainer_base import is_peft_model

__all__ = ["MemoryAwareCritic", "critic_advantages", "explained_variance"]


class MemoryAwareCritic(nn.Module):
    """``V(query, STM)``: the policy's embedding + decoder (copied, trained separately) and a value head.

    Args:
        policy: an ``RxTForCausalLM`` (or its PEFT wrapper); its embedding and decoder are deep-copied, so the
            critic starts from the policy's language and memory reading and never shares weights with it.
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        base = policy.get_base_model() if is_peft_model(policy) else policy
        backbone = base.model
        self.embed_tokens = copy.deepcopy(backbone.embed_tokens)
        self.decoder = copy.deepcopy(backbone.decoder)
        hidden = self.embed_tokens.embedding_dim
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.weight)  # starts at V = 0 everywhere; the bias learns the mean reward first
        nn.init.zeros_(self.value_head.bias)
        for param in self.parameters():
            param.requires_grad_(True)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, stm: torch.Tensor) -> torch.Tensor:
        """``input_ids`` / ``attention_mask`` ``[B, T]`` (left- or right-padded queries), ``stm`` ``[B, L, S, D]``
        -> values ``[B]``."""
        embeds = self.embed_tokens(input_ids)  # [B, T, D]
        hidden = self.decoder(embeds, stm, attention_mask=attention_mask)[0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # [B, D]
        return self.value_head(pooled).squeeze(-1).float()  # [B]


def critic_advantages(rewards: torch.Tensor, values: torch.Tensor, scale_rewards: str = "batch") -> torch.Tensor:
    """One-step advantages ``reward - V`` (no GAE), ``[M]`` from ``rewards`` / ``values`` ``[M]``.

    ``scale_rewards``: "batch" or "group" divide by the std of the batch's rewards (+1e-4), "none" does not
    divide. A per-group std is not used: a group whose G rewards are equal has std 0 while ``reward - V`` need
    not be 0. NaN rewards get advantage 0.
    """
    if rewards.shape != values.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and values {tuple(values.shape)} must have one shape.")
    if scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards={scale_rewards!r}: choose 'group', 'batch' or 'none'.")
    advantages = rewards - values.to(rewards.dtype)
    if scale_rewards != "none":
        std = nanstd(rewards) if rewards.numel() > 1 else rewards.new_zeros(())
        advantages = advantages / (torch.nan_to_num(std, nan=0.0) + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def explained_variance(values: torch.Tensor, rewards: torch.Tensor) -> float:
    """``1 - Var(r - V) / Var(r)`` over the finite rewards (1: perfect critic, 0: no better than a constant)."""
    keep = torch.isfinite(rewards)
    r, v = rewards[keep].double(), values[keep].double()
    if r.numel() < 2 or float(r.var()) == 0.0:
        return float("nan")
    return float(1.0 - (r - v).var() / r.var())

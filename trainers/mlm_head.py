"""The training-only MLM head of RxT stages 1-2, and BERT-style token masking.

The encoder of an RxT is trained like a BERT encoder in stages 1-2 (masked-language modelling), but the
head is not part of the released model: after training the encoder only feeds the memory attention. So the
head lives here, in `trainers/`, is optimised and checkpointed by the trainer as an extra module, and can be
saved next to a model as `mlm_head.safetensors` for a later stage that wants to keep training it.

Unlike BERT's head (dense -> GELU -> LayerNorm -> decoder tied to the embedding), this one uses the model's
activation (SiLU by default) and RMSNorm, and an untied output projection.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MLM_HEAD_FILE = "mlm_head.safetensors"


class RxTMLMHead(nn.Module):
    """dense [D -> D] -> activation (`config.hidden_act`: silu / gelu) -> RMSNorm -> linear [D -> vocab]."""

    def __init__(self, config):
        super().__init__()
        from rxt_hf.modeling_rxt.modeling_rxt import RxTRMSNorm

        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        act = getattr(config, "hidden_act", "silu")
        if act not in ("silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"RxTMLMHead: config.hidden_act={act!r} is not supported; use 'silu' or 'gelu'.")
        self.act = nn.SiLU() if act in ("silu", "swish") else nn.GELU(approximate="tanh" if act != "gelu" else "none")
        self.norm = RxTRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        std = getattr(config, "initializer_range", 0.02)
        for linear in (self.dense, self.decoder):
            nn.init.normal_(linear.weight, mean=0.0, std=std)
            nn.init.zeros_(linear.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, T, V]
        return self.decoder(self.norm(self.act(self.dense(hidden_states))))

    def save(self, directory: str) -> str:
        """Write `directory/mlm_head.safetensors`."""
        from safetensors.torch import save_file

        path = Path(directory) / MLM_HEAD_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(path))
        return str(path)

    @classmethod
    def from_directory(cls, directory: str, config) -> "RxTMLMHead":
        """A head for `config` with the weights of `directory/mlm_head.safetensors`."""
        from safetensors.torch import load_file

        path = Path(directory) / MLM_HEAD_FILE
        if not path.is_file():
            raise ValueError(f"No {MLM_HEAD_FILE} in {directory!r}; train stage 1 with save_mlm_head=True first.")
        head = cls(config)
        try:
            head.load_state_dict(load_file(str(path)))
        except RuntimeError as error:
            raise ValueError(f"{path} does not match this config (hidden/vocab size): {error}") from error
        return head


def mask_tokens(
    input_ids: torch.Tensor,  # [B, T]
    attention_mask: torch.Tensor | None,  # [B, T]
    mask_token_id: int,
    vocab_size: int,
    special_ids: Iterable[int],
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style masking: each maskable token is selected with `probability`; a selected token becomes
    `[MASK]` 80% of the time, a random non-special token 10%, and stays unchanged 10%. Special tokens and
    padding are never selected. Returns `(masked_ids [B, T], mlm_labels [B, T])` with `-100` on unselected
    positions."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"mask_tokens(probability={probability!r}): use a number in [0, 1], e.g. 0.15.")
    device = input_ids.device
    rand_device = generator.device if generator is not None else device

    def uniform(shape):
        return torch.rand(shape, generator=generator, device=rand_device).to(device)

    special = torch.tensor(sorted({int(i) for i in special_ids if i is not None}), dtype=torch.long, device=device)
    maskable = ~torch.isin(input_ids, special) if special.numel() else torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask is not None:
        maskable &= attention_mask.bool()
    selected = (uniform(input_ids.shape) < probability) & maskable
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))

    action = uniform(input_ids.shape)
    to_mask = selected & (action < 0.8)
    to_random = selected & (action >= 0.8) & (action < 0.9)
    masked = input_ids.clone()
    masked[to_mask] = mask_token_id
    # random replacements drawn from the non-special vocabulary
    allowed = torch.ones(vocab_size, dtype=torch.bool, device=device)
    if special.numel():
        allowed[special[special < vocab_size]] = False
    candidates = allowed.nonzero().squeeze(-1)
    picks = (uniform(input_ids.shape) * candidates.numel()).long().clamp(max=candidates.numel() - 1)
    masked = torch.where(to_random, candidates[picks], masked)
    return masked, labels


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on masked positions; 0 (with a graph) when nothing is masked."""
    selected = labels != -100
    if not bool(selected.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[selected].float(), labels[selected])


__all__ = ["RxTMLMHead", "mask_tokens", "mlm_loss", "MLM_HEAD_FILE"]

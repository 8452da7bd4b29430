"""The label-only loss of training: cross-entropy at the label positions only, the logits computed a
chunk of rows at a time (never the whole (tokens, vocab) block), the gradient in the same pass."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from llama.model import Transformer
from moa.method.routers import collect_aux_loss
from moa.train.data import IGNORE_INDEX

LOGITS_CHUNK_ELEMENTS = 1 << 26  # fp32 logits per chunk (256 MiB): rows = this // vocab_size


class _LabelCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropies of rows `hidden @ weight.T` against `targets`, chunk by chunk, with the
    gradient w.r.t. `hidden` computed in the same pass (the frozen `weight` gets none), so that no
    chunk's logits outlive it: peak extra memory is one (chunk, vocab) fp32 block."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        need_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(hidden) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            logp = torch.log_softmax((h.to(weight.dtype) @ weight.t()).float(), dim=-1)  # (n, vocab)
            total -= logp.gather(1, t[:, None]).sum()
            if need_grad:
                probs = logp.exp_()  # softmax, in place of the log-probabilities
                probs[torch.arange(t.numel(), device=t.device), t] -= 1.0
                grad[start:start + chunk] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None


def label_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        chunk_rows: Optional[int] = None) -> torch.Tensor:
    """Summed cross-entropy (fp32 scalar) of hidden (N, dim) projected by the frozen weight (V, dim)
    against targets (N,) int64; never materialises more than `chunk_rows` rows of logits."""
    if weight.requires_grad:
        raise ValueError("label_cross_entropy: the output projection must be frozen")
    chunk = chunk_rows or max(1, LOGITS_CHUNK_ELEMENTS // weight.shape[0])
    return _LabelCrossEntropy.apply(hidden, weight, targets, chunk)


class CausalLMLoss(nn.Module):
    """The training forward: `model` plus the label-only loss; the module DDP wraps."""

    def __init__(self, model: Transformer, chunk_rows: Optional[int] = None):
        super().__init__()
        self.model = model
        self.chunk_rows = chunk_rows

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor,
                token_mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens, labels (B, T) int64 (labels -100 where untrained, unshifted), token_mask (B, T) bool
        or None -> (summed label cross-entropy, auxiliary loss), fp32 scalars."""
        hidden = self.model.hidden_states(tokens, token_mask=token_mask)  # (B, T, dim)
        targets = labels[:, 1:]  # position t predicts token t + 1
        selected = targets != IGNORE_INDEX
        loss_sum = label_cross_entropy(hidden[:, :-1][selected], self.model.output.weight, targets[selected],
                                       self.chunk_rows)
        return loss_sum, collect_aux_loss(self.model)


def count_labels(batch: dict[str, torch.Tensor]) -> int:
    """The label tokens of a collated batch (the positions `CausalLMLoss` scores)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

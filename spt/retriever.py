"""The dense retriever that scores every soft prompt against an example's context.

    s_k(x) = softplus_beta( cos( W mean(P_k) + b , W mean_mask(E(x)) + b ) )

``mean_mask`` averages the embeddings of the non-padding tokens of the *inference input* (persona +
context, no response), in training and at test time alike. ``W, b`` is one trainable d x d layer,
initialised to the identity so the first scores are cosine similarities of raw embeddings.
An optional small transformer encoder contextualises the tokens before pooling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over dim 1 of (B, T, d) ``x`` where ``mask`` (B, T) is 1: padding never counts."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


class Retriever(nn.Module):
    def __init__(self, d: int, kind: str = "linear", beta: float = 10.0, threshold: float = 1.0,
                 layers: int = 1, heads: int | None = None):
        super().__init__()
        self.normalizer = nn.Linear(d, d)
        with torch.no_grad():
            self.normalizer.weight.copy_(torch.eye(d))
            self.normalizer.bias.zero_()
        self.encoder: nn.Module | None = None
        if kind == "transformer":
            heads = heads or next(h for h in (8, 4, 2, 1) if d % h == 0)
            layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=2 * d, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        elif kind != "linear":
            raise ValueError(f"unknown retriever kind {kind!r}")
        self.beta, self.threshold = beta, threshold

    def forward(self, prompts: torch.Tensor, token_embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """prompts (K, n, d), token_embeds (B, T, d), mask (B, T) -> scores S (K, B), all in fp32."""
        prompts, token_embeds = prompts.float(), token_embeds.float()
        if self.encoder is not None:
            token_embeds = self.encoder(token_embeds, src_key_padding_mask=~mask.bool())
        p = self.normalizer(prompts.mean(1))  # (K, d)
        x = self.normalizer(masked_mean(token_embeds, mask))  # (B, d)
        cos = F.cosine_similarity(p.unsqueeze(1), x.unsqueeze(0), dim=-1)  # (K, B)
        return F.softplus(cos, beta=self.beta, threshold=self.threshold)

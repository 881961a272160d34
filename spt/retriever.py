"""The dense retriever that scores every soft prompt against an example's context.

    s_k(x) = softplus_beta( cos( W key_k + b , W (mean_mask(E(x)) - c) + b ) )

``mean_mask`` averages the embeddings of the non-padding tokens of the *inference input* (persona +
context, no response), in training and at test time alike. ``W, b`` is one trainable d x d layer,
initialised to the identity so the first scores are cosine similarities of raw embeddings.

- ``key_k`` is the mean of prompt k's n tokens (the paper), or a vector of its own (``keys: kmeans``),
  started at a k-means centroid of the training contexts' features so that routing starts spread out.
- ``c`` is the training contexts' mean feature (``center_features``), zero in the paper. Embedding
  tables are anisotropic: without centring, pooled contexts have pairwise cosines around 0.8 and the
  argmax sends nearly every example to one prompt before training starts.

Scores are computed in fp32 even under autocast: the selection loss compares them at temperatures
where bf16 rounding (~0.004 relative) would be a visible fraction of the signal.
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


def spherical_kmeans(x: torch.Tensor, K: int, iters: int = 25, generator: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """K unit centroids (K, d) of the rows of x (N, d) under cosine similarity, and each row's cluster (N,).

    k-means++ seeding (each next seed drawn with probability ~ its cosine distance to the nearest seed),
    then Lloyd iterations; an empty cluster is re-seeded at the row farthest from its centroid."""
    if x.shape[0] < K:
        raise ValueError(f"k-means needs at least K={K} rows, got {x.shape[0]}")
    u = F.normalize(x.float(), dim=-1)
    first = int(torch.randint(u.shape[0], (1,), generator=generator))
    centroids = [u[first]]
    for _ in range(1, K):
        dist = (1 - (u @ torch.stack(centroids).T).max(1).values).clamp(min=0) + 1e-12
        centroids.append(u[int(torch.multinomial(dist, 1, generator=generator))])
    c = torch.stack(centroids)
    for _ in range(iters):
        sim = u @ c.T  # (N, K)
        assign = sim.argmax(1)
        new = torch.zeros_like(c).index_add_(0, assign, u)
        for k in (torch.bincount(assign, minlength=K) == 0).nonzero().flatten().tolist():
            new[k] = u[int(sim.max(1).values.argmin())]
        new = F.normalize(new, dim=-1)
        if torch.allclose(new, c):
            break
        c = new
    return c, (u @ c.T).argmax(1)


class Retriever(nn.Module):
    def __init__(self, d: int, K: int = 1, kind: str = "linear", beta: float = 10.0, threshold: float = 1.0,
                 layers: int = 1, heads: int | None = None, center: bool = False, own_keys: bool = False):
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
        # c (d,): saved with the checkpoint (set once from the training data by SPTModel.init_routing)
        self.center: torch.Tensor | None
        self.register_buffer("center", torch.zeros(d) if center else None)
        self.keys = nn.Parameter(torch.zeros(K, d)) if own_keys else None  # (K, d)

    def features(self, token_embeds: torch.Tensor, mask: torch.Tensor, centred: bool = True) -> torch.Tensor:
        """(B, T, d) token embeddings, (B, T) mask -> (B, d) pooled context features, fp32; centred by c
        when the retriever has one, unless ``centred`` is False (to measure c itself)."""
        center = self.center if centred else None
        x = token_embeds.float()
        if center is not None and self.encoder is not None:
            x = x - center  # centre the tokens the encoder sees
        if self.encoder is not None:
            x = self.encoder(x, src_key_padding_mask=~mask.bool())
        pooled = masked_mean(x, mask)
        if center is not None and self.encoder is None:
            pooled = pooled - center
        return pooled

    def score_features(self, prompts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """prompts (K, n, d), features x (B, d) from ``features`` -> scores S (K, B), always fp32."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            keys = self.keys if self.keys is not None else prompts.float().mean(1)  # (K, d)
            p = self.normalizer(keys)  # (K, d)
            cos = F.cosine_similarity(p.unsqueeze(1), self.normalizer(x.float()).unsqueeze(0), dim=-1)  # (K, B)
            return F.softplus(cos, beta=self.beta, threshold=self.threshold)

    def forward(self, prompts: torch.Tensor, token_embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """prompts (K, n, d), token_embeds (B, T, d), mask (B, T) -> scores S (K, B), always fp32."""
        with torch.autocast(device_type=token_embeds.device.type, enabled=False):
            return self.score_features(prompts, self.features(token_embeds, mask))

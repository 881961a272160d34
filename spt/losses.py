"""SPT's training losses as pure functions of tensors (shapes in the docstrings).

K prompts, B examples, M response tokens in the batch (all examples), V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def lm_loss(nll: torch.Tensor) -> torch.Tensor:
    """Mean token NLL over all (prompt, example) pairs' response tokens. nll (K, M) -> scalar."""
    return nll.mean()


def routed_lm_loss(nll: torch.Tensor, weights: torch.Tensor, token_example: torch.Tensor) -> torch.Tensor:
    """Token NLL with each (prompt, example) pair weighted by the routing: sum_k w[k, b(m)] nll[k, m] / M.

    nll (K, M), weights (K, B) summing to 1 over K (no gradient flows into them), token_example (M,).
    Each prompt learns mostly from the examples routed to it; uniform weights 1/K give ``lm_loss``."""
    w = weights.detach().to(nll.dtype)[:, token_example]  # (K, M)
    return (w * nll).sum() / nll.shape[1]


def routing_probs(S: torch.Tensor, tau_sim: float = 1.0) -> torch.Tensor:
    """p (K, B) = softmax_k(S[:, b] / tau_sim): the retriever's distribution over prompts, fp32."""
    return torch.softmax(S.float() / tau_sim, dim=0)


def balance_loss(p: torch.Tensor, running: torch.Tensor | None = None, momentum: float = 0.0) -> torch.Tensor:
    """KL(m || uniform) = log K - H(m) of the average routing m: 0 when every prompt is used equally,
    log K when all goes to one prompt. p (K, B); ``running`` (K,) is the average routing of earlier
    batches (no gradient) and m = momentum * running + (1 - momentum) * mean_b p_b. Batches grouped by
    length hold similar contexts, so one batch may fairly go to one prompt: it is the average over
    many batches that should be balanced. Each example may still be routed sharply (as in
    mixture-of-experts balancing, only the average is pushed towards uniform)."""
    mean = p.mean(1)
    if running is not None and momentum > 0:
        mean = momentum * running.detach().to(mean.dtype) + (1 - momentum) * mean
    mean = mean.clamp(min=1e-12)
    return (mean * mean.log()).sum() + math.log(p.shape[0])


def per_example_sum(nll: torch.Tensor, token_example: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Summed token NLL of each example under each prompt. nll (K, M), token_example (M,) -> (K, B)."""
    K = nll.shape[0]
    return torch.zeros(K, batch_size, dtype=nll.dtype, device=nll.device).index_add_(1, token_example, nll)


def per_example_nll(nll: torch.Tensor, token_example: torch.Tensor, batch_size: int) -> torch.Tensor:
    """L[k, b]: mean token NLL of example b under prompt k. nll (K, M), token_example (M,) -> (K, B)."""
    counts = torch.bincount(token_example, minlength=batch_size).clamp(min=1).to(nll.dtype)
    return per_example_sum(nll, token_example, batch_size) / counts


def sinkhorn(logits: torch.Tensor, iters: int = 3) -> torch.Tensor:
    """Balanced soft assignment (K, B) from logits (K, B): alternately make every prompt's total B / K and
    every example's column sum 1 (Sinkhorn-Knopp, as in SwAV), ending on the columns. A prompt wins an
    example by its advantage *relative to the other examples*, so no prompt can take the whole batch."""
    K = logits.shape[0]
    x = logits.float()
    for _ in range(iters):
        x = x - torch.logsumexp(x, dim=1, keepdim=True) - math.log(K)
        x = x - torch.logsumexp(x, dim=0, keepdim=True)
    return x.exp()


def selection_target(L: torch.Tensor, tau_gold: float = 1.0, prior: torch.Tensor | None = None,
                     balanced: bool = False) -> torch.Tensor:
    """q (K, B), the distribution the retriever learns from; no gradient.

    Without ``prior`` (the paper): q_b = softmax_k(-L[:, b] / tau_gold), L the mean token NLL.
    With ``prior`` p (K, B), the retriever's own routing: the posterior over which prompt produced the
    response, q_b ∝ p_b * exp(-L[:, b] / tau_gold) with L the *summed* NLL (the sequence's log-likelihood
    at tau_gold = 1). Where the prompts explain a response equally well, q stays at the prior instead of
    being pulled to uniform, so the routing is not erased while the prompts are still alike (EM for a
    mixture of experts: q are the responsibilities).

    ``balanced``: q is balanced over the batch (``sinkhorn``) instead of normalised per example. Without
    it a prompt that starts out better on everything wins everything and the others never learn."""
    logits = -L.detach().float() / tau_gold
    if prior is not None:
        logits = logits + prior.detach().float().clamp(min=1e-12).log()
    return sinkhorn(logits) if balanced else torch.softmax(logits, dim=0)


def selection_loss(L: torch.Tensor | None, S: torch.Tensor, tau_gold: float = 1.0, tau_sim: float = 1.0,
                   sigma: float = 0.0, generator: torch.Generator | None = None,
                   q: torch.Tensor | None = None) -> torch.Tensor:
    """KL(q || p) averaged over the batch; the retriever learns which prompt the LM prefers.

    L (K, B) per-example NLL (no gradient flows through it), S (K, B) retriever scores.
    q_b = softmax_k(-L[:, b] / tau_gold) unless a target ``q`` is given (see ``selection_target``),
    optionally plus N(0, sigma^2) noise (clamped at 1e-8 and renormalised to stay a distribution);
    p_b = log_softmax_k(S[:, b] / tau_sim)."""
    q = selection_target(L, tau_gold) if q is None else q.detach().float()
    if sigma > 0:
        noise = torch.randn(q.shape, generator=generator, device="cpu").to(q.device) * sigma
        q = (q + noise).clamp(min=1e-8)
        q = q / q.sum(0, keepdim=True)
    log_p = torch.log_softmax(S.float() / tau_sim, dim=0)
    return F.kl_div(log_p.T, q.T, reduction="batchmean")


def fusion_weights(S: torch.Tensor, mode: str = "raw", tau_sim: float = 1.0) -> torch.Tensor:
    """Weights (K, B) for mixing the K prompts' logits: raw scores (paper) or p = softmax(S / tau_sim)."""
    if mode == "raw":
        return S
    if mode == "softmax":
        return routing_probs(S, tau_sim)
    raise ValueError(f"unknown fusion weights {mode!r}")


def fusion_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                token_example: torch.Tensor) -> torch.Tensor:
    """Token NLL of the response under fused logits z = sum_k w[k, b] * logits[k].

    logits (K, M, V), targets (M,), weights (K, B), token_example (M,) example index of each token."""
    w = weights[:, token_example].unsqueeze(-1).to(logits.dtype)  # (K, M, 1)
    fused = (w * logits).sum(0)  # (M, V)
    return F.cross_entropy(fused.float(), targets)


def contrastive_targets(similarity: torch.Tensor, threshold: float) -> torch.Tensor:
    """T (B, B): +1 where persona similarity (sentence BLEU, 0-100) exceeds ``threshold``, else -1."""
    return torch.where(similarity > threshold, 1.0, -1.0)


def contrastive_loss(S: torch.Tensor, targets: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Mean CosineEmbeddingLoss over pairs i < j of the examples' score vectors S[:, i], S[:, j].

    Similar personas are pulled towards the same prompt distribution, dissimilar ones pushed apart.
    S (K, B), targets (B, B) of +-1. Zero when B < 2."""
    B = S.shape[1]
    if B < 2:
        return S.sum() * 0.0
    v = F.normalize(S.float().T, dim=-1)  # (B, K)
    cos = v @ v.T  # (B, B)
    i, j = torch.triu_indices(B, B, offset=1, device=S.device)
    c, t = cos[i, j], targets[i, j].to(cos.dtype)
    per_pair = torch.where(t > 0, 1.0 - c, (c - margin).clamp(min=0.0))
    return per_pair.mean()

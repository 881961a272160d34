"""The SPT model: a frozen causal LM, a bank of K soft prompts (K, n, d) and a retriever.

All K x B (prompt, example) pairs run through the LM as one batch of K*B rows (in chunks if asked),
padded only to the batch's longest example, and the LM head runs only at response positions.
"""

from __future__ import annotations

import collections
import inspect
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed, losses
from .config import SPTConfig
from .format import IGNORE_INDEX
from .retriever import Retriever, spherical_kmeans

log = logging.getLogger(__name__)


@dataclass
class Spliced:
    inputs_embeds: torch.Tensor  # (R, n + T, d)
    attention_mask: torch.Tensor  # (R, n + T)
    position_ids: torch.Tensor  # (R, n + T)
    labels: torch.Tensor | None  # (R, n + T), IGNORE_INDEX on prompt and padding


def splice(prompt_embeds: torch.Tensor, token_embeds: torch.Tensor, attention_mask: torch.Tensor,
           labels: torch.Tensor | None = None) -> Spliced:
    """Put each row's soft prompt right before its first real token.

    prompt_embeds (R, n, d), token_embeds (R, T, d), attention_mask (R, T), labels (R, T).
    Right-padded rows become (prompt, text, pad); left-padded rows become (pad, prompt, text), the
    layout generation needs. The prompt's mask is 1 and its labels are IGNORE_INDEX; position ids
    count real tokens only, so padding never shifts positions.
    """
    R, n, _ = prompt_embeds.shape
    T = token_embeds.shape[1]
    lead = (attention_mask.cumsum(1) == 0).sum(1, keepdim=True)  # (R, 1) leading pads
    j = torch.arange(n + T, device=attention_mask.device).unsqueeze(0)  # (1, n + T)
    # Index into the concatenation [prompt (n); tokens (T)] for every output position.
    src = torch.where(j < lead, n + j, torch.where(j < lead + n, j - lead, j))  # (R, n + T)
    embeds = torch.cat([prompt_embeds.to(token_embeds.dtype), token_embeds], 1)
    embeds = embeds.gather(1, src.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
    mask = torch.cat([attention_mask.new_ones(R, n), attention_mask], 1).gather(1, src)
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    spliced_labels = None
    if labels is not None:
        spliced_labels = torch.cat([labels.new_full((R, n), IGNORE_INDEX), labels], 1).gather(1, src)
    return Spliced(embeds, mask, position_ids, spliced_labels)


def response_logits(lm: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                    position_ids: torch.Tensor | None, labels: torch.Tensor, pass_positions: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the LM body, then its head only where a label follows: logits (N, V), targets (N,).

    Rows are flattened in row-major order (row 0's response tokens first). Computing the
    vocabulary projection at N response positions instead of every position is most of the saving
    over a plain forward for short responses."""
    kwargs = {"position_ids": position_ids} if pass_positions and position_ids is not None else {}
    hidden = lm.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                           **kwargs).last_hidden_state  # (R, T, d)
    targets = labels[:, 1:]
    sel = targets != IGNORE_INDEX  # predict token t + 1 from position t
    head = lm.get_output_embeddings()
    # The head runs in fp32 even under autocast: SPT compares per-prompt losses that differ by ~0.01
    # nats, and bf16 logits add noise of that size (the best prompt by bf16 and fp32 losses disagreed
    # on 12% of examples on persona-gpt-mini). It is one matmul at response positions only.
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        bias = head.bias.float() if getattr(head, "bias", None) is not None else None
        logits = F.linear(hidden[:, :-1][sel].float(), head.weight.float(), bias)  # (N, V)
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits, targets[sel]


def response_token_example(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For labels (B, T): the example index of each response token in row-major order (M,), and the
    number of response tokens per example (B,), matching the order ``response_logits`` returns."""
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(1)
    return torch.repeat_interleave(torch.arange(labels.shape[0], device=labels.device), counts), counts


def activation_checkpointing(lm: nn.Module) -> bool:
    flag = getattr(lm, "is_activation_checkpointing", None)
    return bool(flag if flag is not None else getattr(lm, "is_gradient_checkpointing", False))


def takes_position_ids(lm: nn.Module) -> bool:
    return "position_ids" in inspect.signature(lm.base_model.forward).parameters


def init_prompts(embeddings: torch.Tensor, K: int, n: int, mode: str = "vocab", text_ids: list[int] | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Initial prompt bank (K, n, d) in fp32.

    vocab: rows of the embedding table sampled at random (each prompt its own tokens);
    random: Gaussian with the table's std; text: the embeddings of ``text_ids`` (cycled to n tokens)
    plus small noise per prompt, so the K prompts start close but distinguishable."""
    table = embeddings.detach().float()
    V, d = table.shape
    if mode == "vocab":
        ids = torch.randint(0, V, (K, n), generator=generator)
        return table[ids].clone()
    std = table.std().item()
    if mode == "random":
        return torch.randn(K, n, d, generator=generator) * std
    if mode == "text":
        if not text_ids:
            raise ValueError("prompt_init 'text' needs a non-empty prompt_init_text")
        ids = torch.tensor([text_ids[i % len(text_ids)] for i in range(n)])
        return table[ids].unsqueeze(0).repeat(K, 1, 1) + 0.01 * std * torch.randn(K, n, d, generator=generator)
    raise ValueError(f"unknown prompt init {mode!r}")


BALANCE_MOMENTUM = 0.9  # the balance loss looks at the routing of ~10 recent batches, not one


@dataclass
class PairOutput:
    S: torch.Tensor  # (K, B) retriever scores
    logits: torch.Tensor  # (K, M, V) response-position logits
    targets: torch.Tensor  # (M,) response tokens (the same under every prompt)
    nll: torch.Tensor  # (K, M) per-token NLL
    token_example: torch.Tensor  # (M,) example index of each response token
    L: torch.Tensor  # (K, B) mean NLL of each example's response under each prompt
    features: torch.Tensor  # (B, d) the retriever's pooled, centred query features


class SPTModel(nn.Module):
    """Frozen LM + trainable prompts + retriever. ``trainable_state_dict`` is what a checkpoint holds."""

    def __init__(self, lm: nn.Module, cfg: SPTConfig, text_ids: list[int] | None = None, seed: int = 0):
        super().__init__()
        self.lm = lm.eval().requires_grad_(False)
        self.cfg = cfg
        table = lm.get_input_embeddings().weight
        g = torch.Generator().manual_seed(seed)
        self.prompts = nn.Parameter(init_prompts(table, cfg.K, cfg.num_virtual_tokens, cfg.prompt_init, text_ids, g))
        self.retriever = Retriever(table.shape[1], cfg.K, cfg.retriever, cfg.softplus_beta, cfg.softplus_threshold,
                                   cfg.retriever_layers, center=bool(cfg.center_features),
                                   own_keys=cfg.keys == "kmeans")
        self._takes_positions = takes_position_ids(lm)
        # average routing over recent training batches, for the load-balance loss (not saved)
        self.register_buffer("route_avg", torch.full((cfg.K,), 1.0 / cfg.K), persistent=False)
        self.chunk_size: int | None = None
        # (features (B, d), target q (K, B)) of recent training batches for the selection loss (not saved)
        self._replay: collections.deque = collections.deque(maxlen=max(1, cfg.sel_replay))

    def routing_state(self) -> dict:
        """Training-time routing memory (average routing, replayed batches) for an exact resume."""
        return {"route_avg": self.route_avg.detach().cpu().clone(),
                "replay": [(f.cpu(), q.cpu()) for f, q in self._replay]}

    def load_routing_state(self, state: dict) -> None:
        device = self.route_avg.device
        self.route_avg.copy_(state["route_avg"].to(device))
        self._replay.clear()
        self._replay.extend((f.to(device), q.to(device)) for f, q in state["replay"])

    def train(self, mode: bool = True):
        super().train(mode)
        # The frozen LM stays in eval mode (no dropout), except under activation checkpointing, which
        # HF applies only in train mode (SPTMethod has zeroed its dropout for that case).
        self.lm.train(mode and activation_checkpointing(self.lm))
        return self

    @property
    def K(self) -> int:
        return self.prompts.shape[0]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.state_dict().items() if not k.startswith("lm.")}

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(input_ids)

    def query(self, input_ids: torch.Tensor, query_mask: torch.Tensor, token_embeds: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the retriever pools, (B, T, d) and its mask (B, T), for ``spt.query``:

        - "embeddings" (the paper): the input embeddings of the inference input (persona + context);
        - "lm_hidden": the frozen LM's last hidden state at the last token of the inference input (no
          prompt), i.e. what the LM expects to say next. One extra forward without gradient (B rows, no
          LM head); padding on either side."""
        if self.cfg.query == "embeddings":
            return (self.embed(input_ids) if token_embeds is None else token_embeds), query_mask
        with torch.no_grad():
            kwargs = {"position_ids": (query_mask.cumsum(1) - 1).clamp(min=0)} if self._takes_positions else {}
            hidden = self.lm.base_model(input_ids=input_ids, attention_mask=query_mask, **kwargs).last_hidden_state
        T = query_mask.shape[1]
        last = T - 1 - query_mask.flip(1).argmax(1)  # (B,) index of the last query token
        return hidden.detach(), F.one_hot(last, T).to(query_mask.dtype)

    def scores(self, token_embeds: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
        """S (K, B) from the inference-input tokens (query_mask marks persona + context only)."""
        return self.retriever(self.prompts, token_embeds, query_mask)

    @torch.no_grad()
    def init_routing(self, token_embeds: list[tuple[torch.Tensor, torch.Tensor]], seed: int = 0) -> torch.Tensor | None:
        """Set the retriever's centre c and k-means keys from training batches [(embeds (B, T, d), query mask)].

        Returns the k-means cluster of each training example (None without k-means keys)."""
        r = self.retriever
        x = torch.cat([r.features(e, m, centred=False) for e, m in token_embeds])  # (N, d)
        if r.center is not None:
            r.center.copy_(x.mean(0))
            x = x - r.center
        if r.keys is None:
            return None
        centroids, assign = spherical_kmeans(x, self.K, generator=torch.Generator().manual_seed(seed))
        r.keys.copy_(centroids * x.norm(dim=-1).mean())  # at the features' scale, so W's updates act alike
        return assign

    def select(self, S: torch.Tensor, noise: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """k* (B,) = argmax_k S[k] (+ optional Gaussian selection noise)."""
        if noise > 0:
            S = S + noise * torch.randn(S.shape, generator=generator).to(S.device)
        return S.argmax(0)

    # --- the LM on response positions only ----------------------------------------------------

    def _response_logits(self, prompt_rows: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor,
                         labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (N, V) and targets (N,) at the response positions of R rows, in row-major order."""
        sp = splice(prompt_rows, embeds, mask, labels)
        return response_logits(self.lm, sp.inputs_embeds, sp.attention_mask, sp.position_ids, sp.labels,
                               self._takes_positions)

    def pair_logits(self, prompt_idx: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    labels: torch.Tensor, token_embeds: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Response logits for rows (prompt_idx[r], example r % B): one LM batch of R rows, chunked.

        prompt_idx (R,), the B examples repeated R / B times. Returns logits (N, V), targets (N,)."""
        B = input_ids.shape[0]
        E = self.embed(input_ids) if token_embeds is None else token_embeds
        reps = prompt_idx.shape[0] // B
        rows = self.prompts[prompt_idx]  # (R, n, d)
        E, mask, labels = (x.repeat(reps, *[1] * (x.dim() - 1)) for x in (E, attention_mask, labels))
        step = self.chunk_size or rows.shape[0]
        outs = [self._response_logits(rows[i:i + step], E[i:i + step], mask[i:i + step], labels[i:i + step])
                for i in range(0, rows.shape[0], step)]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    # --- all K x B pairs -------------------------------------------------------------------------

    def pairs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
              query_mask: torch.Tensor) -> PairOutput:
        """Scores and response NLL of every (prompt, example) pair in one LM batch of K*B rows."""
        K, B = self.K, input_ids.shape[0]
        E = self.embed(input_ids)
        with torch.autocast(device_type=input_ids.device.type, enabled=False):
            features = self.retriever.features(*self.query(input_ids, query_mask, E))  # (B, d)
        S = self.retriever.score_features(self.prompts, features)  # (K, B)
        prompt_idx = torch.arange(K, device=input_ids.device).repeat_interleave(B)  # rows k*B + b
        logits, targets = self.pair_logits(prompt_idx, input_ids, attention_mask, labels, E)
        nll = F.cross_entropy(logits.float(), targets, reduction="none").view(K, -1)  # (K, M)
        token_example, _ = response_token_example(labels)  # (M,)
        L = losses.per_example_nll(nll, token_example, B)  # (K, B)
        M = nll.shape[1]
        return PairOutput(S, logits.view(K, M, -1), targets[:M], nll, token_example, L, features)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                query_mask: torch.Tensor, persona_sim: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """All four losses for a batch; ``loss`` is their weighted sum. Shapes: (B, T) inputs,
        persona_sim (B, B) sentence-BLEU similarities for the contrastive loss."""
        cfg, K = self.cfg, self.K
        p = self.pairs(input_ids, attention_mask, labels, query_mask)
        multi = K > 1
        route = losses.routing_probs(p.S, cfg.tau_sim)  # (K, B)
        if cfg.sel_target == "posterior":  # q from the summed NLL, with the routing as prior
            L_sum = losses.per_example_sum(p.nll, p.token_example, input_ids.shape[0])
            q = losses.selection_target(L_sum, cfg.tau_gold, route, bool(cfg.balance_target))
        else:
            q = losses.selection_target(p.L, cfg.tau_gold, None, bool(cfg.balance_target))
        weights = {"retriever": route, "posterior": q}.get(cfg.lm_weighting)
        out = {"llm": losses.routed_lm_loss(p.nll, weights, p.token_example)
               if weights is not None and multi else losses.lm_loss(p.nll)}
        zero = out["llm"] * 0.0
        out["sel"] = zero
        if cfg.lambda_sel > 0 and multi:
            S_all, q_all = p.S, q
            if self.training and cfg.sel_replay > 0:  # re-score recent batches' features against their targets
                if self._replay:
                    feats, targets = zip(*self._replay, strict=True)
                    S_all = torch.cat([self.retriever.score_features(self.prompts, torch.cat(feats)), p.S], 1)
                    q_all = torch.cat([*targets, q], 1)
                # every rank keeps the whole global batch, so replay is the same as in one process
                self._replay.append((distributed.gather_rows(p.features.detach()),
                                     distributed.gather_rows(q.detach().T).T))
            out["sel"] = losses.selection_loss(p.L, S_all, cfg.tau_gold, cfg.tau_sim, cfg.sel_noise_sigma, q=q_all)
        fusion_w = losses.fusion_weights(p.S, cfg.fusion_weights, cfg.tau_sim)
        out["fus"] = losses.fusion_loss(p.logits, p.targets, fusion_w, p.token_example) \
            if cfg.lambda_fus > 0 and multi else zero
        out["bal"] = losses.balance_loss(route, self.route_avg, BALANCE_MOMENTUM) \
            if cfg.lambda_bal > 0 and multi else zero
        if self.training and multi:  # the global batch's average routing, identical on every rank
            batch_route = distributed.gather_rows(route.detach().T).mean(0)
            self.route_avg.mul_(BALANCE_MOMENTUM).add_((1 - BALANCE_MOMENTUM) * batch_route)
        out["ctr"] = losses.contrastive_loss(p.S, losses.contrastive_targets(persona_sim, cfg.ctr_bleu_threshold)) \
            if cfg.lambda_ctr > 0 and multi and persona_sim is not None else zero
        out["loss"] = (cfg.lambda_llm * out["llm"] + cfg.lambda_sel * out["sel"] + cfg.lambda_fus * out["fus"]
                       + cfg.lambda_ctr * out["ctr"] + cfg.lambda_bal * out["bal"])
        return out
